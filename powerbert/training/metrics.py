"""Dev metrics in one place: accuracy (classification) or Pearson r and MSE (regression).

Both the Trainer's ``compute_metrics`` (``powerbert.training.trainer.task_metrics``) and the
pipeline's own evaluation (``powerbert.training.task.evaluate_model``) call ``dev_metrics``, so
the dev criterion a step keeps the best of is the one ``powerbert evaluate`` reports. numpy only:
the Trainer hands over numpy arrays, and the pipeline's torch tensors convert for free on the CPU.
"""
from __future__ import annotations

import math

import numpy as np


def metric_name(regression: bool) -> str:
    """The name of the dev criterion: ``"pearson"`` (regression) or ``"accuracy"``."""
    return "pearson" if regression else "accuracy"


def dev_metrics(logits, targets, regression: bool) -> dict:
    """The dev criterion of a set's outputs.

    Args:
        logits: ``[examples, outputs]`` float array (numpy or anything ``np.asarray`` takes);
            regression reads the first output.
        targets: ``[examples]`` labels: int class ids (classification) or float targets.
        regression: which task the outputs are for.

    Returns:
        ``{"value": accuracy}`` (classification) or ``{"value": Pearson r, "mse": ...}``
        (regression, in float64; a constant prediction's undefined r, or one example's, counts
        as 0). ``value`` is what the pipeline keeps the best of.
    """
    targets = np.asarray(targets)
    if regression:
        pred = np.asarray(logits, dtype=np.float64).reshape(len(targets), -1)[:, 0]
        target = targets.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            pearson = float(np.corrcoef(pred, target)[0, 1]) if len(target) > 1 else float("nan")
        return {"value": 0.0 if math.isnan(pearson) else pearson, "mse": float(np.mean((pred - target) ** 2))}
    return {"value": float(np.mean(np.argmax(np.asarray(logits), axis=-1) == targets))}
