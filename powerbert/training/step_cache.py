"""The step folders under a pipeline's output and the cache that decides which steps to reuse.

Layout: each step writes ``<output>/<step>/`` holding its model and tokenizer, ``settings.json``
(``KEY``: the step's cache key), ``checkpoints/`` (``CHECKPOINT``: the Trainer's checkpoint of
the last epoch, removed when the step finishes) and ``done.json`` (``DONE``: the step's record,
written last);
the export writes the re-trained model and ``metrics.json`` (``METRICS``) to ``<output>/``.

Cache key of a step (``expected_keys``): the settings that shaped it (``step_settings``: content
hashes of the data, dev data and, for finetune, the model's config and weights; columns, task,
N, learning rates, epochs, lambda, retention mode, seed, ...) plus the digest of the previous
step's key. A finished step whose recorded key matches is reused, a started one resumes from its checkpoint
(``begin_step``); one whose key differs is stale (``stale_step``, ``stale_message``) and is
either refused or, with ``overwrite``, removed with the later steps (``discard``). Step folders
written before keys existed are reused with a warning; a setting added to the keys later
(``LEGACY_DEFAULTS``) reads as the value older folders were made with.

In a data-parallel run (``powerbert.training.distributed``) only rank 0 writes; ``begin_step``,
``finish_step`` and ``discard`` end with a barrier, so no rank reads a file before it is complete.

Nothing here imports the steps (``powerbert.training.steps``): they and the pre-flight checks use this.
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

from powerbert.inputs.files import write_json_atomic
from powerbert.training.distributed import is_main_process, wait_for_everyone
from powerbert.training.config import STEPS, PipelineConfig

log = logging.getLogger("powerbert")

DONE = "done.json"
KEY = "settings.json"
METRICS = "metrics.json"
CHECKPOINT = "checkpoints"  # transformers.Trainer's output_dir: checkpoint-<step>/ of the last epoch
LEGACY_CHECKPOINT = "checkpoint.pt"  # the hand-written loop's checkpoint (before the move to Trainer)
LAMBDA = "lambda.json"  # the search's lambda bisection (target_speedup), reused on resume

# Settings added to the keys after step folders were first written, with the value those folders
# were made with: a recorded key without one reads as that value (and a key holding that value
# digests as if it had none), so folders written before the setting existed stay valid.
LEGACY_DEFAULTS = {"retention_mode": "fixed"}


# ----------------------------------------------------------------------------- step folders


def step_folder(cfg: PipelineConfig, step: str) -> Path:
    """``<cfg.output>/<step>``, the folder ``step`` (one of ``STEPS``) writes."""
    return Path(cfg.output) / step


def write_json(path: Path, value) -> None:
    """Write ``value`` as indented JSON to ``path`` atomically (a temporary file, then a rename);
    in a data-parallel run only rank 0 writes."""
    if not is_main_process():
        return
    write_json_atomic(path, value)  # atomic: an interrupt never leaves a half-written marker


def finish_step(step_dir: Path, record: dict) -> dict:
    """Write the step's record (``DONE``, last) and wait for every rank; returns ``record``."""
    write_json(step_dir / DONE, record)
    wait_for_everyone()
    return record


def read_done(step_dir: Path) -> dict | None:
    """The record in ``step_dir``'s ``done.json``, or None where the step has not finished."""
    marker = step_dir / DONE
    return json.loads(marker.read_text()) if marker.is_file() else None


def need_done(cfg: PipelineConfig, step: str) -> dict:
    """The record of finished ``step``; SystemExit (one line) where it has not finished."""
    record = read_done(step_folder(cfg, step))
    if record is None:
        raise SystemExit(f"step '{step}' has not finished in {cfg.output}: run `powerbert {step}` first")
    return record


def exported_files(step_dir: Path) -> list[Path]:
    """The files of a step folder that the export copies to the output: all but the step's own
    markers (``DONE``, ``CHECKPOINT``, ``KEY``)."""
    return [item for item in step_dir.iterdir()
            if item.is_file() and item.name not in (DONE, CHECKPOINT, LEGACY_CHECKPOINT, KEY)]


# ----------------------------------------------------------------------------- cache keys

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
    if step in ("search", "retrain"):
        settings["retention_mode"] = cfg.retention_mode
    return settings


def _canonical(settings: dict) -> dict:
    """``settings`` without the entries at their ``LEGACY_DEFAULTS`` value."""
    return {name: value for name, value in settings.items()
            if not (name in LEGACY_DEFAULTS and value == LEGACY_DEFAULTS[name])}


