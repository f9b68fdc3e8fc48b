"""The three-step PoWER-BERT pipeline (ALGORITHM.md §4) as a Python API.

    from powerbert.pipeline import PipelineConfig, run
    metrics = run(PipelineConfig(model="path/to/bert", data="train.csv", output="out"))

Steps, each writing ``<output>/<step>/`` (the model via ``save_pretrained``, its tokenizer and a
``done.json`` marker with the step's record):

1. ``finetune``: the pretrained model on the task at ``lr_bert``; the best dev checkpoint is kept.
2. ``search``: soft extract attached (``soft_extract.py``), the whole model trained with AdamW,
   the retention vectors at ``lr_soft`` and everything else at ``lr_bert``, 10% linear warm-up
   then linear decay, loss = task loss + lambda * sum_l l * mass(l). The configuration is read
   off the *final* retention vectors, and the final weights are kept (the search has no dev
   criterion that weighs the regulariser against accuracy; the paper keeps the last state too).
3. ``retrain``: the search weights patched with the learned configuration (hard extraction,
   ``powerbert.patch``) and trained at ``lr_bert``; the best dev checkpoint is kept (the
   untrained patched model counts as epoch 0).

``export`` then copies the re-trained model to ``<output>/`` and writes ``metrics.json``. A
rerun skips every step that has its ``done.json``; an interrupted step resumes from the
``checkpoint.pt`` it writes after every epoch (model, retention vectors, optimiser, scheduler).

Learning rates: with Adam a parameter moves by about lr per step whatever its gradient's size,
so r can travel from 1 to 0 only if lr_soft * steps is large enough. ``lr_soft=None`` takes
``max(1e-3, 3 / search_steps)`` (the warm-up/decay schedule averages half the peak rate).

``target_speedup`` (instead of ``lam``): ``find_lambda`` bisects log10(lambda) over
[1e-5, 1e-1] (``target_trials`` trials). Each trial runs a one-epoch search on a seeded subset
of ``target_subset`` training examples from the fine-tuned weights, reads the configuration and
its vector ratio (``powerbert.vector_ratio``); a ratio below the target raises lambda, above it
lowers lambda. The lambda whose trial ratio came closest (in log ratio) is used for the full
search, so the final ratio is only about the target: the full search trains longer on more data.
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
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
from powerbert.families import resolve
from powerbert.patch import CONFIG_KEY
from powerbert.soft_extract import attach_soft_extract

log = logging.getLogger("powerbert")

STEPS = ("finetune", "search", "retrain")
DONE = "done.json"
CHECKPOINT = "checkpoint.pt"
MAX_LENGTH_KEY = "powerbert_max_length"


@dataclass
class PipelineConfig:
    """Every setting of a pipeline run (the CLI flags map one to one)."""

    data: str
    output: str
    model: str | None = None  # pretrained HF folder (needed by finetune)
    dev: str | None = None
    dev_fraction: float = 0.1
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
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

    def epochs_for(self, step: str) -> int:
        value = getattr(self, f"{step}_epochs")
        return self.epochs if value is None else value

    def check(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 ([CLS] plus one token), got {self.max_length}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for step in STEPS:
            if self.epochs_for(step) < 0:
                raise ValueError(f"{step}_epochs must be >= 0, got {self.epochs_for(step)}")
        if self.target_speedup is not None and self.target_speedup < 1:
            raise ValueError(f"target_speedup must be >= 1 (a speedup factor), got {self.target_speedup}")
        if self.target_speedup is None and (self.lam is None or self.lam < 0):
            raise ValueError(f"lambda must be >= 0, got {self.lam}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def label_space_from_config(config) -> D.LabelSpace:
    if getattr(config, "problem_type", None) == "regression":
        return D.LabelSpace(regression=True)
    return D.LabelSpace(regression=False, names=tuple(config.id2label[i] for i in range(config.num_labels)))


def check_model_dir(path) -> Path:
    if path is None:
        raise SystemExit("no model folder given: pass --model DIR (a local Hugging Face model folder)")
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"model folder not found: {path}")
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path} is not a Hugging Face model folder (no config.json)")
    return path


def load_model(path, labels: D.LabelSpace | None = None, max_length: int | None = None):
    """A sequence-classification model from a local folder (offline), configured for ``labels``."""
    from transformers import AutoModelForSequenceClassification

    path = check_model_dir(path)
    kwargs = {"local_files_only": True}
    if labels is not None:
        kwargs["num_labels"] = labels.num_labels
        kwargs["problem_type"] = "regression" if labels.regression else "single_label_classification"
        kwargs["ignore_mismatched_sizes"] = True  # a checkpoint's head for another label set is re-initialised
        if not labels.regression:
            kwargs["id2label"] = dict(enumerate(labels.names))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels.names)}
    model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    resolve(model)  # fail early, with the list of supported models
    if max_length is not None:
        setattr(model.config, MAX_LENGTH_KEY, max_length)
    return model


def load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(check_model_dir(path), local_files_only=True)


@dataclass
class Task:
    labels: D.LabelSpace
    tokenizer: object
    train: TensorDataset
    dev: TensorDataset


def prepare_task(cfg: PipelineConfig, tokenizer, labels: D.LabelSpace | None = None) -> Task:
    """Load, split, subsample and tokenise the task data (deterministic given ``cfg.seed``)."""
    train = D.load_examples(cfg.data, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    if cfg.dev is not None:
        dev = D.load_examples(cfg.dev, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    else:
        train, dev = D.split_dev(train, cfg.dev_fraction, cfg.seed)
    train = D.take(train, cfg.max_train_examples, cfg.seed)
    dev = D.take(dev, cfg.max_dev_examples, cfg.seed)
    if labels is None:
        labels = D.infer_label_space(train.labels)
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


def _finished(step_dir: Path, step: str) -> dict | None:
    """The record of a step that already finished in ``step_dir`` (a rerun skips it), or None."""
    done = _read_done(step_dir)
    if done is not None:
        log.info("%s: already done (%s), skipping", step, step_dir / DONE)
    return done


def _need_done(cfg: PipelineConfig, step: str) -> dict:
    record = _read_done(_step_dir(cfg, step))
    if record is None:
        raise SystemExit(f"step '{step}' has not finished in {cfg.output}: run `powerbert {step}` first")
    return record


def finetune(cfg: PipelineConfig) -> dict:
    """Step 1: fine-tune ``cfg.model`` on the task; keeps the best dev checkpoint."""
    step_dir = _step_dir(cfg, "finetune")
    done = _finished(step_dir, "finetune")
    if done is not None:
        return done
    cfg.check()
    check_model_dir(cfg.model)
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = prepare_task(cfg, tokenizer)
    log.info("finetune: %d train / %d dev examples, %s, N = %d", len(task.train), len(task.dev),
             "regression" if task.labels.regression else f"{task.labels.num_labels} classes", cfg.max_length)
    model = load_model(cfg.model, task.labels, cfg.max_length)
    step_dir.mkdir(parents=True, exist_ok=True)
    result = train_model(model, task, cfg, step="finetune", step_dir=step_dir, epochs=cfg.epochs_for("finetune"),
                         tokenizer=tokenizer, initial_eval=cfg.epochs_for("finetune") == 0)
    record = {"step": "finetune", "train_examples": len(task.train), "dev_examples": len(task.dev), **result}
    _write_json(step_dir / DONE, record)
    return record


def _search_lr_soft(cfg: PipelineConfig, train_size: int, epochs: int) -> float:
    if cfg.lr_soft is not None:
        return cfg.lr_soft
    steps = max(1, math.ceil(train_size / cfg.batch_size) * epochs)
    return max(1e-3, 3.0 / steps)


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
    """
    subset_size = min(cfg.target_subset, len(task.train))
    g = torch.Generator().manual_seed(cfg.seed + 7)
    subset = TensorDataset(*task.train[torch.randperm(len(task.train), generator=g)[:subset_size]])
    trial_task = Task(task.labels, task.tokenizer, subset, task.dev)
    lo, hi = -5.0, -1.0
    trials, best = [], None
    for trial in range(cfg.target_trials):
        exponent = (lo + hi) / 2
        lam = 10.0 ** exponent
        seed_everything(cfg.seed + trial)
        model = load_model(finetuned)
        trial_cfg = dataclasses.replace(cfg, progress=False)
        configuration, _, _, _ = _soft_search(model, trial_task, trial_cfg, lam, 1, None, None)
        ratio = powerbert.vector_ratio(configuration, cfg.max_length)
        trials.append({"lambda": lam, "configuration": list(configuration), "vector_ratio": ratio})
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
    step_dir = _step_dir(cfg, "search")
    done = _finished(step_dir, "search")
    if done is not None:
        return done
    cfg.check()
    _need_done(cfg, "finetune")
    finetuned = _step_dir(cfg, "finetune")
    tokenizer = load_tokenizer(finetuned)
    base = load_model(finetuned)
    labels = label_space_from_config(base.config)
    task = prepare_task(cfg, tokenizer, labels)
    step_dir.mkdir(parents=True, exist_ok=True)
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
    epochs = cfg.epochs_for("search")
    log.info("search: lambda %.3g, %d epochs, lr_bert %.3g, lr_soft %.3g", lam, epochs, cfg.lr_bert,
             _search_lr_soft(cfg, len(task.train), epochs))
    seed_everything(cfg.seed)
    configuration, vectors, lr_soft, result = _soft_search(base, task, cfg, lam, epochs, step_dir, tokenizer)
    _write_json(step_dir / "retention_vectors.json", {
        "configuration": list(configuration), "masses": vectors.sum(1).tolist(), "vectors": vectors.tolist(),
    })
    log.info("search: learned configuration %s (vector ratio %.2fx)", list(configuration),
             powerbert.vector_ratio(configuration, cfg.max_length))
    record = {"step": "search", "lambda": lam, "lr_soft": lr_soft, "lambda_trials": trials,
              "configuration": list(configuration), **result, "lambda_search_s": lambda_search_s}
    record["wall_s"] += lambda_search_s  # the step's wall time includes the lambda bisection
    _write_json(step_dir / DONE, record)
    return record


