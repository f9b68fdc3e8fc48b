"""The retention vectors' learning rate and the lambda bisection of ``target_speedup``.

Learning rates: with Adam a parameter moves by about lr per step whatever its gradient's size,
so r can travel from 1 to 0 only if lr_soft * steps is large enough. ``lr_soft=None`` takes
``default_lr_soft(search_steps)`` (``powerbert.training.trainer``), 3 / steps (the warm-up/decay
schedule averages half the peak rate, so r can travel about 1.5) bounded to [1e-3, 0.05]; see that
function for why.

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
import logging
import math
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from powerbert.elimination.retention import real_length_ratio, vector_ratio
from powerbert.elimination.soft_extract import attach_soft_extract
from powerbert.inputs.model_folder import load_model
from powerbert.training.config import PipelineConfig
from powerbert.training.loop import train_model
from powerbert.training.task import Task, real_lengths, seed_everything
from powerbert.training.trainer import LR_SOFT_MAX, default_lr_soft

log = logging.getLogger("powerbert")

# default_lr_soft, LR_SOFT_MIN and LR_SOFT_MAX (the default lr_soft and why) live in powerbert.training.trainer.
# A user-given lr_soft above this saturates r at 0 or 1 in a few steps (a warning says so).
LR_SOFT_SATURATES = 0.1
# The lambda trials of target_speedup compress the full search's travel of r into a few steps
# (find_lambda); 0.5 is the most the reproduce study's trials used, and their ratios still
# followed lambda monotonically there.
LR_SOFT_TRIAL_MAX = 0.5
# What the vector ratio of ``target_ratio`` is taken over, per retention mode (logged, recorded).
RATIO_BASIS = {"fixed": "at N", "proportional": "over the dev set's real lengths"}


def search_lr_soft(cfg: PipelineConfig, train_size: int, epochs: int) -> float:
    """lr_soft of a search of ``epochs`` over ``train_size`` examples: ``cfg.lr_soft`` if given, else
    ``default_lr_soft`` of its optimiser steps."""
    if cfg.lr_soft is not None:
        return cfg.lr_soft
    return default_lr_soft(math.ceil(train_size / cfg.batch_size) * epochs)


def trial_lr_soft(cfg: PipelineConfig, train_size: int, subset_size: int) -> float:
    """lr_soft of a one-epoch lambda trial on ``subset_size`` examples (see ``find_lambda``)."""
    epochs = max(1, cfg.epochs_for("search"))
    full_steps = math.ceil(train_size / cfg.batch_size) * epochs
    trial_steps = math.ceil(subset_size / cfg.batch_size)
    return min(LR_SOFT_TRIAL_MAX, search_lr_soft(cfg, train_size, epochs) * full_steps / trial_steps)


def lr_soft_warnings(cfg: PipelineConfig, train_size: int, epochs: int) -> list[str]:
    """Warnings about the retention vectors' learning rate, before the search runs."""
    steps = math.ceil(train_size / cfg.batch_size) * epochs
    lr_soft = search_lr_soft(cfg, train_size, epochs)
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


def soft_search(model, task: Task, cfg: PipelineConfig, lam: float, epochs: int, step_dir, tokenizer):
    """Attach soft extract, train, read the configuration off the final r, detach.

    ``step_dir`` None trains in memory only (a lambda trial). Returns ``(configuration, vectors,
    lr_soft, result)``: the learned configuration (ints or floats, one per layer), the final
    retention vectors ``[L, N]`` float32 on the CPU, the lr_soft used and ``train_model``'s record.

    Saving with the soft extract attached is exact: the retention vectors live outside the
    model and the replaced encoder forward is not part of the saved state.
    """
    soft = attach_soft_extract(model, cfg.max_length, mode=cfg.retention_mode)
    lr_soft = search_lr_soft(cfg, len(task.train), epochs)
    try:
        result = train_model(model, task, cfg, step="search", step_dir=step_dir, epochs=epochs, soft=soft,
                             lam=lam, lr_soft=lr_soft, keep_best=False, tokenizer=tokenizer)
        configuration = soft.configuration()
        vectors = soft.retention.detach().cpu()
    finally:
        soft.detach()
    return configuration, vectors, lr_soft, result


def target_ratio(cfg: PipelineConfig, configuration, lengths: torch.Tensor) -> float:
    """The vector ratio ``target_speedup`` aims at (see the module docstring): fixed mode
    L * N / sum_l k_l (the paper's, against inputs padded to N), proportional mode
    ``real_length_ratio`` over ``lengths`` (the dev set's)."""
    if cfg.retention_mode == "proportional":
        return real_length_ratio(configuration, lengths)
    return vector_ratio(configuration, cfg.max_length)


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
        configuration, _, _, _ = soft_search(model, trial_task, trial_cfg, lam, 1, None, None)
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
