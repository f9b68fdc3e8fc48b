"""The three-step PoWER-BERT pipeline (ALGORITHM.md §4) as a Python API.

    from powerbert.pipeline import PipelineConfig, run
    metrics = run(PipelineConfig(model="path/to/bert", data="train.csv", output="out"))

Steps, each writing ``<output>/<step>/`` (the model via ``save_pretrained``, its tokenizer, a
``settings.json`` with the step's cache key and a ``done.json`` marker with the step's record):

1. ``finetune``: the pretrained model on the task at ``lr_bert``; the best dev checkpoint is kept.
2. ``search``: soft extract attached (``soft_extract.py``), the whole model trained with AdamW,
   the retention vectors at ``lr_soft`` and everything else at ``lr_bert``, 10% linear warm-up
   then linear decay, loss = task loss + lambda * sum_l l * mass(l). The configuration is read
   off the *final* retention vectors, and the final weights are kept (the search has no dev
   criterion that weighs the regulariser against accuracy; the paper keeps the last state too).
3. ``retrain``: the search weights patched with the learned configuration (hard extraction,
   ``powerbert.patch``) and trained at ``lr_bert``; the best dev checkpoint is kept (the
   untrained patched model counts as epoch 0).

``export`` then copies the re-trained model to ``<output>/`` and writes ``metrics.json``.

Validation first: ``preflight`` checks every setting (finite, in range), the output folder (not
a file, not the model folder), the model folder (config, supported architecture, weights,
tokenizer files, N within its positions) and the data (format, finite labels, classification
or regression from the whole label column) before any training, and raises ValueError or
SystemExit with a one-line message.

Cache: each step's key is the settings that shaped it (content hashes of the data, dev data
and model weights; columns, task, N, learning rates, epochs, lambda, seed, ...) plus the digest
of the previous step's key. A rerun skips a finished step whose key matches and resumes an
interrupted one from the ``checkpoint.pt`` it writes after every epoch (model, retention
vectors, optimiser, scheduler). A step whose key differs stops the run with a message naming
the changed settings, unless ``overwrite`` is set: then that step and the later ones (and the
exported model and ``metrics.json``) are removed and recomputed. Step folders written before
keys existed are reused with a warning.

Learning rates: with Adam a parameter moves by about lr per step whatever its gradient's size,
so r can travel from 1 to 0 only if lr_soft * steps is large enough. ``lr_soft=None`` takes
``default_lr_soft(search_steps)``, 3 / steps (the warm-up/decay schedule averages half the peak
rate, so r can travel about 1.5) bounded to [1e-3, 0.05]; see that function for why.

``target_speedup`` (instead of ``lam``): ``find_lambda`` bisects log10(lambda) over
[1e-5, 1e-1] (``target_trials`` trials). Each trial runs a one-epoch search on a seeded subset
of ``target_subset`` training examples from the fine-tuned weights (at ``trial_lr_soft``: the
full search's travel of r in the trial's fewer steps), reads the configuration and its vector
ratio (``powerbert.vector_ratio``); a ratio below the target raises lambda, above it lowers
lambda. The lambda whose trial ratio came closest (in log ratio) is used for the full search,
so the final ratio is only about the target: the full search trains longer on more data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import math
import numbers
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

import powerbert
from powerbert import data as D
from powerbert.families import FAMILIES, resolve
from powerbert.patch import CONFIG_KEY
from powerbert.soft_extract import attach_soft_extract

log = logging.getLogger("powerbert")

STEPS = ("finetune", "search", "retrain")
DONE = "done.json"
KEY = "settings.json"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
MAX_LENGTH_KEY = "powerbert_max_length"


# The learning rate of the retention vectors when none is given: 3 / search steps, so that
# r can travel about 1.5 over the warm-up/decay schedule (which averages half the peak rate),
# bounded to [LR_SOFT_MIN, LR_SOFT_MAX]. Adam moves r by about lr per step whatever the size of
# its gradient, so lambda acts through the *sign* of the gradient summed over many steps: a rate
# near 1 (3 / steps on a few hundred examples) saturates r at 0 or 1 within a step or two and
# lambda stops mattering (1e-6 and 1e-3 gave the same configuration). The cap 0.05 leaves at
# least 20 peak-rate steps between r = 1 and r = 0; it is 15x the paper's largest LR_SOFT
# (2e-4 .. 3e-3 over thousands of steps, ALGORITHM.md §4) and above the 0.024 / 0.034 that the
# reproduce study's 88-125 search steps gave. The floor 1e-3 is within the paper's range.
# On a small data set the cap leaves r near 1, and a warning says that the search had too few
# steps to learn a configuration (rather than hiding it behind a saturated one).
LR_SOFT_MIN = 1e-3
LR_SOFT_MAX = 0.05
# A user-given lr_soft above this saturates r at 0 or 1 in a few steps (a warning says so).
LR_SOFT_SATURATES = 0.1
# The lambda trials of target_speedup compress the full search's travel of r into a few steps
# (find_lambda); 0.5 is the most the reproduce study's trials used, and their ratios still
# followed lambda monotonically there.
LR_SOFT_TRIAL_MAX = 0.5
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def default_lr_soft(steps: int) -> float:
    """``lr_soft`` for a search of ``steps`` optimiser steps: 3 / steps within [1e-3, 0.05]."""
    return min(LR_SOFT_MAX, max(LR_SOFT_MIN, 3.0 / max(1, steps)))


@dataclass
class PipelineConfig:
    """Every setting of a pipeline run (the CLI flags map one to one).

    ``task``: ``"auto"`` (the whole label column decides, ``data.infer_label_space``),
    ``"classification"`` or ``"regression"``. ``overwrite``: recompute steps whose cached
    settings differ instead of stopping (see the module docstring).
    """

    data: str
    output: str
    model: str | None = None  # pretrained HF folder (needed by finetune)
    dev: str | None = None
    dev_fraction: float = 0.1
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    task: str = "auto"
    max_length: int = 64
    epochs: int = 3
    finetune_epochs: int | None = None
    search_epochs: int | None = None
    retrain_epochs: int | None = None
    batch_size: int = 32
    lr_bert: float = 3e-5
    lr_soft: float | None = None
    lam: float | None = 1e-3
    target_speedup: float | None = None
    target_trials: int = 5
    target_subset: int = 512
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    def epochs_for(self, step: str) -> int:
        value = getattr(self, f"{step}_epochs")
        return self.epochs if value is None else value

    def check(self) -> None:
        """Raise ValueError naming the first bad setting and its accepted range."""

        def number(name, value, low, *, low_open=False, high=None, high_open=False, optional=False):
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            if value < low or (low_open and value == low) or (high is not None and (
                    value > high or (high_open and value == high))):
                bounds = f"{'(' if low_open else '['}{low:g}, {'inf' if high is None else f'{high:g}'}" \
                         f"{')' if high_open or high is None else ']'}"
                raise ValueError(f"{name} must be in {bounds}, got {value!r}")

        def integer(name, value, low, optional=False, high=None):
            if value is None and optional:
                return
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low or (
                    high and value > high):
                raise ValueError(f"{name} must be an int >= {low}{f' and <= {high}' if high else ''}, got {value!r}")

        integer("max_length", self.max_length, 2)
        integer("epochs", self.epochs, 1)
        integer("batch_size", self.batch_size, 1)
        for step in STEPS:
            integer(f"{step}_epochs", getattr(self, f"{step}_epochs"), 0, optional=True)
        integer("target_trials", self.target_trials, 1)
        integer("target_subset", self.target_subset, 1)
        integer("max_train_examples", self.max_train_examples, 1, optional=True)
        integer("max_dev_examples", self.max_dev_examples, 1, optional=True)
        integer("seed", self.seed, 0, high=2**32 - 1)  # numpy's seed range
        if self.dev is None:
            number("dev_fraction", self.dev_fraction, 0, low_open=True, high=1, high_open=True)
        number("lr_bert", self.lr_bert, 0, low_open=True)
        number("lr_soft", self.lr_soft, 0, low_open=True, optional=True)
        number("target_speedup", self.target_speedup, 1, optional=True)
        if self.target_speedup is None:
            if self.lam is None:
                raise ValueError("give lambda (lam) or target_speedup")
            number("lambda", self.lam, 0)
        number("warmup", self.warmup, 0, high=1, high_open=True)
        number("weight_decay", self.weight_decay, 0)
        number("max_grad_norm", self.max_grad_norm, 0)
        if self.task not in D.TASKS:
            raise ValueError(f"task must be one of {', '.join(D.TASKS)}, got {self.task!r}")
        if not self.data:
            raise ValueError("no data file given")
        if not self.output:
            raise ValueError("no output folder given")


# ----------------------------------------------------------------------------- model folders


def supported_model_types() -> list[str]:
    return [t for family in FAMILIES for t in family.model_types]


def read_model_config(path) -> dict:
    """``config.json`` of a model folder as a dict (SystemExit / ValueError with a one-line message)."""
    if path is None:
        raise SystemExit("no model folder given: pass --model DIR (a local Hugging Face model folder)")
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"model folder not found: {path}")
    file = path / "config.json"
    if not file.is_file():
        raise SystemExit(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise ValueError(f"{file} is not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a {type(config).__name__}, not a model configuration")
    return config


def max_positions(config: dict) -> int | None:
    """Input length N a model accepts: ``max_position_embeddings``, less RoBERTa's offset.

    RoBERTa and XLM-R number positions from ``pad_token_id + 1`` (2 with their usual pad id 1),
    so 514 position embeddings hold 512 tokens.
    """
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        pad = config.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions


def check_model_dir(path, *, max_length: int | None = None, weights: bool = True, tokenizer: bool = True) -> Path:
    """Check a model folder before anything loads it; returns it as a Path.

    Checks: the folder and its ``config.json`` exist; its ``model_type`` is one powerbert
    supports; weights (``WEIGHT_FILES``) and tokenizer files (``VOCABULARY_FILES``, or any
    ``*.model``) are there; ``max_length`` fits its positions (``max_positions``).

    Raises:
        SystemExit (missing folder or config.json) or ValueError, each with a one-line message.
    """
    config = read_model_config(path)
    path = Path(path)
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise ValueError(f"powerbert does not support model_type {model_type!r} ({path / 'config.json'}); "
                         f"supported: {', '.join(supported_model_types())}")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ValueError(f"{path / 'config.json'} configures a decoder (is_decoder/add_cross_attention); "
                         f"PoWER-BERT elimination applies to bidirectional encoders only")
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{path} holds no model weights (none of {', '.join(WEIGHT_FILES)})")
    if tokenizer and not (any((path / name).is_file() for name in VOCABULARY_FILES) or any(path.glob("*.model"))):
        raise ValueError(f"{path} holds no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); "
                         f"copy the pretrained model's tokenizer files into it")
    limit = max_positions(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"max_length (--max-length) {max_length} exceeds the {limit} positions of the model "
                         f"in {path} (max_position_embeddings {config['max_position_embeddings']}); "
                         f"use at most {limit}")
    return path


def check_output(cfg: PipelineConfig) -> None:
    """``cfg.output`` must be a folder (or creatable as one) that is not the model folder.

    Steps write ``<output>/<step>/`` and the export copies the model into ``<output>/``, so
    neither may be ``cfg.model``; a folder holding some other model (a ``config.json`` but no
    step folders) is refused too, as the export would overwrite it.
    """
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} (--output) is a file, not a folder")
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"output {out} (--output) cannot be created: {parent} is a file")
            break
    if cfg.model is not None:
        model = Path(cfg.model).resolve()
        if model in [out.resolve()] + [(out / step).resolve() for step in STEPS]:
            raise ValueError(f"output {out} (--output) would overwrite the model folder {cfg.model} (--model); "
                             f"choose another output folder")
    if (out / "config.json").is_file() and not (out / METRICS).is_file() and not any(
            (out / step).is_dir() for step in STEPS):
        raise ValueError(f"output {out} (--output) holds a model that powerbert did not write (config.json "
                         f"without step folders); the export would overwrite it: choose another output folder")


# ----------------------------------------------------------------------------- step cache keys

_HASHES: dict[tuple, str] = {}


def _sha256(path) -> str:
    """Content hash of a file, memoised per (path, size, mtime) for this process."""
    path = Path(path).resolve()
    stat = path.stat()
    memo = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo not in _HASHES:
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        _HASHES[memo] = digest.hexdigest()
    return _HASHES[memo]


def _model_fingerprint(path) -> dict:
    """Content hashes of a model folder's config and weights (its tokenizer is checked separately)."""
    path = Path(path)
    weights = sorted(p for p in path.iterdir() if p.is_file() and (
        p.suffix in (".safetensors", ".bin") or p.name.endswith(".index.json")))
    digest = hashlib.sha256()
    for file in weights:
        digest.update(f"{file.name}:{_sha256(file)}\n".encode())
    return {"config_sha256": _sha256(path / "config.json"), "weights_sha256": digest.hexdigest()}


