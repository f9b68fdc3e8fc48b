"""Calibrate without labels or training: the fastest proportional configuration that stays close to stock.

A small family of proportional configurations (powerbert/ALGORITHM.md §8) is searched on calibration texts:

    f_l = a * (b / a) ** ((l - 1) / (L - 1)),   l = 1..L,   for every pair a >= b of ``shares``

(geometric from a share ``a`` after the first layer to ``b`` after the last; ``a == b`` is flat).
Each candidate's outputs on the calibration texts are compared with the unpatched model's:
the mean cosine similarity of the embeddings (a ``SentenceTransformer``), or the share of texts
whose predicted class is unchanged (a sequence classifier). Candidates run from the slowest to
the fastest by the ideal speedup (vectors processed against stock with dynamic padding, texts
batched as ``encode`` batches them); a candidate keeping no more vectors than one that already
failed, at every layer, is skipped as failing too. The fastest passing candidate is then
checked on held-out texts (the next one is tried if it falls short there), and timed against
the stock model on them. Nothing here reads a label.

``calibrate`` returns a :class:`Calibration` (configuration and report);
``powerbert.calibration_output.save`` writes the patched model folder (``config.json`` holds
``powerbert_retention``) with ``calibration.json`` and ``calibration.md`` beside it.
"""
from __future__ import annotations

import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from powerbert.front_door import is_patched, patch, unpatch
from powerbert.calibration_targets import num_layers, target_for
from powerbert.inputs.checks import check_int, check_number
from powerbert.inputs.model_folder import check_max_length
from powerbert.inputs.text_budget import bound_texts
from powerbert.elimination.retention import (cost_model_sizes, flops_ideal_vs_dynamic_padding, ideal_vs_dynamic_padding,
                                             validate_minimum)
from powerbert.sentence_models import hf_model, is_sentence_model

DEFAULT_SHARES = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2)
QUANTILES = (0.01, 0.05, 0.1, 0.25, 0.5)
# Fewer held-out texts than this and the check's mean, min and quantiles say little: a warning.
MIN_HOLDOUT_TEXTS = 32


class CalibrationWarning(UserWarning):
    """The held-out check is off or runs on too few texts (``holdout_warnings``)."""


def family_configuration(a: float, b: float, num_layers: int) -> tuple[float, ...]:
    """The family's configuration for shares ``a >= b``: ``f_l = a (b/a)^((l-1)/(L-1))`` over
    ``num_layers`` layers, rounded to 4 decimals, never above the layer before (or 1.0)."""
    steps = max(num_layers - 1, 1)
    config = tuple(round(a * (b / a) ** (layer / steps), 4) for layer in range(num_layers))
    return tuple(min(value, previous) for value, previous in zip(config, (1.0,) + config))


def candidate_family(num_layers: int, shares=DEFAULT_SHARES) -> list[tuple[float, ...]]:
    """Every configuration ``f_l = a (b/a)^((l-1)/(L-1))`` for shares ``a >= b`` (keep-all left out),
    rounded to 4 decimals, without duplicates."""
    check_int("num_layers", num_layers, 1)
    shares = sorted({float(s) for s in shares}, reverse=True)
    if not shares or any(not 0.0 < s <= 1.0 for s in shares):
        raise ValueError(f"shares must be floats in (0, 1], got {shares}")
    out = {}
    for a in shares:
        for b in shares:
            if b > a:
                continue
            config = family_configuration(a, b, num_layers)
            if all(value == 1.0 for value in config):
                continue
            out.setdefault(config, (a, b))
    return list(out)


def _dominated(config, failed) -> bool:
    """``config`` keeps no more than a failed configuration at every layer (so it fails too)."""
    return any(all(c <= f for c, f in zip(config, bad)) for bad in failed)


# ----------------------------------------------------------------------------- the search


@dataclass
class Calibration:
    """What ``calibrate`` found.

    Attributes:
        retention: the chosen proportional configuration, or None if no candidate reached the threshold.
        retention_min: the per-layer minimum it runs with (None: 1).
        report: everything measured (JSON-serialisable): settings, every candidate, the held-out
            score distribution, ideal and measured speedups.
    """

    retention: tuple[float, ...] | None
    retention_min: tuple[int, ...] | None
    report: dict = field(repr=False)

    def apply(self, model: nn.Module) -> nn.Module:
        """``powerbert.patch(model, retention, retention_min=...)``."""
        if self.retention is None:
            raise ValueError("no configuration reached the threshold; nothing to apply")
        return patch(model, list(self.retention), retention_min=self.retention_min)


