"""The training loop of every step: ``train_model`` on ``transformers.Trainer``.

Training runs on ``transformers.Trainer`` (the search on ``powerbert.training.trainer.SearchTrainer``):
logging, checkpoints, the optimiser and its schedule, and data parallelism are the Trainer's.
``torchrun --nproc_per_node P -m powerbert.cli train ...`` (or ``accelerate launch``) runs every
step on P processes: ``batch_size`` stays the batch of one optimiser step (``batch_size / P`` per
process, so the schedule and the default ``lr_soft`` do not depend on P), only rank 0 writes, and
the records say ``world_size``. What this module adds: the best dev checkpoint (``_StepRecord``),
the per-epoch history (with the retention vectors' masses during the search) and resuming an
interrupted step from the Trainer checkpoint it writes after every epoch (with ``HISTORY``).
"""
from __future__ import annotations

import gc
import inspect
import json
import logging
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from transformers.trainer_utils import get_last_checkpoint

from powerbert.training.config import PipelineConfig
from powerbert.training.distributed import is_main_process, per_process_batch, use_cpu, wait_for_everyone, world_size
from powerbert.training.metrics import metric_name
from powerbert.training.step_cache import CHECKPOINT, LEGACY_CHECKPOINT, write_json
from powerbert.training.task import Task
from powerbert.training.trainer import FiniteLossTrainer, SearchTrainer, task_metrics

log = logging.getLogger("powerbert")


def _save(model, tokenizer, step_dir: Path) -> None:
    model.save_pretrained(step_dir)
    tokenizer.save_pretrained(step_dir)


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
               "metric": metric_name(self.task.labels.regression), "value": metrics["eval_value"]}
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
