"""Task data for the pipeline: local CSV/TSV/JSONL files, label handling, tokenisation.

Reading is strict, and every error names the file and line: text must be UTF-8, every CSV/TSV
row has the header's number of fields, and every label is present and, if numeric, finite. TSV
(and ``.txt``) is read with quoting off, as GLUE-style TSVs carry quotes as text; CSV follows
RFC 4180 quoting. Fields may be any size (Python's csv module stops at 128 KB by default).

Classification or regression is decided by the whole label column (``infer_label_space``), or
by ``task="classification"|"regression"``.

Also ``fetch_movie_reviews``: the movie-review sentences of the vaderSentiment sdist
(Hutto & Gilbert, ICWSM 2014), the one real labelled text set that ships offline here.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import math
import random
import subprocess
import sys
import tarfile
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise")
DEFAULT_PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
DEFAULT_LABEL_COLUMN = "label"
TASKS = ("auto", "classification", "regression")
# csv.field_size_limit takes a C long: sys.maxsize overflows it on Windows (32-bit long).
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


@dataclass
class Examples:
    """Raw examples of one split: texts, optional second texts, raw label strings/numbers.

    ``source`` and ``lines`` (the file and the line each example starts on) let errors name
    the offending row; both are optional.
    """

    texts: list[str]
    pairs: list[str] | None
    labels: list
    source: str | None = None
    lines: list[int] | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.texts)

    def where(self, index: int) -> str:
        """``file:line`` of example ``index`` (or ``example i`` without line numbers)."""
        if self.lines is None:
            return f"{self.source or 'data'}: example {index + 1}"
        return f"{self.source}:{self.lines[index]}"

    def subset(self, indices) -> "Examples":
        indices = list(indices)
        return Examples(
            [self.texts[i] for i in indices],
            None if self.pairs is None else [self.pairs[i] for i in indices],
            [self.labels[i] for i in indices],
            self.source,
            None if self.lines is None else [self.lines[i] for i in indices],
        )


@dataclass(frozen=True)
class LabelSpace:
    """How raw labels map to model targets.

    ``regression``: float targets, one output (MSE). Otherwise ``names`` are the classes in id order.
    """

    regression: bool
    names: tuple[str, ...] = ()
    reason: str = field(default="", compare=False)  # why infer_label_space chose this, for the log

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    def encode(self, labels, where=None) -> torch.Tensor:
        """``[M]`` float32 (regression) or int64 class ids; ``where(i)`` names example i in errors."""
        where = where or (lambda i: f"example {i + 1}")
        if self.regression:
            out = []
            for i, x in enumerate(labels):
                value = _number(x)
                if value is None or not math.isfinite(value):
                    raise ValueError(f"{where(i)}: label {x!r} is not a finite number; the model does regression")
                out.append(value)
            return torch.tensor(out, dtype=torch.float32)
        index = {name: i for i, name in enumerate(self.names)}
        out = []
        for i, x in enumerate(labels):
            key = _label_key(x)
            if key not in index:
                raise ValueError(f"{where(i)}: label {x!r} is not one of the model's classes {list(self.names)}")
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
    return str(int(f)) if math.isfinite(f) and f.is_integer() else s


def _number(x) -> float | None:
    """The label as a float, or None when it is not a number (text, a bool)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        return float(x)
    try:
        return float(str(x).strip())
    except ValueError:
        return None


def _is_number(x) -> bool:
    return _number(x) is not None


