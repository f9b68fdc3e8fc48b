"""Writing what the commands produce without ever leaving a half-written file or losing an input.

``check_output`` is the one check of an output path (``train``'s and ``calibrate``'s folders,
``predict``'s file): the right kind of path, creatable, and not one of the command's inputs; each
command adds what only it knows (``predict``'s suffix and ``--overwrite``, a folder holding a
model someone else wrote). ``write_json_atomic`` is the one JSON writer of the package (step
records, reports, results): the text goes to a temporary file beside the target, then
``os.replace`` renames it over, so an interrupt leaves the old file or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


def check_output(output, *, folder: bool, inputs: dict | None = None) -> Path:
    """``output`` as a ``Path`` after the checks every command's ``--output`` shares.

    Args:
        output: the path the command will write (a folder when ``folder``, else a file).
        folder: True for a folder (an existing file there is refused), False for a file (an
            existing folder there is refused).
        inputs: ``{"--model": path, ...}``, what the command reads; an output that resolves to one
            of them (also through a symlink or ``..``) is refused, as writing it would destroy it.

    Raises:
        ValueError: one line, ``output <path> (--output) ...``, naming the problem.
    """
    out = Path(output)
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"output {out} (--output) is a file, not a folder")
    if not folder and out.is_dir():
        raise ValueError(f"output {out} (--output) is a folder; give the file to write")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output {out} (--output) cannot be created: {parent} is a file")
            break
    for flag, path in (inputs or {}).items():
        if path is not None and Path(path).resolve() == out.resolve():
            what = "folder" if Path(path).is_dir() else "file"
            raise ValueError(f"output {out} (--output) would overwrite the {flag.lstrip('-')} {what} {path} "
                             f"({flag}); choose another output")
    return out


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path, value, *, indent: int | None = 2) -> None:
    """Write ``value`` as JSON (indented, newline-terminated) to ``path`` atomically."""
    write_text_atomic(path, json.dumps(value, indent=indent) + "\n")
