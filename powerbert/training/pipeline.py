"""The three-step PoWER-BERT pipeline (ALGORITHM.md §4) as a Python API.

    from powerbert.training.pipeline import PipelineConfig, run
    metrics = run(PipelineConfig(model="path/to/bert", data="train.csv", output="out"))

Steps, each writing ``<output>/<step>/`` (the model via ``save_pretrained``, its tokenizer, a
``settings.json`` with the step's cache key and a ``done.json`` marker with the step's record):

1. ``finetune``: the pretrained model on the task at ``lr_bert``; the best dev checkpoint is kept.
2. ``search``: soft extract attached (``soft_extract.py``), the whole model trained with AdamW,
   the retention vectors at ``lr_soft`` and everything else at ``lr_bert``, 10% linear warm-up
   then linear decay, loss = task loss + lambda * sum_l l * mass(l). The configuration is read
   off the *final* retention vectors, and the final weights are kept (the search has no dev
   criterion that weighs the regulariser against accuracy; the paper keeps the last state too).
   ``retention_mode`` says what it learns: ``"fixed"`` slot counts k_l (ints, ALGORITHM.md §3)
   or ``"proportional"`` shares f_l of each sequence's real length (floats, §8: soft extract
   over relative rank, mass(l) = share(l) times the batch's mean real length).
3. ``retrain``: the search weights patched with the learned configuration (hard extraction,
   ``powerbert.patch``; a proportional one keeps ``ceil(f_l * len_i)`` vectors of sequence i)
   and trained at ``lr_bert``; the best dev checkpoint is kept (the untrained patched model
   counts as epoch 0).

``export`` then copies the re-trained model to ``<output>/`` and writes ``metrics.json``.

Validation first: ``preflight`` (``powerbert.training.preflight``) checks every setting (finite, in
range), the output folder (not a file, not the model folder), the model folder
(``powerbert.inputs.model_folder``: config, supported architecture, weights, tokenizer files, N within
its positions) and the data (format, finite labels, classification or regression from the whole
label column) before any training, and raises ValueError or SystemExit with a one-line message.

Training runs on ``transformers.Trainer`` (``train_model``; the search on
``powerbert.training.trainer.SearchTrainer``): logging, checkpoints, the optimiser and its schedule, and
data parallelism are the Trainer's. ``torchrun --nproc_per_node P -m powerbert.cli train ...``
(or ``accelerate launch``) runs every step on P processes: ``batch_size`` stays the batch of one
optimiser step (``batch_size / P`` per process, so the schedule and the default ``lr_soft`` do
not depend on P), only rank 0 writes, and the records say ``world_size``. What this module adds:
the step cache, the best dev checkpoint (``_StepRecord``), the per-epoch history (with the
retention vectors' masses during the search) and ``metrics.json``.

Cache (``powerbert.training.step_cache``): each step's key is the settings that shaped it (content hashes
of the data, dev data and model weights; columns, task, N, learning rates, epochs, lambda, seed,
...) plus the digest of the previous step's key. A rerun skips a finished step whose key matches
and resumes an interrupted one from the Trainer checkpoint it writes after every epoch to
``<step>/checkpoints/`` (model, retention vectors, optimiser, scheduler, RNG states, history). A step whose key differs stops the run with a message
naming the changed settings, unless ``overwrite`` is set: then that step and the later ones (and
the exported model and ``metrics.json``) are removed and recomputed. Step folders written before
keys existed are reused with a warning.

Learning rates: with Adam a parameter moves by about lr per step whatever its gradient's size,
so r can travel from 1 to 0 only if lr_soft * steps is large enough. ``lr_soft=None`` takes
``default_lr_soft(search_steps)``, 3 / steps (the warm-up/decay schedule averages half the peak
rate, so r can travel about 1.5) bounded to [1e-3, 0.05]; see that function for why.

``target_speedup`` (instead of ``lam``): ``find_lambda`` bisects log10(lambda) over
[1e-5, 1e-1] (``target_trials`` trials). Each trial runs a one-epoch search on a seeded subset
of ``target_subset`` training examples from the fine-tuned weights (at ``trial_lr_soft``: the
full search's travel of r in the trial's fewer steps), reads the configuration and its vector
ratio (``target_ratio``: fixed, L * N / sum_l k_l as in the paper, i.e. against inputs padded
to N; proportional, over the dev set's real lengths, sum_i L * len_i / sum_i sum_l k_{l,i},
since a share has no meaning at one length); a ratio below the target raises lambda, above it lowers
lambda. The lambda whose trial ratio came closest (in log ratio) is used for the full search,
so the final ratio is only about the target: the full search trains longer on more data.
"""
from __future__ import annotations