def retrain(cfg: PipelineConfig) -> dict:
    """Step 3: hard extraction with the learned configuration, trained from the search weights."""
    step_dir = _step_dir(cfg, "retrain")
    done = _finished(step_dir, "retrain")
    if done is not None:
        return done
    cfg.check()
    configuration = _need_done(cfg, "search")["configuration"]
    searched = _step_dir(cfg, "search")
    tokenizer = load_tokenizer(searched)
    model = load_model(searched)
    labels = label_space_from_config(model.config)
    task = prepare_task(cfg, tokenizer, labels)
    powerbert.patch(model, configuration)
    step_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    result = train_model(model, task, cfg, step="retrain", step_dir=step_dir, epochs=cfg.epochs_for("retrain"),
                         tokenizer=tokenizer, initial_eval=True)
    record = {"step": "retrain", "configuration": configuration, **result}
    _write_json(step_dir / DONE, record)
    return record


def export(cfg: PipelineConfig, records: dict | None = None) -> dict:
    """Copy the re-trained model to ``cfg.output`` and write ``metrics.json``; returns the metrics."""
    output = Path(cfg.output)
    records = records or {step: _need_done(cfg, step) for step in STEPS}
    retrained = _step_dir(cfg, "retrain")
    for item in retrained.iterdir():
        if item.is_file() and item.name not in (DONE, CHECKPOINT):
            shutil.copy2(item, output / item.name)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output, local_files_only=True)
    configuration = list(getattr(config, CONFIG_KEY))
    n = cfg.max_length
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
        "settings": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "progress"},
    }
    _write_json(output / "metrics.json", metrics)
    return metrics


