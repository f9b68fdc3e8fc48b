"""A task ready to train on: seeding, the tokenised train/dev sets, the task loss and dev evaluation.

``prepare_task`` is deterministic given ``cfg.seed``: the same data, split and subset on every
rerun, so the step cache (``powerbert.training.step_cache``) can key a step by its settings.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from powerbert.inputs import examples as D
from powerbert.training.config import PipelineConfig
from powerbert.training.metrics import dev_metrics, metric_name
from powerbert.training.preflight import load_data


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's random generators with ``seed``."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Task:
    """A task ready to train on: its label space, tokenizer and the tokenised train/dev sets
    (``TensorDataset`` rows: ids, mask, token types ``[N]`` int64 each, and the target)."""

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
    """Mean loss of a batch: MSE of ``logits.squeeze(-1)`` (regression) or cross-entropy (classification).

    ``logits``: ``[B, outputs]`` float; ``targets``: ``[B]`` float (regression) or int64 class ids.
    """
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
    """Dev metrics of ``model`` on a tokenised set (rows as in ``Task``).

    Returns ``{"loss", "examples", "metric", "value"}`` and, for regression, ``"mse"``: accuracy
    (classification) or Pearson r (regression) by ``powerbert.training.metrics.dev_metrics``,
    the loss a mean over the examples.
    """
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
    result = {"loss": total / len(y), "examples": len(y), "metric": metric_name(labels.regression)}
    result.update(dev_metrics(logits.detach().double().cpu().numpy(), y.cpu().numpy(), labels.regression))
    return result


def real_lengths(dataset: TensorDataset) -> torch.Tensor:
    """``[examples]`` int64: the real tokens of every example of a tokenised set (its mask's sums)."""
    return dataset.tensors[1].sum(dim=1)