def check_label(value, where: str, column: str) -> None:
    """Raise ValueError unless ``value`` is a usable label: present, a string or number, finite.

    Non-finite numbers (``nan``, ``inf``, JSON ``NaN``) are refused in every mode: they are how
    pandas and spreadsheets export a missing value, and one of them would turn a classification
    column into a regression target or train to NaN weights.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{where}: no value in label column {column!r}")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: label {value!r} in column {column!r} is a {type(value).__name__}, "
                         f"expected a string or a number")
    number = _number(value)
    if number is not None and not math.isfinite(number):
        raise ValueError(f"{where}: label {value!r} in column {column!r} is not a finite number "
                         f"(a missing value?); fix or drop that row")


def _label_sources(labels):
    """``labels`` as (value, where) pairs: a list of raw labels, an ``Examples`` or a list of them."""
    if isinstance(labels, Examples):
        labels = [labels]
    labels = list(labels)
    if labels and all(isinstance(x, Examples) for x in labels):
        for examples in labels:
            for i, value in enumerate(examples.labels):
                yield value, (lambda e=examples, i=i: e.where(i))
    else:
        for i, value in enumerate(labels):
            yield value, (lambda i=i: f"example {i + 1}")


def infer_label_space(labels, task: str = "auto") -> LabelSpace:
    """Classification or regression, decided by the whole label column.

    Args:
        labels: raw labels, an ``Examples`` or a list of ``Examples`` (train and dev files
            together: the column of both decides; errors then name file and line).
        task: ``"auto"``: every label an integer (``1``, ``"1"``, ``"1.0"``: integer-valued
            floats are classes) or every label text -> classification; every label a number
            and one of them not an integer -> regression; numbers mixed with text -> error.
            ``"classification"``: every distinct value (canonical form, so ``1.0`` is ``1``)
            is a class. ``"regression"``: every label must be a number.

    Raises:
        ValueError: no labels, a non-finite label, a mixed column (auto), a non-number
            (regression), or a single class (classification).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    pairs = list(_label_sources(labels))
    if not pairs:
        raise ValueError("the dataset is empty: no labelled examples")
    first_number = first_text = first_fraction = None
    for value, where in pairs:
        number = _number(value)
        if number is not None and not math.isfinite(number):
            raise ValueError(f"{where()}: label {value!r} is not a finite number (a missing value?); "
                             f"fix or drop that row")
        if number is None:
            first_text = first_text or (value, where)
        else:
            first_number = first_number or (value, where)
            if not number.is_integer():
                first_fraction = first_fraction or (value, where)
    if task == "regression":
        if first_text is not None:
            raise ValueError(f"{first_text[1]()}: label {first_text[0]!r} is not a number, and regression "
                             f"needs numeric labels")
        return LabelSpace(regression=True, reason="task regression")
    if task == "auto" and first_text is not None and first_number is not None:
        raise ValueError(
            f"the label column mixes numbers ({first_number[0]!r} at {first_number[1]()}) and text "
            f"({first_text[0]!r} at {first_text[1]()}); fix the stray value, or pass --task classification "
            f"if both are class names"
        )
    if task == "auto" and first_fraction is not None:
        return LabelSpace(regression=True, reason=f"task auto: label {first_fraction[0]!r} at {first_fraction[1]()} "
                                                  f"is not an integer; pass --task classification to override")
    keys = {_label_key(value) for value, _ in pairs}
    if len(keys) < 2:
        raise ValueError(
            f"the label column holds a single class ({next(iter(keys))!r}); classification needs at least 2 classes"
        )
    if all(_is_number(k) for k in keys):
        names = tuple(sorted(keys, key=float))
    else:
        names = tuple(sorted(keys))
    reason = f"task {task}" if task != "auto" else (
        "task auto: every label is an integer" if first_text is None else "task auto: the labels are text")
    return LabelSpace(regression=False, names=names, reason=reason)


def describe(labels: LabelSpace) -> str:
    """``regression`` or ``K classes``, and why (when inferred)."""
    what = "regression" if labels.regression else f"{labels.num_labels} classes"
    return f"{what} ({labels.reason})" if labels.reason else what


# ----------------------------------------------------------------------------- reading files


@dataclass
class Table:
    """The rows of a data file: column names, one dict per row, the line each row starts on."""

    columns: list[str]
    rows: list[dict]
    lines: list[int]


def _decode(path: Path, raw: bytes) -> str:
    """UTF-8 text (a leading BOM dropped); a decoding error names the file, line and byte."""
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw.count(b"\n", 0, error.start) + 1
        column = error.start - (raw.rfind(b"\n", 0, error.start) + 1) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[error.start]:02x} at column {column}); "
            f"save the file as UTF-8"
        ) from None


def _read_delimited(path: Path, text: str, delimiter: str) -> Table:
    # TSV: quoting off, a quote is text (GLUE-style TSVs are not quoted; `"the film" is great`
    # must neither lose its quotes nor swallow the next rows). CSV: RFC 4180 quoting.
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, quoting=quoting)
    header, rows, lines, start = None, [], [], 1
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as error:
            raise ValueError(f"{path}:{start}: {error}") from None
        if not record or (len(record) == 1 and not record[0].strip() and (header is None or len(header) > 1)):
            continue  # a blank line
        if header is None:
            header = record
            continue
        if len(record) != len(header):
            hint = ("a tab inside a field?" if delimiter == "\t" else
                    "an unbalanced quote joins lines: quote the field and double the quotes inside it")
            raise ValueError(f"{path}:{start}: {len(record)} fields where the header has {len(header)} "
                             f"({', '.join(header)}); {hint}")
        rows.append(dict(zip(header, record)))
        lines.append(start)
    return Table(header or [], rows, lines)