def _distribution(scores: torch.Tensor, threshold: float) -> dict:
    values = scores.double()
    hist, edges = np.histogram(values.numpy(), bins=10, range=(float(min(values.min(), 0.5)), 1.0))
    return {
        "texts": int(values.numel()),
        "mean": float(values.mean()),
        "min": float(values.min()),
        "quantiles": {f"p{round(q * 100):02d}": float(torch.quantile(values, q)) for q in QUANTILES},
        "share_below_threshold": float((values < threshold).double().mean()),
        "histogram": {"edges": [round(float(e), 4) for e in edges], "counts": hist.tolist()},
    }


def _batches(lengths: list[int], order: np.ndarray, batch_size: int) -> list[list[int]]:
    ordered = [lengths[i] for i in order]
    return [ordered[start:start + batch_size] for start in range(0, len(ordered), batch_size)]


def _evaluate(target, texts, stock, retention, retention_min) -> torch.Tensor:
    patch(target.model, list(retention), retention_min=retention_min)
    try:
        return target.scores(stock, target.outputs(texts))
    finally:
        unpatch(target.model)


def measure(target, texts: list[str], retention, retention_min=None, rounds: int = 3) -> dict:
    """Time the stock and the patched model on ``texts`` (``encode`` for embeddings), alternating.

    One warm-up call each, then ``rounds`` rounds of (stock, patched). Returns the medians and the
    median of the per-round ratios (``paired``), with the threads and device they ran on.
    """
    stock_s, patched_s = [], []

    def timed(patched: bool) -> float:
        if patched:
            patch(target.model, list(retention), retention_min=retention_min)
        try:
            start = time.perf_counter()
            target.outputs(texts)
            return time.perf_counter() - start
        finally:
            if patched:
                unpatch(target.model)

    timed(False), timed(True)
    for _ in range(rounds):
        stock_s.append(timed(False))
        patched_s.append(timed(True))
    return {
        "rounds": rounds, "texts": len(texts), "batch_size": target.batch_size,
        "stock_s": stock_s, "patched_s": patched_s,
        "stock_median_s": statistics.median(stock_s), "patched_median_s": statistics.median(patched_s),
        "speedup": statistics.median(stock_s) / statistics.median(patched_s),
        "paired": statistics.median(s / p for s, p in zip(stock_s, patched_s)),
        "threads": torch.get_num_threads(), "device": str(next(target.hf.parameters()).device),
        "cpu": platform.processor() or platform.machine(),
    }


def ideals(target, retention, lengths: list[int], order: np.ndarray, minimum=None) -> dict:
    """Ideal speedups of ``retention`` against stock with dynamic padding, texts batched in ``order``
    (``target.batch_size`` a batch): ``vector_ideal`` (vectors processed, powerbert/ALGORITHM.md §8),
    ``flops_ideal`` (§6 per sequence) and ``layout_ideal`` (vectors processed by the padded
    layout the patched model runs: each layer's batch padded to its largest keep count)."""
    batches = _batches(lengths, order, target.batch_size)
    hidden, intermediate = cost_model_sizes(target.hf.config)
    return {"vector_ideal": ideal_vs_dynamic_padding(retention, batches, minimum),
            "flops_ideal": flops_ideal_vs_dynamic_padding(retention, batches, hidden, intermediate, minimum),
            "layout_ideal": ideal_vs_dynamic_padding(retention, batches, minimum, layout="padded")}


