"""Task data for the pipeline: local CSV/TSV/JSONL files, label handling, tokenisation.

Also ``fetch_movie_reviews``: the movie-review sentences of the vaderSentiment sdist
(Hutto & Gilbert, ICWSM 2014), the one real labelled text set that ships offline here.
"""
from __future__ import annotations

import csv
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise")
DEFAULT_PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
DEFAULT_LABEL_COLUMN = "label"


@dataclass
class Examples:
    """Raw examples of one split: texts, optional second texts, raw label strings/numbers."""

    texts: list[str]
    pairs: list[str] | None
    labels: list

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices) -> "Examples":
        indices = list(indices)
        return Examples(
            [self.texts[i] for i in indices],
            None if self.pairs is None else [self.pairs[i] for i in indices],
            [self.labels[i] for i in indices],
        )


@dataclass(frozen=True)
class LabelSpace:
    """How raw labels map to model targets.

    ``regression``: float targets, one output (MSE). Otherwise ``names`` are the classes in id order.
    """

    regression: bool
    names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    def encode(self, labels) -> torch.Tensor:
        if self.regression:
            return torch.tensor([float(x) for x in labels], dtype=torch.float32)
        index = {name: i for i, name in enumerate(self.names)}
        out = []
        for x in labels:
            key = _label_key(x)
            if key not in index:
                raise ValueError(f"label {x!r} is not one of the model's classes {list(self.names)}")
            out.append(index[key])
        return torch.tensor(out, dtype=torch.long)


def _label_key(x) -> str:
    """Canonical string of a class label: 1, 1.0, "1" and " 1 " are the same class."""
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    s = str(x).strip()
    try:
        f = float(s)
    except ValueError:
        return s
    return str(int(f)) if f.is_integer() else s


def _is_number(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, (int, float)):
        return True
    try:
        float(str(x).strip())
    except ValueError:
        return False
    return True


def infer_label_space(labels) -> LabelSpace:
    """Classification unless every label is a number and some are not integers (then regression).

    Raises:
        ValueError: no labels, or a classification label set with a single class.
    """
    labels = list(labels)
    if not labels:
        raise ValueError("the dataset is empty: no labelled examples")
    if all(_is_number(x) for x in labels) and any(not float(str(x).strip()).is_integer() for x in labels):
        return LabelSpace(regression=True)
    keys = {_label_key(x) for x in labels}
    if len(keys) < 2:
        raise ValueError(
            f"the label column holds a single class ({next(iter(keys))!r}); classification needs at least 2 classes"
        )
    if all(_is_number(k) for k in keys):
        names = tuple(sorted(keys, key=float))
    else:
        names = tuple(sorted(keys))
    return LabelSpace(regression=False, names=names)


def read_rows(path) -> list[dict]:
    """Rows of a CSV (``.csv``), TSV (``.tsv``/``.txt``) or JSON lines (``.jsonl``/``.json``) file.

    Raises:
        SystemExit: the file does not exist. ValueError: unknown extension or malformed JSON line.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as error:
                        raise ValueError(f"{path}:{number}: not a JSON object per line ({error})") from None
                    if not isinstance(row, dict):
                        raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                    rows.append(row)
        return rows
    if suffix in (".csv", ".tsv", ".txt"):
        delimiter = "," if suffix == ".csv" else "\t"
        with path.open(encoding="utf-8-sig", newline="") as f:
            return list(csv.DictReader(f, delimiter=delimiter))
    raise ValueError(f"unsupported data file extension {suffix!r} ({path}): use .csv, .tsv or .jsonl")


def _columns(path, rows) -> list[str]:
    if rows:
        seen: dict[str, None] = {}
        for row in rows[:100]:
            seen.update(dict.fromkeys(row))
        return list(seen)
    if Path(path).suffix.lower() in (".csv", ".tsv", ".txt"):
        with Path(path).open(encoding="utf-8-sig", newline="") as f:
            header = next(csv.reader(f, delimiter="," if Path(path).suffix.lower() == ".csv" else "\t"), [])
        return header
    return []


def load_examples(path, text_column: str | None = None, text_pair_column: str | None = None,
                  label_column: str | None = None) -> Examples:
    """Read labelled examples from a local file.

    Args:
        path: CSV/TSV (header row) or JSONL file.
        text_column: column with the text; None tries ``text``, ``sentence``, ``sentence1``, ...
        text_pair_column: optional second text (sentence pairs); None uses ``text_pair``/
            ``sentence2``/``hypothesis`` only when ``text_column`` was also defaulted and present.
        label_column: column with the label (default ``label``).

    Raises:
        ValueError: a named or required column is missing (the message lists the available
            ones), the file has no examples, or a row lacks its text or label.
    """
    rows = read_rows(path)
    available = _columns(path, rows)
    if not rows:
        raise ValueError(f"the dataset {path} is empty (columns: {', '.join(available) or 'none'})")

    def need(column, what):
        if column not in available:
            raise ValueError(
                f"{what} column {column!r} not found in {path}; available columns: {', '.join(available)}"
            )
        return column

    if text_column is None:
        found = [c for c in DEFAULT_TEXT_COLUMNS if c in available]
        if not found:
            raise ValueError(
                f"no text column in {path} (tried {', '.join(DEFAULT_TEXT_COLUMNS)}); pass --text-column; "
                f"available columns: {', '.join(available)}"
            )
        text_column = found[0]
        if text_pair_column is None:
            pair = [c for c in DEFAULT_PAIR_COLUMNS if c in available]
            text_pair_column = pair[0] if pair else None
    need(text_column, "text")
    if text_pair_column is not None:
        need(text_pair_column, "text pair")
    label_column = need(label_column or DEFAULT_LABEL_COLUMN, "label")

    texts, pairs, labels = [], [] if text_pair_column else None, []
    for number, row in enumerate(rows, 1):
        label = row.get(label_column)
        if label is None or (isinstance(label, str) and not label.strip()):
            raise ValueError(f"{path}: example {number} has no value in label column {label_column!r}")
        texts.append("" if row.get(text_column) is None else str(row[text_column]))
        if pairs is not None:
            pairs.append("" if row.get(text_pair_column) is None else str(row[text_pair_column]))
        labels.append(label)
    return Examples(texts, pairs, labels)


def split_dev(examples: Examples, fraction: float, seed: int) -> tuple[Examples, Examples]:
    """Seeded random split into (train, dev) with ``round(fraction * n)`` dev examples (>= 1)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"dev fraction must be in (0, 1), got {fraction}")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_dev = max(1, round(fraction * len(order)))
    if n_dev >= len(order):
        raise ValueError(f"{len(order)} examples are too few to hold out a dev fraction of {fraction}")
    return examples.subset(sorted(order[n_dev:])), examples.subset(sorted(order[:n_dev]))