def step_settings(cfg: PipelineConfig, step: str) -> dict:
    """The settings that shape ``step``'s result (its cache key, less the previous step's digest)."""
    settings = {
        "data_sha256": _sha256(cfg.data),
        "dev_sha256": None if cfg.dev is None else _sha256(cfg.dev),
        "dev_fraction": None if cfg.dev is not None else cfg.dev_fraction,
        "text_column": cfg.text_column, "text_pair_column": cfg.text_pair_column,
        "label_column": cfg.label_column, "task": cfg.task, "max_length": cfg.max_length,
        "max_train_examples": cfg.max_train_examples, "max_dev_examples": cfg.max_dev_examples,
        "batch_size": cfg.batch_size, "lr_bert": cfg.lr_bert, "warmup": cfg.warmup,
        "weight_decay": cfg.weight_decay, "max_grad_norm": cfg.max_grad_norm, "seed": cfg.seed,
        f"{step}_epochs": cfg.epochs_for(step),
    }
    if step == "finetune":
        settings["model_fingerprint"] = _model_fingerprint(cfg.model)
    if step == "search":
        target = cfg.target_speedup is not None
        settings.update({
            "lambda": None if target else cfg.lam, "target_speedup": cfg.target_speedup,
            "target_trials": cfg.target_trials if target else None,
            "target_subset": cfg.target_subset if target else None,
            "lr_soft": cfg.lr_soft,  # None: default_lr_soft of the (keyed) data size
        })
    return settings