def search(target, texts: list[str], min_value: float, *, shares=DEFAULT_SHARES, retention_min=None,
           progress: bool = True) -> list[dict]:
    """Score the candidate family on ``texts`` against the stock outputs, slowest first.

    Returns one record per candidate, sorted by ``vector_ideal``: ``retention``, the ideals
    (``ideals``), ``status`` (``pass``, ``fail`` or skipped as dominated by a failure) and, when
    evaluated, ``calibration_mean``. Every candidate whose mean is >= ``min_value`` is evaluated,
    so the records answer any threshold >= ``min_value`` (``choose``).
    """
    from tqdm.auto import tqdm

    lengths, order = target.lengths(texts), target.order(texts)
    records = [{"retention": list(retention), **ideals(target, retention, lengths, order, retention_min)}
               for retention in candidate_family(num_layers(target), shares)]
    records.sort(key=lambda r: (r["vector_ideal"], r["retention"]))
    stock = target.outputs(texts)
    failed = []
    bar = tqdm(records, desc=f"calibrate ({target.metric} >= {min_value:g})", disable=not progress, unit="config")
    for record in bar:
        if _dominated(record["retention"], failed):
            record["status"] = "skipped: keeps no more than a failed configuration"
            continue
        mean = float(_evaluate(target, texts, stock, record["retention"], retention_min).mean())
        record["calibration_mean"] = mean
        record["status"] = "pass" if mean >= min_value else "fail"
        if mean < min_value:
            failed.append(record["retention"])
        bar.set_postfix(last=f"{mean:.4f}", ideal=f"{record['vector_ideal']:.2f}x")
    bar.close()
    return records


def choose(records: list[dict], threshold: float) -> dict | None:
    """The fastest record (by ``vector_ideal``) whose ``calibration_mean`` is >= ``threshold``."""
    passing = [r for r in records if r.get("calibration_mean", -math.inf) >= threshold]
    return max(passing, key=lambda r: (r["vector_ideal"], -sum(r["retention"])), default=None)


def calibrate(model, texts: list[str], *, min_cosine: float, tokenizer=None, batch_size: int = 32,
              calibration_texts: int = 256, holdout_texts: int = 256, max_length: int | None = None,
              retention_min=None, shares=DEFAULT_SHARES, timing_rounds: int = 3, seed: int = 0,
              progress: bool = True) -> Calibration:
    """Find the fastest proportional configuration whose outputs stay within ``min_cosine`` of stock.

    Args:
        model: an unpatched ``SentenceTransformer`` (score: cosine of each text's embedding to
            the stock one) or Hugging Face sequence classifier with ``tokenizer`` (score: 1 where
            the predicted class is unchanged, so the mean is the agreement).
        texts: unlabelled texts; a seeded shuffle gives ``calibration_texts`` for the search and the
            next ``holdout_texts`` (disjoint) for the check, the score distribution and the timing.
        min_cosine: C in (0, 1]: the mean score must be >= C on both sets.
        retention_min: per-layer minimum kept (``powerbert.patch``'s ``retention_min``).
        shares: the grid of a and b (module docstring).
        timing_rounds: rounds of stock / patched timing on the held-out texts (0: no timing).

    Returns:
        A :class:`Calibration`; its ``retention`` is None when no candidate reaches C.
    """
    check_number("min_cosine", min_cosine, 0, 1, low_open=True)
    hf = hf_model(model) if is_sentence_model(model) else model
    check_max_length(hf.config.to_dict(), max_length, type(model).__name__)  # the check of every command
    texts = [text for text in texts if isinstance(text, str) and text.strip()]
    if len(texts) < 2:
        raise ValueError(f"calibrate needs at least 2 non-empty texts, got {len(texts)}")
    if is_patched(model):
        raise RuntimeError("calibrate compares against the stock model: call powerbert.unpatch(model) first")
    target = target_for(model, tokenizer, batch_size=batch_size, max_length=max_length)
    texts = bound_texts(texts, target.max_length)  # before any tokenizer sees them (text_budget)
    minimum = validate_minimum(retention_min, num_layers(target))
    order = np.random.default_rng(seed).permutation(len(texts))
    n_cal, n_hold = split_sizes(len(texts), calibration_texts, holdout_texts)
    calibration = [texts[i] for i in order[:n_cal]]
    holdout = [texts[i] for i in order[n_cal:n_cal + n_hold]]
    holdout_notes = holdout_warnings(len(texts), calibration_texts, holdout_texts, n_cal, n_hold)
    for note in holdout_notes:  # also in the report, calibration.md and (the CLI) stderr
        warnings.warn(note, CalibrationWarning, stacklevel=2)
    records = search(target, calibration, min_cosine, shares=shares, retention_min=minimum, progress=progress)
    cal_lengths = target.lengths(calibration)

    # The fastest passing candidate that holds on the held-out texts too.
    chosen, holdout_scores, hold_stock = None, None, None
    for record in sorted((r for r in records if r["status"] == "pass"), key=lambda r: -r["vector_ideal"]):
        if not holdout:
            chosen = record
            break
        if hold_stock is None:
            hold_stock = target.outputs(holdout)
        scores = _evaluate(target, holdout, hold_stock, record["retention"], minimum)
        record["holdout_mean"] = float(scores.mean())
        if record["holdout_mean"] >= min_cosine:
            chosen, holdout_scores = record, scores
            break
        record["status"] = "pass on calibration, fail on held-out"

    report = {
        "metric": target.metric,
        "min_value": min_cosine,
        "model_class": type(model).__name__,
        "family": "f_l = a * (b / a) ** ((l - 1) / (L - 1)), a >= b in shares",
        "shares": sorted(shares, reverse=True),
        "retention_min": None if minimum is None else list(minimum),
        "seed": seed, "batch_size": batch_size,
        "calibration_texts": len(calibration), "holdout_texts": len(holdout), "warnings": holdout_notes,
        "calibration_mean_tokens": statistics.fmean(cal_lengths),
        "candidates": records,
        "evaluated": sum("calibration_mean" in r for r in records),
        "chosen": None,
        "versions": _versions(),
    }
    if chosen is None:
        return Calibration(None, minimum, report)
    retention = tuple(chosen["retention"])
    summary = {"retention": list(retention), "calibration_mean": chosen["calibration_mean"],
               "vector_ideal_calibration": chosen["vector_ideal"], "flops_ideal_calibration": chosen["flops_ideal"]}
    if holdout:
        hold_lengths = target.lengths(holdout)
        summary.update(holdout=_distribution(holdout_scores, min_cosine),
                       holdout_mean_tokens=statistics.fmean(hold_lengths),
                       **ideals(target, retention, hold_lengths, target.order(holdout), minimum))
        if timing_rounds > 0:
            summary["timing"] = measure(target, holdout, retention, minimum, timing_rounds)
    report["chosen"] = summary
    return Calibration(retention, minimum, report)