def take(examples: Examples, limit: int | None, seed: int) -> Examples:
    """A seeded random subset of at most ``limit`` examples (all when None)."""
    if limit is None or limit >= len(examples):
        return examples
    order = list(range(len(examples)))
    random.Random(seed + 1).shuffle(order)
    return examples.subset(sorted(order[:limit]))


def encode(examples: Examples, tokenizer, labels: LabelSpace, max_length: int) -> TensorDataset:
    """Tokenise, padded and truncated to ``max_length`` (the paper's fixed N).

    Returns:
        ``TensorDataset(input_ids [M, N], attention_mask [M, N], token_type_ids [M, N], targets [M])``;
        token_type_ids are zeros when the tokenizer gives none.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] plus at least one token), got {max_length}")
    batch = tokenizer(
        examples.texts, examples.pairs, padding="max_length", truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    ids = batch["input_ids"]
    types = batch.get("token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    return TensorDataset(ids, batch["attention_mask"], types, labels.encode(examples.labels))


# ----------------------------------------------------------------------------- movie reviews

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
        if score == 0:
            continue
        out.append((parts[2].strip(), 1 if score > 0 else 0))
    return out


def _find_member(archive: tarfile.TarFile, suffix: str) -> tarfile.TarInfo:
    for member in archive.getmembers():
        if member.isfile() and member.name.endswith(suffix):
            return member
    raise SystemExit(f"{suffix} not found in {archive.name}")


def fetch_movie_reviews(output, *, sdist: str | None = None) -> int:
    """Write the vaderSentiment movie-review sentences as a CSV ``text,label``.

    Runs ``pip download --no-deps --no-binary :all: vaderSentiment==3.3.2`` into a temporary
    folder (unless ``sdist`` names a local copy of the sdist), opens the inner
    ``hutto_ICWSM_2014.tar.gz`` and ``movieReviewSnippets_GroundTruth.txt``, drops score 0 and
    labels score > 0 as 1, else 0.

    Returns:
        The number of examples written.
    """
    output = Path(output)
    with tempfile.TemporaryDirectory() as tmp:
        if sdist is None:
            command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                       VADER_SDIST, "-d", tmp]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise SystemExit(f"pip download {VADER_SDIST} failed:\n{result.stderr.strip()}")
            found = sorted(Path(tmp).glob("vaderSentiment*.tar.gz")) + sorted(Path(tmp).glob("vadersentiment*.tar.gz"))
            if not found:
                raise SystemExit(f"pip download {VADER_SDIST} produced no sdist in {tmp}")
            sdist = found[0]
        with tarfile.open(sdist, "r:gz") as outer:
            inner_bytes = outer.extractfile(_find_member(outer, _INNER_TARBALL)).read()
        with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
            raw = inner.extractfile(_find_member(inner, _MOVIE_FILE)).read()
    rows = parse_movie_reviews(raw)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return len(rows)