import dataclasses
import gc
import inspect
import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

import powerbert
from powerbert.inputs import data as D
from powerbert.inputs.model_folder import (MAX_LENGTH_KEY, check_model_dir, default_max_length, label_space_from_config,
                                    load_model, load_tokenizer, max_positions, read_model_config)  # noqa: F401 (re-exported)
from powerbert.elimination.hard_extract import CONFIG_KEY
from powerbert.training.config import STEPS, PipelineConfig
from powerbert.training.preflight import load_data, preflight
from powerbert.elimination.retention import is_proportional, keep_counts, row_keep_counts
from powerbert.elimination.soft_extract import attach_soft_extract, fractions_from_shares
from powerbert.training.distributed import is_main_process, per_process_batch, use_cpu, wait_for_everyone, world_size
# DONE and LR_SOFT_MIN: re-exported (benchmarks/studies/reproduce reads P.DONE, a test P.LR_SOFT_MIN)
from powerbert.training.step_cache import (CHECKPOINT, DONE, LAMBDA, LEGACY_CHECKPOINT, METRICS,  # noqa: F401
                                  begin_step, discard, exported_files, finish_step, need_done, read_key, stale_step, step_folder,
                                  write_json)
from powerbert.training.trainer import (LR_SOFT_MAX, LR_SOFT_MIN, FiniteLossTrainer, SearchTrainer,  # noqa: F401
                               default_lr_soft, task_metrics)

log = logging.getLogger("powerbert")

# default_lr_soft, LR_SOFT_MIN and LR_SOFT_MAX (the default lr_soft and why) live in powerbert.training.trainer.
# A user-given lr_soft above this saturates r at 0 or 1 in a few steps (a warning says so).
LR_SOFT_SATURATES = 0.1
# The lambda trials of target_speedup compress the full search's travel of r into a few steps
# (find_lambda); 0.5 is the most the reproduce study's trials used, and their ratios still
# followed lambda monotonically there.
LR_SOFT_TRIAL_MAX = 0.5


# ----------------------------------------------------------------------------- helpers


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Task:
    """A task ready to train on: its label space, tokenizer and the tokenised train/dev sets."""

    labels: D.LabelSpace
    tokenizer: object
    train: TensorDataset
    dev: TensorDataset


def prepare_task(cfg: PipelineConfig, tokenizer, labels: D.LabelSpace | None = None) -> Task:
    """Load, split, subsample and tokenise the task data (deterministic given ``cfg.seed``).

    ``labels`` None: inferred from the whole label column of the data and dev files
    (``cfg.task``), before any split or subset, so a subset never decides the task.
    """
    train, dev = load_data(cfg)
    if labels is None:
        labels = D.infer_label_space([train] + ([] if dev is None else [dev]), cfg.task)
    if dev is None:
        train, dev = D.split_dev(train, cfg.dev_fraction, cfg.seed)
    train = D.take(train, cfg.max_train_examples, cfg.seed)
    dev = D.take(dev, cfg.max_dev_examples, cfg.seed)
    return Task(labels, tokenizer, D.encode(train, tokenizer, labels, cfg.max_length),
                D.encode(dev, tokenizer, labels, cfg.max_length))


def task_loss(logits: torch.Tensor, targets: torch.Tensor, labels: D.LabelSpace) -> torch.Tensor:
    """Mean loss of a batch: MSE of ``logits.squeeze(-1)`` (regression) or cross-entropy (classification)."""
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


def real_lengths(dataset: TensorDataset) -> torch.Tensor:
    """``[examples]`` int64: the real tokens of every example of a tokenised set (its mask's sums)."""
    return dataset.tensors[1].sum(dim=1)