def _digest(key: dict | None) -> str:
    if key is None:
        return "unrecorded"  # a step folder written before keys existed
    text = json.dumps({"settings": key["settings"], "previous": key["previous"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make_key(cfg: PipelineConfig, step: str, previous: str | None) -> dict:
    files = {"data": str(cfg.data), "dev": cfg.dev}
    if step == "finetune":
        files["model"] = str(cfg.model)
    return {"step": step, "settings": step_settings(cfg, step), "previous": previous, "files": files}


def _same(a: dict, b: dict) -> bool:
    return a["settings"] == b["settings"] and a["previous"] == b["previous"]


def _read_key(step_dir: Path) -> dict | None:
    file = step_dir / KEY
    return json.loads(file.read_text()) if file.is_file() else None


def _has_state(step_dir: Path) -> bool:
    return any((step_dir / name).exists() for name in (DONE, CHECKPOINT, "lambda.json"))


def _short(name: str, value) -> str:
    if isinstance(value, str) and name.endswith("sha256"):
        return value[:12]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_short(k, v)}" for k, v in value.items()) + "}"
    return repr(value)


def _changes(old: dict, new: dict) -> str:
    parts = []
    for name in list(new["settings"]) + [n for n in old["settings"] if n not in new["settings"]]:
        a, b = old["settings"].get(name, "unset"), new["settings"].get(name, "unset")
        if a != b:
            label = {"data_sha256": "data content", "dev_sha256": "dev data content"}.get(name, name)
            if name == "model_fingerprint":
                parts.append("model weights or config" + ("" if old["files"].get("model") == new["files"].get("model")
                                                          else f" ({old['files'].get('model')} -> {new['files'].get('model')})"))
            else:
                parts.append(f"{label} {_short(name, a)} -> {_short(name, b)}")
    if old["previous"] != new["previous"]:
        parts.append(f"the {STEPS[STEPS.index(new['step']) - 1]} step it started from")
    return ", ".join(parts)


def _stale_message(cfg: PipelineConfig, step: str, recorded: dict, key: dict) -> str:
    later = STEPS[STEPS.index(step) + 1:]
    return (f"{_step_dir(cfg, step)} was made with other settings ({_changes(recorded, key)}); use a new "
            f"--output, or pass --overwrite to recompute {' and '.join((step,) + later)}")


def _expected_keys(cfg: PipelineConfig, steps) -> dict[str, dict]:
    """The key each of ``steps`` (consecutive, in order) will have; the first step after
    ``finetune`` chains to the recorded key of the step before it, which must have finished."""
    keys, previous = {}, None
    for step in steps:
        if not keys and step != "finetune":
            before = STEPS[STEPS.index(step) - 1]
            _need_done(cfg, before)
            previous = _digest(_read_key(_step_dir(cfg, before)))
        key = _make_key(cfg, step, previous)
        keys[step] = key
        step_dir = _step_dir(cfg, step)
        legacy = _read_key(step_dir) is None and _has_state(step_dir)
        previous = _digest(None if legacy else key)
    return keys


def _stale_step(cfg: PipelineConfig, keys: dict[str, dict]) -> tuple[str, dict, dict] | None:
    """The first step whose recorded key differs from its expected one: (step, recorded, expected)."""
    for step, key in keys.items():
        recorded = _read_key(_step_dir(cfg, step))
        if recorded is not None and not _same(recorded, key):
            return step, recorded, key
    return None


def _discard(cfg: PipelineConfig, step: str) -> None:
    """``overwrite``: remove ``step``, the later steps, the exported model and metrics.json."""
    out = Path(cfg.output)
    (out / METRICS).unlink(missing_ok=True)
    retrained = _step_dir(cfg, "retrain")
    if retrained.is_dir():
        for item in retrained.iterdir():
            if item.is_file() and item.name not in (DONE, CHECKPOINT, KEY) and (out / item.name).is_file():
                (out / item.name).unlink()
    for later in STEPS[STEPS.index(step):]:
        step_dir = _step_dir(cfg, later)
        if step_dir.is_symlink():
            step_dir.unlink()
        elif step_dir.is_dir():
            shutil.rmtree(step_dir)
    log.warning("overwrite: removed %s and the later steps (made with other settings); recomputing",
                _step_dir(cfg, step))


def _begin_step(cfg: PipelineConfig, step: str, key: dict) -> tuple[Path, dict | None]:
    """(step folder, the record of a finished step to reuse or None); writes the key of a new step."""
    step_dir = _step_dir(cfg, step)
    recorded = _read_key(step_dir)
    if recorded is not None and not _same(recorded, key):
        raise ValueError(_stale_message(cfg, step, recorded, key))
    if recorded is None and _has_state(step_dir):
        log.warning("%s: %s was written before powerbert recorded step settings; reusing it unverified "
                    "(delete it to recompute)", step, step_dir)
    done = _read_done(step_dir)
    if done is not None:
        log.info("%s: already done with these settings (%s), skipping", step, step_dir / DONE)
        return step_dir, done
    step_dir.mkdir(parents=True, exist_ok=True)
    if recorded is None and not _has_state(step_dir):
        _write_json(step_dir / KEY, key)
    return step_dir, None


def preflight(cfg: PipelineConfig, steps=STEPS) -> dict[str, dict]:
    """Validate everything ``steps`` need before any training; returns each step's cache key.

    Checks the settings (``cfg.check``), the output folder (``check_output``), the model folder
    (``check_model_dir``: ``cfg.model`` for finetune, else the previous step's folder), the data
    (format, labels, the label space of the whole column), the tokenizer against the data, and
    the cache: a finished or started step whose key differs raises unless ``cfg.overwrite``.
    Nothing is written.

    Raises:
        ValueError or SystemExit with a one-line message.
    """
    steps = tuple(steps)
    cfg.check()
    check_output(cfg)
    first = steps[0]
    if first == "finetune":
        model_dir = check_model_dir(cfg.model, max_length=cfg.max_length)
    else:
        before = STEPS[STEPS.index(first) - 1]
        _need_done(cfg, before)
        model_dir = check_model_dir(_step_dir(cfg, before), max_length=cfg.max_length)
    train, dev = _load_data(cfg)
    if first == "finetune":
        D.infer_label_space([train] + ([] if dev is None else [dev]), cfg.task)
        D.check_tokenizer_fits(load_tokenizer(model_dir), train, model_dir)
    keys = _expected_keys(cfg, steps)
    stale = _stale_step(cfg, keys)
    if stale is not None and not cfg.overwrite:
        raise ValueError(_stale_message(cfg, *stale))
    return keys


def _prepare(cfg: PipelineConfig, steps) -> dict[str, dict]:
    """``preflight``, then (``overwrite``) discard the first stale step and the later ones."""
    keys = preflight(cfg, steps)
    stale = _stale_step(cfg, keys)
    if stale is not None:
        _discard(cfg, stale[0])
    return keys


# ----------------------------------------------------------------------------- helpers



def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def label_space_from_config(config) -> D.LabelSpace:
    if getattr(config, "problem_type", None) == "regression":
        return D.LabelSpace(regression=True)
    return D.LabelSpace(regression=False, names=tuple(config.id2label[i] for i in range(config.num_labels)))




def load_model(path, labels: D.LabelSpace | None = None, max_length: int | None = None):
    """A sequence-classification model from a local folder (offline), configured for ``labels``.

    Raises:
        ValueError: the folder fails ``check_model_dir``, cannot be loaded, or holds a model
            powerbert does not support (one-line messages).
    """
    from transformers import AutoModelForSequenceClassification

    path = check_model_dir(path, tokenizer=False)
    kwargs = {"local_files_only": True}
    if labels is not None:
        kwargs["num_labels"] = labels.num_labels
        kwargs["problem_type"] = "regression" if labels.regression else "single_label_classification"
        kwargs["ignore_mismatched_sizes"] = True  # a checkpoint's head for another label set is re-initialised
        if not labels.regression:
            kwargs["id2label"] = dict(enumerate(labels.names))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels.names)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load the model in {path}: {_one_line(error)}") from None
    try:
        resolve(model)  # fail early, with the list of supported models
    except TypeError as error:
        raise ValueError(f"{path}: {error}") from None
    if max_length is not None:
        setattr(model.config, MAX_LENGTH_KEY, max_length)
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer

    path = check_model_dir(path, weights=False)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load the tokenizer in {path}: {_one_line(error)}") from None