def _digest(key: dict | None) -> str:
    if key is None:
        return "unrecorded"  # a step folder written before keys existed
    text = json.dumps({"settings": _canonical(key["settings"]), "previous": key["previous"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _make_key(cfg: PipelineConfig, step: str, previous: str | None) -> dict:
    files = {"data": str(cfg.data), "dev": cfg.dev}
    if step == "finetune":
        files["model"] = str(cfg.model)
    return {"step": step, "settings": step_settings(cfg, step), "previous": previous, "files": files}


def _same(a: dict, b: dict) -> bool:
    return _canonical(a["settings"]) == _canonical(b["settings"]) and a["previous"] == b["previous"]


def read_key(step_dir: Path) -> dict | None:
    """The cache key recorded in ``step_dir`` (``settings.json``), or None where there is none."""
    file = step_dir / KEY
    return json.loads(file.read_text()) if file.is_file() else None


def _has_state(step_dir: Path) -> bool:
    return any((step_dir / name).exists() for name in (DONE, CHECKPOINT, LEGACY_CHECKPOINT, LAMBDA))


def _short(name: str, value) -> str:
    if isinstance(value, str) and name.endswith("sha256"):
        return value[:12]
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} {_short(k, v)}" for k, v in value.items()) + "}"
    return repr(value)


def _changes(old: dict, new: dict) -> str:
    parts = []
    for name in list(new["settings"]) + [n for n in old["settings"] if n not in new["settings"]]:
        a, b = (key["settings"].get(name, LEGACY_DEFAULTS.get(name, "unset")) for key in (old, new))
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


def stale_message(cfg: PipelineConfig, step: str, recorded: dict, key: dict) -> str:
    """One line: ``step``'s folder was made with other settings (naming them), and what to do."""
    later = STEPS[STEPS.index(step) + 1:]
    return (f"{step_folder(cfg, step)} was made with other settings ({_changes(recorded, key)}); use a new "
            f"--output, or pass --overwrite to recompute {' and '.join((step,) + later)}")


def expected_keys(cfg: PipelineConfig, steps) -> dict[str, dict]:
    """The key each of ``steps`` (consecutive, in order) will have; the first step after
    ``finetune`` chains to the recorded key of the step before it, which must have finished."""
    keys, previous = {}, None
    for step in steps:
        if not keys and step != "finetune":
            before = STEPS[STEPS.index(step) - 1]
            need_done(cfg, before)
            previous = _digest(read_key(step_folder(cfg, before)))
        key = _make_key(cfg, step, previous)
        keys[step] = key
        step_dir = step_folder(cfg, step)
        legacy = read_key(step_dir) is None and _has_state(step_dir)
        previous = _digest(None if legacy else key)
    return keys


def stale_step(cfg: PipelineConfig, keys: dict[str, dict]) -> tuple[str, dict, dict] | None:
    """The first step whose recorded key differs from its expected one: (step, recorded, expected)."""
    for step, key in keys.items():
        recorded = read_key(step_folder(cfg, step))
        if recorded is not None and not _same(recorded, key):
            return step, recorded, key
    return None


def discard(cfg: PipelineConfig, step: str) -> None:
    """``overwrite``: remove ``step``, the later steps, the exported model and metrics.json."""
    if not is_main_process():
        wait_for_everyone()
        return
    out = Path(cfg.output)
    (out / METRICS).unlink(missing_ok=True)
    retrained = step_folder(cfg, "retrain")
    if retrained.is_dir():
        for item in exported_files(retrained):
            if (out / item.name).is_file():
                (out / item.name).unlink()
    for later in STEPS[STEPS.index(step):]:
        step_dir = step_folder(cfg, later)
        if step_dir.is_symlink():
            step_dir.unlink()
        elif step_dir.is_dir():
            shutil.rmtree(step_dir)
    log.warning("overwrite: removed %s and the later steps (made with other settings); recomputing",
                step_folder(cfg, step))
    wait_for_everyone()


def begin_step(cfg: PipelineConfig, step: str, key: dict) -> tuple[Path, dict | None]:
    """(step folder, the record of a finished step to reuse or None); writes the key of a new step.

    Raises ValueError (``stale_message``) where the folder was made with another key.
    """
    step_dir = step_folder(cfg, step)
    recorded = read_key(step_dir)
    if recorded is not None and not _same(recorded, key):
        raise ValueError(stale_message(cfg, step, recorded, key))
    if recorded is None and _has_state(step_dir):
        log.warning("%s: %s was written before powerbert recorded step settings; reusing it unverified "
                    "(delete it to recompute)", step, step_dir)
    done = read_done(step_dir)
    if done is not None:
        log.info("%s: already done with these settings (%s), skipping", step, step_dir / DONE)
        return step_dir, done
    if is_main_process():
        step_dir.mkdir(parents=True, exist_ok=True)
        if recorded is None and not _has_state(step_dir):
            write_json(step_dir / KEY, key)
    wait_for_everyone()
    return step_dir, None
