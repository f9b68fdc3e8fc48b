"""Labelled examples: reading them from a table, the label space, splits, tokenisation.

Classification or regression is decided by the whole label column (``infer_label_space``), or
by ``task="classification"|"regression"``; every label is present and, if numeric, finite.
torch is imported only where tensors are made (``LabelSpace.encode``, ``encode``), so the
command line's checks load none.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from powerbert.inputs.text_budget import bound_texts
from powerbert.inputs.tables import DEFAULT_LABEL_COLUMN, need_column, read_table, text_columns, texts_of

TASKS = ("auto", "classification", "regression")


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

    def encode(self, labels, where=None) -> "torch.Tensor":
        """``[M]`` float32 (regression) or int64 class ids; ``where(i)`` names example i in errors."""
        import torch  # here, not at module import: the CLI's checks use this module

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
    text_columns(table, path, text_column, text_pair_column)  # a missing text column before the labels
    label_column = need_column(table, path, label_column or DEFAULT_LABEL_COLUMN, "label")
    labels = []
    for row, line in zip(table.rows, table.lines):
        label = row.get(label_column)
        check_label(label, f"{path}:{line}", label_column)
        labels.append(label)
    corpus = texts_of(table, path, text_column, text_pair_column, strict=False)
    return Examples(corpus.texts, corpus.pairs, labels, str(path), list(table.lines))


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


def encode(examples: Examples, tokenizer, labels: LabelSpace, max_length: int):
    """Tokenise, padded and truncated to ``max_length`` (the paper's fixed N).

    Returns:
        ``TensorDataset(input_ids [M, N], attention_mask [M, N], token_type_ids [M, N], targets [M])``;
        token_type_ids are zeros when the tokenizer gives none.
    """
    import torch
    from torch.utils.data import TensorDataset

    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 ([CLS] plus at least one token), got {max_length}")
    targets = labels.encode(examples.labels, examples.where)  # label errors before the tokenizer's work
    batch = tokenizer(  # each text bounded first (text_budget: a huge pair would exhaust memory)
        bound_texts(examples.texts, max_length), bound_texts(examples.pairs, max_length), padding="max_length",
        truncation=True, max_length=max_length, return_tensors="pt",
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