def _one_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


@dataclass
class Task:
    labels: D.LabelSpace
    tokenizer: object
    train: TensorDataset
    dev: TensorDataset


def _load_data(cfg: PipelineConfig) -> tuple[D.Examples, D.Examples | None]:
    """(the whole --data file, the --dev file or None), checked row by row."""
    train = D.load_examples(cfg.data, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    dev = None
    if cfg.dev is not None:
        dev = D.load_examples(cfg.dev, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    return train, dev


def prepare_task(cfg: PipelineConfig, tokenizer, labels: D.LabelSpace | None = None) -> Task:
    """Load, split, subsample and tokenise the task data (deterministic given ``cfg.seed``).

    ``labels`` None: inferred from the whole label column of the data and dev files
    (``cfg.task``), before any split or subset, so a subset never decides the task.
    """
    train, dev = _load_data(cfg)
    if labels is None:
        labels = D.infer_label_space([train] + ([] if dev is None else [dev]), cfg.task)
    if dev is None:
        train, dev = D.split_dev(train, cfg.dev_fraction, cfg.seed)
    train = D.take(train, cfg.max_train_examples, cfg.seed)
    dev = D.take(dev, cfg.max_dev_examples, cfg.seed)
    return Task(labels, tokenizer, D.encode(train, tokenizer, labels, cfg.max_length),
                D.encode(dev, tokenizer, labels, cfg.max_length))


def task_loss(logits: torch.Tensor, targets: torch.Tensor, labels: D.LabelSpace) -> torch.Tensor:
    if labels.regression:
        return F.mse_loss(logits.squeeze(-1), targets)
    return F.cross_entropy(logits, targets)


def _forward(model, batch):
    ids, mask, types, targets = batch
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in inspect.signature(model.forward).parameters:  # DistilBERT has none
        inputs["token_type_ids"] = types
    return model(**inputs).logits, targets


@torch.no_grad()
def evaluate_model(model, dataset: TensorDataset, labels: D.LabelSpace, batch_size: int = 64) -> dict:
    """Dev metrics: accuracy (classification) or Pearson r and MSE (regression), plus the loss."""
    was_training = model.training
    model.eval()
    outputs, targets, total = [], [], 0.0
    for batch in DataLoader(dataset, batch_size=batch_size):
        logits, y = _forward(model, batch)
        total += task_loss(logits, y, labels).item() * len(y)
        outputs.append(logits)
        targets.append(y)
    model.train(was_training)
    logits, y = torch.cat(outputs), torch.cat(targets)
    result = {"loss": total / len(y), "examples": len(y)}
    if labels.regression:
        pred = logits.squeeze(-1).double()
        yd = y.double()
        pearson = torch.corrcoef(torch.stack([pred, yd]))[0, 1].item()
        result.update(metric="pearson", value=0.0 if math.isnan(pearson) else pearson,
                      mse=F.mse_loss(pred, yd).item())
    else:
        result.update(metric="accuracy", value=(logits.argmax(-1) == y).double().mean().item())
    return result


def _model_sizes(config) -> tuple[int, int]:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim")
    return hidden, intermediate


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=2) + "\n")
    os.replace(tmp, path)  # atomic: an interrupt never leaves a half-written marker