def split_sizes(available: int, calibration_texts: int, holdout_texts: int) -> tuple[int, int]:
    """``(calibration, held-out)`` texts taken from ``available``: as asked when there are enough;
    otherwise in the asked proportion (at least one of each while a held-out set is asked for), so
    a short file does not leave the held-out check one text."""
    if calibration_texts + holdout_texts <= available:
        return calibration_texts, holdout_texts
    if holdout_texts == 0:
        return min(calibration_texts, available), 0
    hold = min(available - 1, max(1, round(available * holdout_texts / (calibration_texts + holdout_texts))))
    return min(calibration_texts, available - hold), hold


def holdout_warnings(available: int, calibration_texts: int, holdout_texts: int, n_cal: int, n_hold: int) -> list[str]:
    """What the report, stderr and ``calibration.md`` say when the held-out check is off, smaller
    than asked or under ``MIN_HOLDOUT_TEXTS``: the choice is then checked on too few texts."""
    out = []
    if holdout_texts == 0:
        out.append("the held-out check is off (holdout_texts 0): the choice is checked on the calibration texts only")
    elif n_hold < holdout_texts:
        out.append(f"{available} texts for {calibration_texts} calibration + {holdout_texts} held-out: split "
                   f"{n_cal} + {n_hold} in the asked proportion")
    if 0 < n_hold < MIN_HOLDOUT_TEXTS:
        out.append(f"only {n_hold} held-out texts (fewer than {MIN_HOLDOUT_TEXTS}): their mean, min and quantiles "
                   f"say little; give more texts")
    return out


def _versions() -> dict:
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version()}
    try:
        import sentence_transformers

        versions["sentence_transformers"] = sentence_transformers.__version__
    except ImportError:
        pass
    return versions


def texts_from_file(path, text_column: str | None = None) -> list[str]:
    """The non-empty texts of a CSV/TSV/JSONL file's text column (default: text, sentence, ...),
    read by ``powerbert.inputs.tables.read_texts``."""
    from powerbert.inputs.tables import read_texts

    corpus = read_texts(path, text_column, pairs=False)
    texts = [text for text in corpus.texts if text.strip()]
    if len(texts) < 2:
        raise ValueError(f"{path} holds {len(texts)} non-empty texts in column {corpus.text_column!r}; "
                         f"calibrate needs >= 2")
    return texts
