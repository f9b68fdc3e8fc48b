"""The movie-review sentences of the vaderSentiment 3.3.2 sdist (Hutto & Gilbert, ICWSM 2014).

The one real labelled text set that ships offline here: ``fetch_movie_reviews`` downloads the
sdist with ``pip download`` (or reads a local one) and writes ``text,label`` CSV.
"""
from __future__ import annotations

import csv
import math
import io
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

VADER_SDIST = "vaderSentiment==3.3.2"
_INNER_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"
_MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"


def parse_movie_reviews(raw: bytes) -> list[tuple[str, int]]:
    """``id<TAB>score<TAB>text`` lines (UTF-8, CRLF) -> (text, label); score 0 dropped, label = score > 0."""
    out = []
    for line in raw.decode("utf-8").splitlines():
        parts = line.split("\t", 2)
        if len(parts) != 3:
            continue
        try:
            score = float(parts[1])
        except ValueError:
            continue  # a header or malformed line
        if score == 0 or not math.isfinite(score):
            continue
        out.append((parts[2].strip(), 1 if score > 0 else 0))
    return out


def _find_member(archive: tarfile.TarFile, suffix: str, where) -> tarfile.TarInfo:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return member
    raise SystemExit(f"{suffix} not found in {where}: not the vaderSentiment 3.3.2 sdist")


def _read_sdist(sdist: Path) -> bytes:
    """The movie-review file's bytes from the sdist (a .tar.gz holding another .tar.gz)."""
    if not sdist.is_file():
        raise SystemExit(f"sdist not found: {sdist}")
    try:
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = outer.extractfile(_find_member(outer, _INNER_TARBALL, sdist)).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            return inner.extractfile(_find_member(inner, _MOVIE_FILE, f"{sdist}:{_INNER_TARBALL}")).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:  # gzip.BadGzipFile is an OSError
        raise SystemExit(f"{sdist} is not a readable vaderSentiment sdist (.tar.gz): {error}") from None


def fetch_movie_reviews(output, *, sdist: str | None = None) -> int:
    """Write the vaderSentiment movie-review sentences as a CSV ``text,label``.

    Runs ``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into a temporary
    folder (unless ``sdist`` names a local copy of the sdist), opens the inner
    ``hutto_ICWSM_2014.tar.gz`` and ``movieReviewSnippets_GroundTruth.txt``, drops score 0 and
    labels score > 0 as 1, else 0.

    Returns:
        The number of examples written.

    Raises:
        SystemExit (one-line message): ``output`` is a folder, the download fails, or the sdist is
            not a readable archive holding the movie-review file.
    """
    output = Path(output)
    if output.is_dir():
        raise SystemExit(f"--output {output} is a folder; give the CSV file to write")
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                       VADER_SDIST, "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
                raise SystemExit(f"pip download {VADER_SDIST} failed: {last}")
            found = sorted(Path(tmp).glob("vaderSentiment*.tar.gz")) + sorted(Path(tmp).glob("vadersentiment*.tar.gz"))
            if not found:
                raise SystemExit(f"pip download {VADER_SDIST} produced no sdist in {tmp}")
            sdist = found[0]
        sdist = Path(sdist)
        raw = _read_sdist(sdist)
    try:
        rows = parse_movie_reviews(raw)
    except UnicodeDecodeError as error:
        raise SystemExit(f"{sdist}: {_MOVIE_FILE} is not UTF-8 text ({error})") from None
    if not rows:
        raise SystemExit(f"{sdist}: {_MOVIE_FILE} holds no scored movie-review lines")
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return len(rows)