def run(cfg: PipelineConfig) -> dict:
    """All three steps (each skipped if already done), then ``export``; returns metrics.json's content."""
    cfg.check()
    Path(cfg.output).mkdir(parents=True, exist_ok=True)
    records = {"finetune": finetune(cfg), "search": search(cfg), "retrain": retrain(cfg)}
    return export(cfg, records)


def evaluate(model_dir, data, *, text_column=None, text_pair_column=None, label_column=None,
             max_length: int | None = None, batch_size: int = 64, max_examples: int | None = None) -> dict:
    """Dev metric of a saved model on a data file; patched when its config holds a configuration."""
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    labels = label_space_from_config(model.config)
    max_length = max_length or getattr(model.config, MAX_LENGTH_KEY, None) or 128
    examples = D.take(D.load_examples(data, text_column, text_pair_column, label_column), max_examples, 0)
    dataset = D.encode(examples, tokenizer, labels, max_length)
    configuration = getattr(model.config, CONFIG_KEY, None)
    if configuration is not None:
        powerbert.patch(model)
    start = time.perf_counter()
    metrics = evaluate_model(model, dataset, labels, batch_size)
    metrics.update(wall_s=round(time.perf_counter() - start, 3), max_length=max_length,
                   configuration=None if configuration is None else list(configuration))
    return metrics