def _read_done(step_dir: Path) -> dict | None:
    marker = step_dir / DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def _save(model, tokenizer, step_dir: Path) -> None:
    model.save_pretrained(step_dir)
    tokenizer.save_pretrained(step_dir)


# ----------------------------------------------------------------------------- training loop


def train_model(model, task: Task, cfg: PipelineConfig, *, step: str, step_dir: Path | None, epochs: int,
                soft=None, lam: float = 0.0, lr_soft: float | None = None, keep_best: bool = True,
                initial_eval: bool = False, tokenizer=None) -> dict:
    """Train ``model`` (optionally with a soft extract ``soft``) and checkpoint per epoch.

    Args:
        step: name for logs and progress bars.
        step_dir: where the best (``keep_best``) or final model and ``checkpoint.pt`` go; None
            trains in memory only (no saving, no resume; used by lambda trials).
        soft: a ``SoftExtract`` attached to ``model``, trained at ``lr_soft`` and projected
            onto [0, 1] after every optimiser step; adds ``lam * sum_l l * mass(l)`` to the loss.
        keep_best: save the model whenever the dev metric improves (else save the final one).
        initial_eval: evaluate before training; that state counts as a candidate (epoch 0).

    Returns:
        ``{"history": [per-epoch dev metrics], "best": {...} | None, "wall_s": seconds}``.
    """
    from transformers import get_linear_schedule_with_warmup

    start = time.perf_counter()
    loader_gen = torch.Generator()
    steps_per_epoch = math.ceil(len(task.train) / cfg.batch_size)
    total = max(1, steps_per_epoch * epochs)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.dim() < 2 else decay).append(p)  # no decay on biases and norms
    groups = [{"params": decay, "lr": cfg.lr_bert, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "lr": cfg.lr_bert, "weight_decay": 0.0}]
    if soft is not None:
        groups.append({"params": list(soft.parameters()), "lr": lr_soft, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup * total), total)

    history, best, first_epoch, elapsed_before = [], None, 1, 0.0
    checkpoint_path = None if step_dir is None else step_dir / CHECKPOINT
    if checkpoint_path is not None and checkpoint_path.is_file():
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        if soft is not None:
            soft.load_state_dict(state["soft"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, best, elapsed_before = state["history"], state["best"], state["elapsed"]
        first_epoch = state["epoch"] + 1
        torch.set_rng_state(state["rng"])
        log.info("%s: resuming after epoch %d from %s", step, state["epoch"], checkpoint_path)

    def record(epoch: int, loss: float | None) -> None:
        nonlocal best
        metrics = evaluate_model(model, task.dev, task.labels, cfg.batch_size * 2)
        entry = {"epoch": epoch, "train_loss": loss, "dev": metrics}
        if soft is not None:
            entry["masses"] = [round(m, 3) for m in soft.masses().tolist()]
            entry["configuration"] = list(soft.configuration())
        history.append(entry)
        extra = f" configuration {entry['configuration']}" if soft is not None else ""
        log.info("%s epoch %d: train loss %s, dev %s %.4f%s", step, epoch,
                 "-" if loss is None else f"{loss:.4f}", metrics["metric"], metrics["value"], extra)
        if keep_best and (best is None or metrics["value"] > best["value"]):
            best = {"epoch": epoch, **metrics}
            if step_dir is not None:
                _save(model, tokenizer, step_dir)

    if initial_eval and first_epoch == 1 and not history:
        record(0, None)
    model.train()
    for epoch in range(first_epoch, epochs + 1):
        loader_gen.manual_seed(cfg.seed * 1000 + epoch)  # the same order whether resumed or not
        loader = DataLoader(task.train, batch_size=cfg.batch_size, shuffle=True, generator=loader_gen)
        running, count = 0.0, 0
        bar = tqdm(loader, desc=f"{step} {epoch}/{epochs}", disable=not cfg.progress, leave=False)
        for batch in bar:
            logits, y = _forward(model, batch)
            loss = task_loss(logits, y, task.labels)
            objective = loss + soft.regularizer(lam) if soft is not None else loss
            if not torch.isfinite(objective):
                raise ValueError(
                    f"{step}: the training loss became {objective.item()} in epoch {epoch}; lower the learning "
                    f"rates (lr_bert {cfg.lr_bert:g}{'' if soft is None else f', lr_soft {lr_soft:g}'})"
                )
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            if soft is not None:
                soft.project_()
            scheduler.step()
            running += loss.item() * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{running / count:.4f}")
        bar.close()
        record(epoch, running / max(count, 1))
        model.train()
        if checkpoint_path is not None and epoch < epochs:
            torch.save({
                "epoch": epoch, "model": model.state_dict(),
                "soft": None if soft is None else soft.state_dict(),
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "history": history, "best": best, "rng": torch.get_rng_state(),
                "elapsed": elapsed_before + time.perf_counter() - start,
            }, checkpoint_path)
    model.eval()
    if step_dir is not None and (not keep_best or best is None):
        _save(model, tokenizer, step_dir)
    if checkpoint_path is not None and checkpoint_path.is_file():
        checkpoint_path.unlink()
    return {"history": history, "best": best, "wall_s": elapsed_before + time.perf_counter() - start}


# ----------------------------------------------------------------------------- steps


def _step_dir(cfg: PipelineConfig, step: str) -> Path:
    return Path(cfg.output) / step


def _need_done(cfg: PipelineConfig, step: str) -> dict:
    record = _read_done(_step_dir(cfg, step))
    if record is None:
        raise SystemExit(f"step '{step}' has not finished in {cfg.output}: run `powerbert {step}` first")
    return record


def finetune(cfg: PipelineConfig) -> dict:
    """Step 1: fine-tune ``cfg.model`` on the task; keeps the best dev checkpoint."""
    return _finetune(cfg, _prepare(cfg, ("finetune",))["finetune"])


def _finetune(cfg: PipelineConfig, key: dict) -> dict:
    step_dir, done = _begin_step(cfg, "finetune", key)
    if done is not None:
        return done
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = prepare_task(cfg, tokenizer)
    log.info("finetune: %d train / %d dev examples, %s, N = %d", len(task.train), len(task.dev),
             D.describe(task.labels), cfg.max_length)
    model = load_model(cfg.model, task.labels, cfg.max_length)
    result = train_model(model, task, cfg, step="finetune", step_dir=step_dir, epochs=cfg.epochs_for("finetune"),
                         tokenizer=tokenizer, initial_eval=cfg.epochs_for("finetune") == 0)
    record = {"step": "finetune", "train_examples": len(task.train), "dev_examples": len(task.dev), **result}
    _write_json(step_dir / DONE, record)
    return record


def _search_lr_soft(cfg: PipelineConfig, train_size: int, epochs: int) -> float:
    if cfg.lr_soft is not None:
        return cfg.lr_soft
    return default_lr_soft(math.ceil(train_size / cfg.batch_size) * epochs)


def trial_lr_soft(cfg: PipelineConfig, train_size: int, subset_size: int) -> float:
    """lr_soft of a one-epoch lambda trial on ``subset_size`` examples (see ``find_lambda``)."""
    epochs = max(1, cfg.epochs_for("search"))
    full_steps = math.ceil(train_size / cfg.batch_size) * epochs
    trial_steps = math.ceil(subset_size / cfg.batch_size)
    return min(LR_SOFT_TRIAL_MAX, _search_lr_soft(cfg, train_size, epochs) * full_steps / trial_steps)


def _lr_soft_warnings(cfg: PipelineConfig, train_size: int, epochs: int) -> list[str]:
    """Warnings about the retention vectors' learning rate, before the search runs."""
    steps = math.ceil(train_size / cfg.batch_size) * epochs
    lr_soft = _search_lr_soft(cfg, train_size, epochs)
    if cfg.lr_soft is not None and cfg.lr_soft > LR_SOFT_SATURATES:
        return [f"lr_soft {cfg.lr_soft:g} is above {LR_SOFT_SATURATES:g}: Adam moves the retention vectors by "
                f"about lr_soft per step, so a few steps push them to 0 or 1 and lambda's size barely "
                f"matters; leave lr_soft unset (default {default_lr_soft(steps):.3g} for {steps} steps)"]
    if cfg.lr_soft is None and steps and 3.0 / steps > LR_SOFT_MAX:
        return [f"the search has only {steps} optimiser steps: lr_soft is capped at {lr_soft:g}, so each "
                f"retention vector entry can fall by at most about {lr_soft * steps / 2:.2f}; the configuration "
                f"stays near N unless the search gets more data or epochs"]
    return []


def _soft_search(model, task: Task, cfg: PipelineConfig, lam: float, epochs: int, step_dir, tokenizer):
    """Attach soft extract, train, read the configuration off the final r, detach.

    Saving with the soft extract attached is exact: the retention vectors live outside the
    model and the replaced encoder forward is not part of the saved state.
    """
    soft = attach_soft_extract(model, cfg.max_length)
    lr_soft = _search_lr_soft(cfg, len(task.train), epochs)
    try:
        result = train_model(model, task, cfg, step="search", step_dir=step_dir, epochs=epochs, soft=soft,
                             lam=lam, lr_soft=lr_soft, keep_best=False, tokenizer=tokenizer)
        configuration = soft.configuration()
        vectors = soft.retention.detach().cpu()
    finally:
        soft.detach()
    return configuration, vectors, lr_soft, result


def find_lambda(cfg: PipelineConfig, task: Task, target: float, finetuned: Path) -> tuple[float, list[dict]]:
    """Bisect log10(lambda) in [-5, -1] so that a short search reaches about ``target``x vector ratio.

    See the module docstring for the method. Returns ``(lambda, trials)``.

    A trial is a proxy of the full search in fewer steps, so it runs at
    ``trial_lr_soft``: the full search's lr_soft times its steps over the trial's (the same
    total travel of r), at most ``LR_SOFT_TRIAL_MAX``. With the default lr_soft this is
    3 / trial steps, as before the default was bounded.
    """
    subset_size = min(cfg.target_subset, len(task.train))
    g = torch.Generator().manual_seed(cfg.seed + 7)
    subset = TensorDataset(*task.train[torch.randperm(len(task.train), generator=g)[:subset_size]])
    trial_task = Task(task.labels, task.tokenizer, subset, task.dev)
    trial_cfg = dataclasses.replace(cfg, progress=False,
                                    lr_soft=trial_lr_soft(cfg, len(task.train), subset_size))
    lo, hi = -5.0, -1.0
    trials, best = [], None
    for trial in range(cfg.target_trials):
        exponent = (lo + hi) / 2
        lam = 10.0 ** exponent
        seed_everything(cfg.seed + trial)
        model = load_model(finetuned)
        configuration, _, _, _ = _soft_search(model, trial_task, trial_cfg, lam, 1, None, None)
        ratio = powerbert.vector_ratio(configuration, cfg.max_length)
        trials.append({"lambda": lam, "configuration": list(configuration), "vector_ratio": ratio,
                       "lr_soft": trial_cfg.lr_soft})
        log.info("target speedup %.2fx: trial %d lambda %.3g -> %s, vector ratio %.2fx", target, trial + 1, lam,
                 list(configuration), ratio)
        distance = abs(math.log(ratio / target))
        if best is None or distance < best[0]:
            best = (distance, lam)
        if ratio < target:
            lo = exponent
        else:
            hi = exponent
    return best[1], trials




def search(cfg: PipelineConfig) -> dict:
    """Step 2: configuration search with soft extract from the fine-tuned weights."""
    return _search(cfg, _prepare(cfg, ("search",))["search"])


def _search(cfg: PipelineConfig, key: dict) -> dict:
    step_dir, done = _begin_step(cfg, "search", key)
    if done is not None:
        return done
    finetuned = _step_dir(cfg, "finetune")
    tokenizer = load_tokenizer(finetuned)
    base = load_model(finetuned)
    labels = label_space_from_config(base.config)
    task = prepare_task(cfg, tokenizer, labels)
    epochs = cfg.epochs_for("search")
    warnings = _lr_soft_warnings(cfg, len(task.train), epochs)
    for warning in warnings:
        log.warning("search: %s", warning)
    trials, lambda_search_s = [], 0.0
    lam_file = step_dir / "lambda.json"  # a resumed search reuses the bisection's result
    if cfg.target_speedup is not None:
        if lam_file.is_file():
            saved = json.loads(lam_file.read_text())
            lam, trials, lambda_search_s = saved["lambda"], saved["trials"], saved["wall_s"]
        else:
            start = time.perf_counter()
            lam, trials = find_lambda(cfg, task, cfg.target_speedup, finetuned)
            lambda_search_s = time.perf_counter() - start
            _write_json(lam_file, {"lambda": lam, "trials": trials, "wall_s": lambda_search_s})
    else:
        lam = cfg.lam
    log.info("search: lambda %.3g, %d epochs, lr_bert %.3g, lr_soft %.3g", lam, epochs, cfg.lr_bert,
             _search_lr_soft(cfg, len(task.train), epochs))
    seed_everything(cfg.seed)
    configuration, vectors, lr_soft, result = _soft_search(base, task, cfg, lam, epochs, step_dir, tokenizer)
    _write_json(step_dir / "retention_vectors.json", {
        "configuration": list(configuration), "masses": vectors.sum(1).tolist(), "vectors": vectors.tolist(),
    })
    log.info("search: learned configuration %s (vector ratio %.2fx)", list(configuration),
             powerbert.vector_ratio(configuration, cfg.max_length))
    if all(k == 1 for k in configuration):
        warnings.append(
            f"the search ended with every layer at its minimum (k = 1, [CLS] alone): lambda {lam:.3g} outweighs "
            f"the task at lr_soft {lr_soft:.3g}; the re-trained model sees [CLS] only. Lower --lambda or "
            f"--target-speedup, or --lr-soft"
        )
        log.warning("search: %s", warnings[-1])
    record = {"step": "search", "lambda": lam, "lr_soft": lr_soft, "lambda_trials": trials,
              "configuration": list(configuration), **result, "lambda_search_s": lambda_search_s,
              "warnings": warnings}
    record["wall_s"] += lambda_search_s  # the step's wall time includes the lambda bisection
    _write_json(step_dir / DONE, record)
    return record


def retrain(cfg: PipelineConfig) -> dict:
    """Step 3: hard extraction with the learned configuration, trained from the search weights."""
    return _retrain(cfg, _prepare(cfg, ("retrain",))["retrain"])


def _retrain(cfg: PipelineConfig, key: dict) -> dict:
    step_dir, done = _begin_step(cfg, "retrain", key)
    if done is not None:
        return done
    configuration = _need_done(cfg, "search")["configuration"]
    searched = _step_dir(cfg, "search")
    tokenizer = load_tokenizer(searched)
    model = load_model(searched)
    labels = label_space_from_config(model.config)
    task = prepare_task(cfg, tokenizer, labels)
    powerbert.patch(model, configuration)
    seed_everything(cfg.seed)
    result = train_model(model, task, cfg, step="retrain", step_dir=step_dir, epochs=cfg.epochs_for("retrain"),
                         tokenizer=tokenizer, initial_eval=True)
    record = {"step": "retrain", "configuration": configuration, **result}
    _write_json(step_dir / DONE, record)
    return record


def export(cfg: PipelineConfig, records: dict | None = None) -> dict:
    """Copy the re-trained model to ``cfg.output`` and write ``metrics.json``; returns the metrics.

    ``metrics.json`` goes first (and comes back last), so it never sits beside a model it does
    not describe; its ``settings`` are those recorded by the steps (their keys), not ``cfg``.
    """
    output = Path(cfg.output)
    records = records or {step: _need_done(cfg, step) for step in STEPS}
    (output / METRICS).unlink(missing_ok=True)
    retrained = _step_dir(cfg, "retrain")
    for item in retrained.iterdir():
        if item.is_file() and item.name not in (DONE, CHECKPOINT, KEY):
            shutil.copy2(item, output / item.name)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output, local_files_only=True)
    configuration = list(getattr(config, CONFIG_KEY))
    n = getattr(config, MAX_LENGTH_KEY, None) or cfg.max_length
    hidden, intermediate = _model_sizes(config)

    def step_summary(record):
        return {
            "dev": [{"epoch": h["epoch"], **{k: h["dev"][k] for k in ("metric", "value", "loss")},
                     **({"configuration": h["configuration"]} if "configuration" in h else {})}
                    for h in record["history"]],
            "best": record.get("best"),
            "wall_s": round(record["wall_s"], 2),
            **({"lambda_search_s": round(record["lambda_search_s"], 2)} if record.get("lambda_search_s") else {}),
        }

    keys = {step: _read_key(_step_dir(cfg, step)) for step in STEPS}
    if all(key is not None for key in keys.values()):
        # one value per setting; {step: value} where the steps were run with different ones
        per_step: dict[str, dict] = {}
        for step, key in keys.items():
            for name, value in {**key["settings"], **key["files"]}.items():
                per_step.setdefault(name, {})[step] = value
        settings = {name: next(iter(values.values())) if len({json.dumps(v, sort_keys=True)
                                                              for v in values.values()}) == 1 else values
                    for name, values in per_step.items()}
    else:  # step folders from before keys were recorded: the settings of this call, unverified
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "overwrite")}
        settings["unverified"] = [step for step, key in keys.items() if key is None]
    metrics = {
        "configuration": configuration,
        "max_length": n,
        "num_layers": len(configuration),
        "vectors_kept": sum(min(k, n) for k in configuration),
        "vectors_total": len(configuration) * n,
        "vector_ratio": powerbert.vector_ratio(configuration, n),
        "flops_ideal": powerbert.flops_ideal(configuration, n, hidden, intermediate),
        "lambda": records["search"]["lambda"],
        "lr_soft": records["search"]["lr_soft"],
        "lambda_trials": records["search"].get("lambda_trials", []),
        "train_examples": records["finetune"].get("train_examples"),
        "dev_examples": records["finetune"].get("dev_examples"),
        "steps": {step: step_summary(records[step]) for step in STEPS},
        "wall_s_total": round(sum(records[step]["wall_s"] for step in STEPS), 2),
        "warnings": records["search"].get("warnings", []),
        "settings": settings,
    }
    _write_json(output / METRICS, metrics)
    return metrics