def _read_jsonl(path: Path, text: str) -> Table:
    rows, lines, columns = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object per line ({error})") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        columns.update(dict.fromkeys(row))
        rows.append(row)
        lines.append(number)
    return Table(list(columns), rows, lines)


def read_table(path) -> Table:
    """A CSV (``.csv``), TSV (``.tsv``/``.txt``, quoting off) or JSON lines (``.jsonl``/``.json``) file.

    Raises:
        SystemExit: the file does not exist. ValueError (naming file and line): unknown
            extension, text that is not UTF-8, a malformed JSON line, a CSV/TSV row whose
            number of fields differs from the header's.
    """
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".ndjson", ".csv", ".tsv", ".txt"):
        raise ValueError(f"unsupported data file extension {suffix!r} ({path}): use .csv, .tsv or .jsonl")
    text = _decode(path, path.read_bytes())
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path, text)
    return _read_delimited(path, text, "," if suffix == ".csv" else "\t")


def read_rows(path) -> list[dict]:
    """The rows of ``read_table(path)``, one dict per row."""
    return read_table(path).rows


def _need_column(table: Table, path, column: str, what: str) -> str:
    if column not in table.columns:
        raise ValueError(f"{what} column {column!r} not found in {path}; available columns: {', '.join(table.columns)}")
    return column


def text_columns(table: Table, path, text_column: str | None = None,
                 text_pair_column: str | None = None) -> tuple[str, str | None]:
    """(text column, text pair column or None) of ``table``, as ``load_examples`` documents.

    Raises:
        ValueError: a named or required column is missing (the message lists the available ones).
    """
    if text_column is None:
        found = [c for c in DEFAULT_TEXT_COLUMNS if c in table.columns]
        if not found:
            raise ValueError(
                f"no text column in {path} (tried {', '.join(DEFAULT_TEXT_COLUMNS)}); pass --text-column; "
                f"available columns: {', '.join(table.columns)}"
            )
        text_column = found[0]
        if text_pair_column is None:
            pair = [c for c in DEFAULT_PAIR_COLUMNS if c in table.columns]
            text_pair_column = pair[0] if pair else None
    _need_column(table, path, text_column, "text")
    if text_pair_column is not None:
        _need_column(table, path, text_pair_column, "text pair")
    return text_column, text_pair_column


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
            ones), the file has no examples, or a row lacks its label or has a non-finite one
            (the message names file and line); see ``read_table`` for format errors.
    """
    table = read_table(path)
    if not table.rows:
        raise ValueError(f"the dataset {path} is empty (columns: {', '.join(table.columns) or 'none'})")
    text_column, text_pair_column = text_columns(table, path, text_column, text_pair_column)
    label_column = _need_column(table, path, label_column or DEFAULT_LABEL_COLUMN, "label")

    texts, pairs, labels = [], [] if text_pair_column else None, []
    for row, line in zip(table.rows, table.lines):
        label = row.get(label_column)
        check_label(label, f"{path}:{line}", label_column)
        texts.append("" if row.get(text_column) is None else str(row[text_column]))
        if pairs is not None:
            pairs.append("" if row.get(text_pair_column) is None else str(row[text_pair_column]))
        labels.append(label)
    return Examples(texts, pairs, labels, str(path), list(table.lines))


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
    targets = labels.encode(examples.labels, examples.where)  # label errors before the tokenizer's work
    batch = tokenizer(
        examples.texts, examples.pairs, padding="max_length", truncation=True, max_length=max_length,
        return_tensors="pt",
    )
    ids = batch["input_ids"]
    types = batch.get("token_type_ids")
    if types is None:
        types = torch.zeros_like(ids)
    return TensorDataset(ids, batch["attention_mask"], types, targets)


def check_tokenizer_fits(tokenizer, examples: Examples, model_dir, sample: int = 64) -> None:
    """Raise ValueError when the tokenizer maps every word of the first ``sample`` texts to unknown.

    A model folder without its vocabulary loads a tokenizer that knows only the special tokens;
    training on its all-[UNK] input "works" and learns nothing.
    """
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None or not len(examples):
        return
    ids = tokenizer(examples.texts[:sample], add_special_tokens=False)["input_ids"]
    flat = [i for seq in ids for i in seq]
    if flat and all(i == unk for i in flat):
        raise ValueError(
            f"the tokenizer of {model_dir} maps every word of the first {min(sample, len(examples))} examples "
            f"to {tokenizer.unk_token}: its vocabulary is missing or does not belong to this model"
        )


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