def real_length_ratio(configuration, lengths: torch.Tensor) -> float:
    """Vector ratio over real lengths, either kind of configuration (ALGORITHM.md §6, §8):
    ``sum_i L * len_i / sum_i sum_l k_{l,i}``, with k_{l,i} = min(k_l, len_i) (fixed) or
    ``min(k_{l-1,i}, ceil(f_l * len_i))`` (proportional): the ideal against a stock model that
    computes no padding at all (dynamic padding computes some, so it is a lower bound there).

    Args:
        configuration: ints or floats, one per layer. lengths: ``[examples]`` int real lengths.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if is_proportional(configuration):
        kept = row_keep_counts(configuration, None, lengths)
    else:
        kept = torch.minimum(torch.tensor([int(k) for k in configuration])[:, None], lengths[None])
    return len(configuration) * int(lengths.sum()) / int(kept.sum())


def target_ratio(cfg: PipelineConfig, configuration, lengths: torch.Tensor) -> float:
    """The vector ratio ``target_speedup`` aims at (see the module docstring): fixed mode
    L * N / sum_l k_l (the paper's, against inputs padded to N), proportional mode
    ``real_length_ratio`` over ``lengths`` (the dev set's)."""
    if cfg.retention_mode == "proportional":
        return real_length_ratio(configuration, lengths)
    return powerbert.vector_ratio(configuration, cfg.max_length)


def _at_minimum(configuration, max_length: int) -> bool:
    """True when every layer keeps the least the read-out allows ([CLS] alone)."""
    if is_proportional(configuration):
        return all(f <= fractions_from_shares([0.0], max_length)[0] for f in configuration)
    return all(k == 1 for k in configuration)


def _model_sizes(config) -> tuple[int, int]:
    hidden = getattr(config, "hidden_size", None) or getattr(config, "dim")
    intermediate = getattr(config, "intermediate_size", None) or getattr(config, "hidden_dim")
    return hidden, intermediate


def _save(model, tokenizer, step_dir: Path) -> None:
    model.save_pretrained(step_dir)
    tokenizer.save_pretrained(step_dir)


# ----------------------------------------------------------------------------- training loop


HISTORY = "powerbert_history.json"  # in each Trainer checkpoint: the step's history and best so far


def collate(input_names):
    """A ``data_collator`` for the pipeline's ``TensorDataset`` rows (ids, mask, types, target):
    a dict batch with ``labels``, without the inputs the model does not take (DistilBERT has no
    ``token_type_ids``)."""

    def batch(rows) -> dict:
        ids, mask, types, targets = (torch.stack(column) for column in zip(*rows))
        inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": targets}
        return {k: v for k, v in inputs.items() if k == "labels" or k in input_names}

    return batch


class _QuietProgress(ProgressCallback):
    """The Trainer's progress bars, without printing every log dict to stdout (the CLI prints JSON)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        pass


class _StepRecord(TrainerCallback):
    """Per-epoch history, the best dev checkpoint and the step's wall time, for one ``train_model``.

    At every evaluation (one per epoch, and epoch 0 with ``initial_eval``) it records the dev
    metrics (and, in the search, the retention vectors' masses and the configuration they imply)
    and, with ``keep_best``, saves model and tokenizer to ``step_dir`` when the dev value improves.
    After every Trainer checkpoint it writes ``HISTORY`` into it, so a resumed step continues the
    same history, best and wall time. Only rank 0 writes.
    """

    def __init__(self, step, task, step_dir, soft, keep_best, tokenizer, start):
        self.step, self.task, self.step_dir, self.soft = step, task, step_dir, soft
        self.keep_best, self.tokenizer, self.start = keep_best, tokenizer, start
        self.history, self.best, self.elapsed_before, self.train_loss = [], None, 0.0, None

    def resume(self, checkpoint: Path) -> None:
        saved = json.loads((checkpoint / HISTORY).read_text())
        self.history, self.best, self.elapsed_before = saved["history"], saved["best"], saved["elapsed"]

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.train_loss = logs["loss"]  # the epoch's mean training objective, logged just before evaluation

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        epoch = int(round(state.epoch or 0))
        dev = {"loss": metrics["eval_loss"], "examples": len(self.task.dev),
               "metric": "pearson" if self.task.labels.regression else "accuracy", "value": metrics["eval_value"]}
        if "eval_mse" in metrics:
            dev["mse"] = metrics["eval_mse"]
        entry = {"epoch": epoch, "train_loss": None if epoch == 0 else self.train_loss, "dev": dev}
        if self.soft is not None:
            entry["masses"] = [round(m, 3) for m in self.soft.masses().tolist()]
            if self.soft.mode == "proportional":
                entry["shares"] = [round(f, 4) for f in self.soft.shares().tolist()]
            entry["configuration"] = list(self.soft.configuration())
        self.history.append(entry)
        extra = f" configuration {entry['configuration']}" if self.soft is not None else ""
        log.info("%s epoch %d: train loss %s, dev %s %.4f%s", self.step, epoch,
                 "-" if entry["train_loss"] is None else f"{entry['train_loss']:.4f}", dev["metric"], dev["value"], extra)
        if self.keep_best and (self.best is None or dev["value"] > self.best["value"]):
            self.best = {"epoch": epoch, **dev}
            if self.step_dir is not None and is_main_process():
                _save(model, self.tokenizer, self.step_dir)

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if is_main_process() and checkpoint.is_dir():
            write_json(checkpoint / HISTORY, {"history": self.history, "best": self.best, "elapsed": self.elapsed()})


def train_model(model, task: Task, cfg: PipelineConfig, *, step: str, step_dir: Path | None, epochs: int,
                soft=None, lam: float = 0.0, lr_soft: float | None = None, keep_best: bool = True,
                initial_eval: bool = False, tokenizer=None) -> dict:
    """Train ``model`` (optionally with a soft extract ``soft``) on ``transformers.Trainer``,
    checkpointing every epoch.

    AdamW at ``cfg.lr_bert`` (weight decay except on biases and norms), ``cfg.warmup`` of the
    steps linear warm-up then linear decay, gradients clipped to ``cfg.max_grad_norm``, dev
    evaluation after every epoch, batches of ``cfg.batch_size`` per optimiser step (split over
    the processes of a data-parallel run).

    Args:
        step: name for logs and progress bars.
        step_dir: where the best (``keep_best``) or final model and the Trainer checkpoints go;
            None trains in memory only (no saving, no resume; used by lambda trials).
        soft: a ``SoftExtract`` attached to ``model``: trained on ``SearchTrainer`` at ``lr_soft``,
            projected onto [0, 1] after every optimiser step, ``lam * sum_l l * mass(l)`` added to
            the loss (proportional mode: mass(l) at the batch's mean real length).
        keep_best: save the model whenever the dev metric improves (else save the final one).
        initial_eval: evaluate before training; that state counts as a candidate (epoch 0).

    Returns:
        ``{"history": [per-epoch dev metrics], "best": {...} | None, "wall_s": seconds,
        "world_size": processes}``.
    """
    start = time.perf_counter()
    processes = world_size()
    per_process = per_process_batch(cfg.batch_size, processes)
    total = max(1, math.ceil(len(task.train) / cfg.batch_size) * epochs)
    checkpoints = None if step_dir is None else step_dir / CHECKPOINT
    scratch = None if checkpoints is not None else tempfile.mkdtemp(prefix="powerbert-")
    if step_dir is not None and (step_dir / LEGACY_CHECKPOINT).is_file() and is_main_process():
        log.warning("%s: %s is a checkpoint of the loop before transformers.Trainer; restarting the step", step,
                    step_dir / LEGACY_CHECKPOINT)
        (step_dir / LEGACY_CHECKPOINT).unlink()
    resume = None
    if checkpoints is not None and checkpoints.is_dir():
        last = get_last_checkpoint(str(checkpoints))
        resume = None if last is None or not (Path(last) / HISTORY).is_file() else Path(last)
    args = TrainingArguments(
        output_dir=str(checkpoints or scratch), num_train_epochs=epochs, per_device_train_batch_size=per_process,
        per_device_eval_batch_size=max(1, 2 * per_process), learning_rate=cfg.lr_bert, weight_decay=cfg.weight_decay,
        lr_scheduler_type="linear", warmup_steps=int(cfg.warmup * total), max_grad_norm=cfg.max_grad_norm,
        eval_strategy="epoch", logging_strategy="epoch", save_strategy="epoch" if checkpoints else "no",
        save_total_limit=1, eval_on_start=initial_eval and resume is None, seed=cfg.seed, report_to="none",
        disable_tqdm=not cfg.progress, remove_unused_columns=False, dataloader_pin_memory=False, use_cpu=use_cpu(),
    )
    record = _StepRecord(step, task, step_dir, soft, keep_best, tokenizer, start)
    if resume is not None:
        record.resume(resume)
        log.info("%s: resuming after epoch %d from %s", step, record.history[-1]["epoch"] if record.history else 0,
                 resume)
    common = dict(model=model, args=args, train_dataset=task.train, eval_dataset=task.dev,
                  data_collator=collate(set(inspect.signature(type(model).forward).parameters)),  # patched: *args
                  compute_metrics=task_metrics(task.labels.regression), callbacks=[record])
    if soft is not None:
        trainer = SearchTrainer(**common, soft=soft, lam=lam, lr_soft=lr_soft)
    else:
        trainer = FiniteLossTrainer(**common)
    trainer.remove_callback(PrinterCallback)
    if trainer.pop_callback(ProgressCallback) is not None:
        trainer.add_callback(_QuietProgress)
    # accelerate's free_memory runs gc.collect() at the start of every train(): seconds over the heap of
    # a process that imported torch, transformers and triton (3.4 s of a 7 s fine-tune here). Frozen,
    # the objects made before are skipped; unfreezing hands them back to the collector.
    gc.freeze()
    try:
        if epochs > 0:
            trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
        elif initial_eval:
            trainer.evaluate()
    except ValueError as error:
        raise ValueError(f"{step}: {error}") from None
    finally:
        gc.unfreeze()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    model.eval()
    if step_dir is not None and is_main_process():
        if not keep_best or record.best is None:
            _save(model, tokenizer, step_dir)
        shutil.rmtree(checkpoints, ignore_errors=True)
    wait_for_everyone()
    return {"history": record.history, "best": record.best, "wall_s": record.elapsed(), "world_size": processes}


# ----------------------------------------------------------------------------- steps


def _prepare(cfg: PipelineConfig, steps) -> dict[str, dict]:
    """``preflight``, then (``overwrite``) discard the first stale step and the later ones."""
    keys = preflight(cfg, steps)
    stale = stale_step(cfg, keys)
    if stale is not None:
        discard(cfg, stale[0])
    return keys


def finetune(cfg: PipelineConfig) -> dict:
    """Step 1: fine-tune ``cfg.model`` on the task; keeps the best dev checkpoint."""
    return _finetune(cfg, _prepare(cfg, ("finetune",))["finetune"])


def _finetune(cfg: PipelineConfig, key: dict) -> dict:
    step_dir, done = begin_step(cfg, "finetune", key)
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
    return finish_step(step_dir, record)


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
        near = "1.0 (keep everything)" if cfg.retention_mode == "proportional" else "N"
        return [f"the search has only {steps} optimiser steps: lr_soft is capped at {lr_soft:g}, so each "
                f"retention vector entry can fall by at most about {lr_soft * steps / 2:.2f}; the configuration "
                f"stays near {near} unless the search gets more data or epochs"]
    return []


def _soft_search(model, task: Task, cfg: PipelineConfig, lam: float, epochs: int, step_dir, tokenizer):
    """Attach soft extract, train, read the configuration off the final r, detach.

    Saving with the soft extract attached is exact: the retention vectors live outside the
    model and the replaced encoder forward is not part of the saved state.
    """
    soft = attach_soft_extract(model, cfg.max_length, mode=cfg.retention_mode)
    lr_soft = _search_lr_soft(cfg, len(task.train), epochs)
    try:
        result = train_model(model, task, cfg, step="search", step_dir=step_dir, epochs=epochs, soft=soft,
                             lam=lam, lr_soft=lr_soft, keep_best=False, tokenizer=tokenizer)
        configuration = soft.configuration()
        vectors = soft.retention.detach().cpu()
    finally:
        soft.detach()
    return configuration, vectors, lr_soft, result


# What the vector ratio of ``target_ratio`` is taken over, per retention mode (logged, recorded).
RATIO_BASIS = {"fixed": "at N", "proportional": "over the dev set's real lengths"}


def find_lambda(cfg: PipelineConfig, task: Task, target: float, finetuned: Path) -> tuple[float, list[dict]]:
    """Bisect log10(lambda) in [-5, -1] so that a short search reaches about ``target``x vector ratio.

    See the module docstring for the method. Returns ``(lambda, trials)``.

    A trial is a proxy of the full search in fewer steps, so it runs at
    ``trial_lr_soft``: the full search's lr_soft times its steps over the trial's (the same
    total travel of r), at most ``LR_SOFT_TRIAL_MAX``. With the default lr_soft this is
    3 / trial steps, as before the default was bounded.
    """
    lengths = real_lengths(task.dev)
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
        ratio = target_ratio(cfg, configuration, lengths)
        trials.append({"lambda": lam, "configuration": list(configuration), "vector_ratio": ratio,
                       "lr_soft": trial_cfg.lr_soft})
        log.info("target speedup %.2fx: trial %d lambda %.3g -> %s, vector ratio %.2fx (%s)", target, trial + 1,
                 lam, list(configuration), ratio, RATIO_BASIS[cfg.retention_mode])
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
    step_dir, done = begin_step(cfg, "search", key)
    if done is not None:
        return done
    finetuned = step_folder(cfg, "finetune")
    tokenizer = load_tokenizer(finetuned)
    base = load_model(finetuned)
    labels = label_space_from_config(base.config)
    task = prepare_task(cfg, tokenizer, labels)
    epochs = cfg.epochs_for("search")
    warnings = _lr_soft_warnings(cfg, len(task.train), epochs)
    for warning in warnings:
        log.warning("search: %s", warning)
    trials, lambda_search_s = [], 0.0
    lam_file = step_dir / LAMBDA  # a resumed search reuses the bisection's result
    if cfg.target_speedup is not None:
        if lam_file.is_file():
            saved = json.loads(lam_file.read_text())
            lam, trials, lambda_search_s = saved["lambda"], saved["trials"], saved["wall_s"]
        else:
            start = time.perf_counter()
            lam, trials = find_lambda(cfg, task, cfg.target_speedup, finetuned)
            lambda_search_s = time.perf_counter() - start
            write_json(lam_file, {"lambda": lam, "trials": trials, "wall_s": lambda_search_s})
    else:
        lam = cfg.lam
    log.info("search: %s retention, lambda %.3g, %d epochs, lr_bert %.3g, lr_soft %.3g", cfg.retention_mode, lam,
             epochs, cfg.lr_bert, _search_lr_soft(cfg, len(task.train), epochs))
    seed_everything(cfg.seed)
    configuration, vectors, lr_soft, result = _soft_search(base, task, cfg, lam, epochs, step_dir, tokenizer)
    write_json(step_dir / "retention_vectors.json", {
        "retention_mode": cfg.retention_mode, "configuration": list(configuration),
        "masses": vectors.sum(1).tolist(), "shares": vectors.mean(1).tolist(), "vectors": vectors.tolist(),
    })
    log.info("search: learned configuration %s (%s; vector ratio %.2fx at N, %.2fx over the dev set's real "
             "lengths)", list(configuration), cfg.retention_mode, powerbert.vector_ratio(configuration, cfg.max_length),
             real_length_ratio(configuration, real_lengths(task.dev)))
    if _at_minimum(configuration, cfg.max_length):
        least = "f = 1/N" if cfg.retention_mode == "proportional" else "k = 1"
        warnings.append(
            f"the search ended with every layer at its minimum ({least}, [CLS] alone): lambda {lam:.3g} outweighs "
            f"the task at lr_soft {lr_soft:.3g}; the re-trained model sees [CLS] only. Lower --lambda or "
            f"--target-speedup, or --lr-soft"
        )
        log.warning("search: %s", warnings[-1])
    record = {"step": "search", "retention_mode": cfg.retention_mode, "lambda": lam, "lr_soft": lr_soft,
              "lambda_trials": trials, **({"target_ratio_basis": RATIO_BASIS[cfg.retention_mode]} if trials else {}),
              "configuration": list(configuration), **result, "lambda_search_s": lambda_search_s,
              "warnings": warnings}
    record["wall_s"] += lambda_search_s  # the step's wall time includes the lambda bisection
    return finish_step(step_dir, record)


def retrain(cfg: PipelineConfig) -> dict:
    """Step 3: hard extraction with the learned configuration, trained from the search weights."""
    return _retrain(cfg, _prepare(cfg, ("retrain",))["retrain"])


def _retrain(cfg: PipelineConfig, key: dict) -> dict:
    step_dir, done = begin_step(cfg, "retrain", key)
    if done is not None:
        return done
    configuration = need_done(cfg, "search")["configuration"]
    searched = step_folder(cfg, "search")
    tokenizer = load_tokenizer(searched)
    model = load_model(searched)
    labels = label_space_from_config(model.config)
    task = prepare_task(cfg, tokenizer, labels)
    powerbert.patch(model, configuration)  # floats: proportional, the hard extract keeps per-row counts
    seed_everything(cfg.seed)
    result = train_model(model, task, cfg, step="retrain", step_dir=step_dir, epochs=cfg.epochs_for("retrain"),
                         tokenizer=tokenizer, initial_eval=True)
    lengths = real_lengths(task.dev)
    record = {"step": "retrain", "configuration": configuration, **result,
              "dev_real_lengths": {"examples": len(lengths), "mean": round(lengths.double().mean().item(), 3),
                                   "vector_ratio": real_length_ratio(configuration, lengths)}}
    return finish_step(step_dir, record)


def export(cfg: PipelineConfig, records: dict | None = None) -> dict:
    """Copy the re-trained model to ``cfg.output`` and write ``metrics.json``; returns the metrics.

    ``metrics.json`` goes first (and comes back last), so it never sits beside a model it does
    not describe; its ``settings`` are those recorded by the steps (their keys), not ``cfg``.
    In a data-parallel run rank 0 writes, and the other ranks return what it wrote.
    """
    output = Path(cfg.output)
    if not is_main_process():
        wait_for_everyone()
        return json.loads((output / METRICS).read_text())
    metrics = _export(cfg, output, records or {step: need_done(cfg, step) for step in STEPS})
    wait_for_everyone()
    return metrics


def _export(cfg: PipelineConfig, output: Path, records: dict) -> dict:
    (output / METRICS).unlink(missing_ok=True)
    retrained = step_folder(cfg, "retrain")
    for item in exported_files(retrained):
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

    keys = {step: read_key(step_folder(cfg, step)) for step in STEPS}
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
    proportional = is_proportional(configuration)
    metrics = {
        "configuration": configuration,
        "retention_mode": "proportional" if proportional else "fixed",
        "max_length": n,
        "num_layers": len(configuration),
        # at N: a sequence of N real tokens (for fixed mode also any batch padded to N)
        "vectors_kept": sum(keep_counts(configuration, n)),
        "vectors_total": len(configuration) * n,
        "vector_ratio": powerbert.vector_ratio(configuration, n),
        "flops_ideal": powerbert.flops_ideal(configuration, n, hidden, intermediate),
        **({"mean_kept_share": round(sum(configuration) / len(configuration), 4)} if proportional else {}),
        # over the dev set's real lengths (no padding on either side), when the retrain step recorded them
        **({"dev_real_lengths": records["retrain"]["dev_real_lengths"]}
           if "dev_real_lengths" in records["retrain"] else {}),
        "lambda": records["search"]["lambda"],
        "lr_soft": records["search"]["lr_soft"],
        "lambda_trials": records["search"].get("lambda_trials", []),
        "train_examples": records["finetune"].get("train_examples"),
        "dev_examples": records["finetune"].get("dev_examples"),
        "steps": {step: step_summary(records[step]) for step in STEPS},
        "wall_s_total": round(sum(records[step]["wall_s"] for step in STEPS), 2),
        # processes of each step (torchrun / accelerate launch); steps cached from before the move to
        # transformers.Trainer ran in one
        "world_size": _one_or_each({step: records[step].get("world_size", 1) for step in STEPS}),
        "warnings": records["search"].get("warnings", []),
        "settings": settings,
    }
    write_json(output / METRICS, metrics)
    return metrics


def _one_or_each(values: dict):
    """The value when every entry has the same one, else ``values`` (``{step: value}``)."""
    distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
    return next(iter(values.values())) if len(distinct) == 1 else values


def run(cfg: PipelineConfig) -> dict:
    """All three steps (each skipped if done with the same settings), then ``export``.

    Everything is validated first (``preflight``); returns metrics.json's content.
    """
    keys = _prepare(cfg, STEPS)
    if is_main_process():
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
        max_length = default_max_length(config)
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