def run(cfg: PipelineConfig) -> dict:
    """All three steps (each skipped if done with the same settings), then ``export``.

    Everything is validated first (``preflight``); returns metrics.json's content.
    """
    keys = _prepare(cfg, STEPS)
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    records = {"finetune": _finetune(cfg, keys["finetune"]), "search": _search(cfg, keys["search"]),
               "retrain": _retrain(cfg, keys["retrain"])}
    return export(cfg, records)


def evaluate(model_dir, data, *, text_column=None, text_pair_column=None, label_column=None,
             max_length: int | None = None, batch_size: int = 64, max_examples: int | None = None) -> dict:
    """Dev metric of a saved model on a data file; patched when its config holds a configuration.

    ``max_length`` None: the N the model was trained at (``powerbert_max_length``), else 128
    or the model's positions if fewer. Raises ValueError/SystemExit (one line) on bad input.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                   or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 ([CLS] plus one token), got {max_length!r}")
    check_model_dir(model_dir, max_length=max_length)
    config = read_model_config(model_dir)
    if max_length is None:
        limit = max_positions(config) or 128
        max_length = config.get(MAX_LENGTH_KEY) or min(128, limit)
    examples = D.take(D.load_examples(data, text_column, text_pair_column, label_column), max_examples, 0)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    labels = label_space_from_config(model.config)
    dataset = D.encode(examples, tokenizer, labels, max_length)
    configuration = getattr(model.config, CONFIG_KEY, None)
    if configuration is not None:
        powerbert.patch(model)
    start = time.perf_counter()
    metrics = evaluate_model(model, dataset, labels, batch_size)
    metrics.update(wall_s=round(time.perf_counter() - start, 3), max_length=max_length,
                   configuration=None if configuration is None else list(configuration))
    return metrics
