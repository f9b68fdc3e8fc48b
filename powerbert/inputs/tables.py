"""Tables of texts and labels: local CSV, TSV (or ``.txt``) and JSONL files, read strictly.

Every error names the file and line: text must be UTF-8, every CSV/TSV row has the header's
number of fields. TSV is read with quoting off, as GLUE-style TSVs carry quotes as text; CSV
follows RFC 4180 quoting. Fields may be any size (Python's csv module stops at 128 KB by
default). ``texts_of`` is the one reader of texts from a table (``read_texts`` for ``predict`` and
``calibrate``, labelled examples for training).
No torch here.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_TEXT_COLUMNS = ("text", "sentence", "sentence1", "question", "premise")
DEFAULT_PAIR_COLUMNS = ("text_pair", "sentence2", "hypothesis")
DEFAULT_LABEL_COLUMN = "label"
# csv.field_size_limit takes a C long: sys.maxsize overflows it on Windows (32-bit long).
BAD_ROWS_SHOWN = 5  # bad rows named in read_texts' error
CSV_FIELD_LIMIT = min(sys.maxsize, 2**31 - 1)


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
            duplicate = _first_duplicate(header)
            if duplicate is not None:  # a dict per row would keep the last such column only
                raise ValueError(f"{path}:{start}: the header names column {duplicate!r} twice; "
                                 f"rename one of them")
            continue
        if len(record) != len(header):
            hint = ("a tab inside a field?" if delimiter == "\t" else
                    "an unbalanced quote joins lines: quote the field and double the quotes inside it")
            raise ValueError(f"{path}:{start}: {len(record)} fields where the header has {len(header)} "
                             f"({', '.join(header)}); {hint}")
        rows.append(dict(zip(header, record)))
        lines.append(start)
    return Table(header or [], rows, lines)


def _first_duplicate(names) -> str | None:
    """The first name that appears a second time in ``names``, or None."""
    seen = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


class _DuplicateKey(ValueError):
    """A JSON object naming a key twice (``json.loads`` would keep the last value silently)."""


def _object_once(pairs: list) -> dict:
    duplicate = _first_duplicate(key for key, _ in pairs)
    if duplicate is not None:
        raise _DuplicateKey(duplicate)
    return dict(pairs)


def _read_jsonl(path: Path, text: str) -> Table:
    rows, lines, columns = [], [], {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line, object_pairs_hook=_object_once)
        except _DuplicateKey as error:
            raise ValueError(f"{path}:{number}: the object names key {error.args[0]!r} twice; "
                             f"rename one of them") from None
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
            extension, text that is not UTF-8, a malformed JSON line, a CSV/TSV header or a
            JSON object that names a column twice, a CSV/TSV row whose number of fields differs
            from the header's.
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


def need_column(table: Table, path, column: str, what: str) -> str:
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
    need_column(table, path, text_column, "text")
    if text_pair_column is not None:
        need_column(table, path, text_pair_column, "text pair")
    return text_column, text_pair_column


# ----------------------------------------------------------------------------- texts


@dataclass
class Corpus:
    """The rows to predict: texts, optional second texts, the line each row starts on."""

    texts: list[str]
    pairs: list[str] | None
    lines: list[int]
    source: str
    text_column: str = "text"

    def __len__(self) -> int:
        return len(self.texts)


def read_texts(path, text_column: str | None = None, text_pair_column: str | None = None, *,
               pairs: bool = True) -> Corpus:
    """The texts of a CSV/TSV/JSONL file: the one reader of texts from a file (``predict``, ``calibrate``;
    training reads its labelled examples with ``texts_of`` on the same table).

    Columns as ``text_columns`` chooses them (no label needed); ``pairs=False`` reads the text
    column only, never a pair column. A file without rows is a ValueError; see ``texts_of`` for
    the rows.
    """
    table = read_table(path)
    if not table.rows:
        raise ValueError(f"the data file {path} holds no rows (columns: {', '.join(table.columns) or 'none'})")
    return texts_of(table, path, text_column, text_pair_column, pairs=pairs)


def texts_of(table: Table, path, text_column: str | None = None, text_pair_column: str | None = None, *,
             pairs: bool = True, strict: bool = True) -> Corpus:
    """The texts of ``table`` (read from ``path``), one per row, in order.

    ``strict`` (predict, calibrate): a row whose text (or text pair) is missing, null or not a
    string is bad; every bad row is counted and the first ones are named ``file:line`` in one
    ValueError. Not ``strict`` (training, whose labels come from the same rows): a missing or
    null text is ``""`` and any other value its ``str``. An empty string is a text (the model
    sees [CLS] [SEP]).
    """
    if not pairs:
        text_column = text_columns(table, path, text_column, None)[0] if text_column is None else need_column(
            table, path, text_column, "text")
        text_pair_column = None
    else:
        text_column, text_pair_column = text_columns(table, path, text_column, text_pair_column)
    columns = [text_column] + ([text_pair_column] if text_pair_column else [])
    values: dict[str, list[str]] = {column: [] for column in columns}
    bad = []
    for row, line in zip(table.rows, table.lines):
        for column in columns:
            value = row.get(column)
            if isinstance(value, str) or not strict:
                values[column].append(value if isinstance(value, str) else "" if value is None else str(value))
                continue
            what = "no value" if value is None else f"a {type(value).__name__} ({json.dumps(value)[:40]})"
            bad.append(f"{path}:{line}: {what} in text column {column!r}")
            break
    if bad:
        more = f"; {len(bad)} bad rows in all: {', '.join(b.split(': ')[0] for b in bad[1:BAD_ROWS_SHOWN])}" + (
            ", ..." if len(bad) > BAD_ROWS_SHOWN else "") if len(bad) > 1 else ""
        raise ValueError(f"{bad[0]}, expected text{more}; fix or drop these rows")
    return Corpus(values[text_column], values[text_pair_column] if text_pair_column else None, list(table.lines),
                  str(path), text_column)
