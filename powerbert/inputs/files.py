"""Writing what the commands produce without ever leaving a half-written file.

``write_json_atomic`` is the one JSON writer of the package (step records, reports, results):
the text goes to a temporary file beside the target, then ``os.replace`` renames it over, so an
interrupt leaves the old file or the new one, never a mix.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path


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
