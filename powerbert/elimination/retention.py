"""The retention configuration: validation, per-sequence keep counts and ideal speedups.

Two kinds (powerbert/ALGORITHM.md §2 and §8):
* fixed: ints (k_1, ..., k_L), the same number of slots for every sequence of a batch;
* proportional: floats 1 >= f_1 >= ... >= f_L > 0, a share of each sequence's own length:
  ``k_{l,i} = min(k_{l-1,i}, max(m_l, ceil(f_l * len_i)))`` with ``k_{0,i} = len_i`` and optional
  per-layer minimums m_l (default 1).
§6 gives the cost model the ideals come from.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

from powerbert.elimination.dispatch import size_max, size_min


def is_proportional(retention: Sequence) -> bool:
    """True for a proportional configuration (floats), False for a fixed one (ints)."""
    return any(isinstance(value, float) for value in retention)


def validate_retention(retention, num_layers: int, max_length: int | None = None) -> tuple:
    """Check a retention configuration and return it as a tuple of ints or of floats.

    Args:
        retention: one entry per encoder layer, non-increasing. Ints >= 1 (fixed):
            ``retention[l]`` word vectors are kept after layer ``l + 1``'s attention. Floats in
            (0, 1] (proportional): that share of each sequence's real tokens is kept.
        num_layers: L, the number of encoder layers (applications) of the model.
        max_length: if given, the largest sensible int entry (the model's maximum input length).

    Raises:
        TypeError: ``retention`` is not a sequence of ints or of floats (not a mix).
        ValueError: wrong length, an entry out of range, or an entry larger than the one before
            it (the configuration must not grow).
    """
    if isinstance(retention, (str, bytes)) or not isinstance(retention, Sequence):
        raise TypeError(
            f"retention must be a sequence of {num_layers} ints or floats (one per layer), "
            f"got {type(retention).__name__}"
        )
    if len(retention) != num_layers:
        raise ValueError(
            f"retention has {len(retention)} entries but the model has {num_layers} layers; "
            f"give one int (or one float) per layer"
        )
    if is_proportional(retention):
        return _validate_fractions(retention)
    values = []
    for layer, k in enumerate(retention):
        if isinstance(k, bool) or not isinstance(k, numbers.Integral):
            raise TypeError(f"retention[{layer}] must be an int, got {k!r} ({type(k).__name__})")
        k = int(k)
        if k < 1:
            raise ValueError(f"retention[{layer}] = {k}: every layer must keep at least 1 word vector (k >= 1)")
        if max_length is not None and k > max_length:
            raise ValueError(
                f"retention[{layer}] = {k} exceeds the model's maximum input length {max_length}"
            )
        if values and k > values[-1]:
            raise ValueError(
                f"retention must be non-increasing: retention[{layer}] = {k} > retention[{layer - 1}] = {values[-1]}"
            )
        values.append(k)
    return tuple(values)


def _validate_fractions(retention) -> tuple[float, ...]:
    values: list[float] = []
    for layer, f in enumerate(retention):
        if not isinstance(f, float):
            raise TypeError(
                f"retention[{layer}] = {f!r}: a proportional configuration is all floats in (0, 1] "
                f"(write 1.0, not 1); ints are a fixed configuration"
            )
        if not (0.0 < f <= 1.0):
            raise ValueError(f"retention[{layer}] = {f!r}: a fraction must be in (0, 1]")
        if values and f > values[-1]:
            raise ValueError(
                f"retention must be non-increasing: retention[{layer}] = {f} > retention[{layer - 1}] = {values[-1]}"
            )
        values.append(f)
    return tuple(values)


def validate_minimum(minimum, num_layers: int) -> tuple[int, ...] | None:
    """Per-layer minimum m_l of a proportional configuration: None, one int >= 1 for every
    layer, or one int >= 1 per layer. Returns the per-layer tuple or None (all 1)."""
    if minimum is None:
        return None
    if isinstance(minimum, numbers.Integral) and not isinstance(minimum, bool):
        minimum = [int(minimum)] * num_layers
    if isinstance(minimum, (str, bytes)) or not isinstance(minimum, Sequence) or len(minimum) != num_layers:
        raise ValueError(f"retention_min must be an int >= 1 or {num_layers} ints >= 1 (one per layer), got {minimum!r}")
    for layer, m in enumerate(minimum):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1:
            raise ValueError(f"retention_min[{layer}] = {m!r}: must be an int >= 1")
    return tuple(int(m) for m in minimum)


def row_keep_counts(fractions: Sequence[float], minimum: Sequence[int] | None,
                    lengths: torch.Tensor) -> torch.Tensor:
    """Vectors each sequence keeps after each layer under a proportional configuration (§8).

    Args:
        fractions: (f_1, ..., f_L). minimum: (m_1, ..., m_L) or None (all 1).
        lengths: ``[B]`` integer tensor, len_i = real tokens of sequence i ([CLS], [SEP] included).

    Returns:
        ``[L, B]`` int64 on the lengths' device: ``k_{l,i} = min(k_{l-1,i}, max(m_l, ceil(f_l len_i)))``,
        ``k_{0,i} = len_i``, product and ceil in float64.
    """
    length = lengths.to(torch.float64)
    keep = lengths.to(torch.int64)
    rows = []
    for layer, fraction in enumerate(fractions):
        m = 1 if minimum is None else minimum[layer]
        share = torch.ceil(length * fraction).to(torch.int64).clamp(min=m)
        keep = torch.minimum(keep, share)
        rows.append(keep)
    return torch.stack(rows)


def keep_count_rows(retention: Sequence, lengths, minimum: Sequence[int] | None = None) -> torch.Tensor:
    """Vectors each sequence keeps after each layer, either kind of configuration.

    Args:
        retention: ints (fixed) or floats (proportional), one per layer.
        lengths: ``[B]`` integer tensor (or a sequence of ints): the real tokens of each sequence.
        minimum: per-layer minimums of a proportional configuration (None: all 1).

    Returns:
        ``[L, B]`` int64 on the lengths' device: ``min(k_l, len_i)`` (fixed) or
        :func:`row_keep_counts` (proportional).
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    if is_proportional(retention):
        return row_keep_counts(retention, minimum, lengths)
    slots = torch.tensor([int(k) for k in retention], dtype=torch.int64, device=lengths.device)
    return torch.minimum(slots[:, None], lengths[None])


def keep_counts(retention: Sequence, seq_len: int, minimum: Sequence[int] | None = None) -> list[int]:
    """Vectors kept after each layer for one sequence of ``seq_len`` real tokens, either kind.

    Plain Python, no tensor: the static layout's widths come from here while ``torch.compile``
    traces, where a tensor's ``tolist`` would be a data-dependent value. The proportional counts
    are :func:`row_keep_counts`' formula in Python floats, which are float64 as there.
    """
    if is_proportional(retention):
        counts, keep = [], seq_len
        for layer, fraction in enumerate(retention):
            m = 1 if minimum is None else minimum[layer]
            # no guard on a symbolic length (torch.export)
            keep = size_min(keep, size_max(m, math.ceil(seq_len * float(fraction))))
            counts.append(keep)
        return counts
    return effective_lengths(retention, seq_len)


def effective_lengths(retention: Sequence[int], seq_len: int) -> list[int]:
    """Vectors that leave each layer for inputs of length ``seq_len``: ``min(k_l, seq_len)``."""
    return [min(int(k), seq_len) for k in retention]


def vector_counts(retention: Sequence, seq_len: int, minimum: Sequence[int] | None = None) -> tuple[int, int]:
    """``(kept, total)`` word vectors of one sequence of ``seq_len`` tokens over all layers:
    ``sum_l k_l`` (as :func:`keep_counts` gives k_l) and the stock model's ``L * seq_len``."""
    return sum(keep_counts(retention, seq_len, minimum)), len(retention) * seq_len


def vector_ratio(retention: Sequence, seq_len: int, minimum: Sequence[int] | None = None) -> float:
    """Ideal speedup by vectors processed for a sequence of ``seq_len`` tokens:
    ``L * N / sum_l k_l`` (powerbert/ALGORITHM.md §6), with k_l as :func:`keep_counts` gives it."""
    kept, total = vector_counts(retention, seq_len, minimum)
    return total / kept


def real_length_ratio(retention: Sequence, lengths, minimum: Sequence[int] | None = None) -> float:
    """Vector ratio over real lengths, either kind of configuration (powerbert/ALGORITHM.md §6, §8):
    ``sum_i L * len_i / sum_i sum_l k_{l,i}`` with k_{l,i} as :func:`keep_count_rows` gives it:
    the ideal against a stock model that computes no padding at all (dynamic padding computes
    some, so it is a lower bound there).

    Args:
        retention: ints or floats, one per layer. lengths: ``[examples]`` integer tensor (or a
            sequence of ints), the real lengths. minimum: as for :func:`row_keep_counts`.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.int64)
    kept = keep_count_rows(retention, lengths, minimum)
    return len(retention) * int(lengths.sum()) / int(kept.sum())


def padded_vs_dynamic(batches: Sequence[Sequence[int]], seq_len: int) -> float:
    """The stock model's ideal speedup from padding each batch to its longest instead of to
    ``seq_len`` (N): ``sum_b B_b * N / sum_b B_b * max_i len_i``, by vectors processed.

    Args:
        batches: the real lengths of the sequences of each batch. seq_len: N.
    """
    return sum(len(lengths) * seq_len for lengths in batches) / sum(len(lengths) * max(lengths) for lengths in batches)


def cost_model_sizes(config) -> tuple[int, int]:
    """``(hidden, intermediate)`` of a model config for the §6 cost model (:func:`flops_ideal`):
    a ``PretrainedConfig`` or its ``config.json`` as a dict; DistilBERT names them ``dim`` and
    ``hidden_dim``."""
    def read(name):
        return config.get(name) if isinstance(config, dict) else getattr(config, name, None)

    return read("hidden_size") or read("dim"), read("intermediate_size") or read("hidden_dim")


def layer_flops(n_in: int, k_out: int, hidden: int, intermediate: int) -> int:
    """Multiply-adds of one layer: attention on ``n_in`` vectors, FFN on ``k_out`` (§6)."""
    return 4 * n_in * hidden**2 + 2 * n_in**2 * hidden + 2 * k_out * hidden * intermediate


def sequence_flops(retention: Sequence, seq_len: int, hidden: int, intermediate: int,
                   minimum: Sequence[int] | None = None) -> int:
    """Patched multiply-adds of one sequence of ``seq_len`` tokens (§6): layer l's attention on the
    n_{l-1} vectors that entered it (n_0 = seq_len), its FFN on the k_l it keeps."""
    total, n_in = 0, seq_len
    for k in keep_counts(retention, seq_len, minimum):
        total += layer_flops(n_in, k, hidden, intermediate)
        n_in = k
    return total


def flops_ideal(retention: Sequence, seq_len: int, hidden: int, intermediate: int,
                minimum: Sequence[int] | None = None) -> float:
    """Ideal speedup by the §6 cost model: stock multiply-adds over patched multiply-adds."""
    stock = len(retention) * layer_flops(seq_len, seq_len, hidden, intermediate)
    return stock / sequence_flops(retention, seq_len, hidden, intermediate, minimum)


def ideal_vs_dynamic_padding(retention: Sequence, batches: Sequence[Sequence[int]],
                             minimum: Sequence[int] | None = None, *, layout: str = "packed") -> float:
    """The ideal speedup against stock with dynamic padding (powerbert/ALGORITHM.md §8): stock token-layers,
    each batch padded to its longest, over the patched token-layers.

    Args:
        batches: the real lengths of the sequences of each batch, as the caller batches them.
        layout: how the patched model lays out a batch's survivors. ``"packed"`` (varlen): every
            sequence costs its own ``sum_l k_{l,i}``. ``"padded"`` (what ``patch`` runs): after
            layer l every row of a batch is as wide as its widest, ``B * max_i k_{l,i}``; with
            rows of unequal length (unsorted batches) this is the lower, reachable bound.
    """
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
    layers = len(retention)
    stock = sum(layers * max(lengths) * len(lengths) for lengths in batches)
    patched = 0
    for lengths in batches:
        counts = [keep_counts(retention, length, minimum) for length in lengths]
        if layout == "packed":
            patched += sum(sum(c) for c in counts)
        else:
            patched += len(lengths) * sum(max(c[layer] for c in counts) for layer in range(layers))
    return stock / patched


def flops_ideal_vs_dynamic_padding(retention: Sequence, batches: Sequence[Sequence[int]], hidden: int,
                                   intermediate: int, minimum: Sequence[int] | None = None) -> float:
    """The §6 cost model against stock with dynamic padding: stock multiply-adds, each batch padded
    to its longest, over the patched multiply-adds of every sequence on its own real tokens
    (layer l's attention on the n_{l-1,i} vectors that entered it, its FFN on the k_{l,i} kept).

    Unlike :func:`ideal_vs_dynamic_padding` (vectors kept), this counts that the first layer's
    attention always runs on every real token, so it is the bound an implementation can reach.
    """
    layers = len(retention)
    stock = sum(len(lengths) * layers * layer_flops(max(lengths), max(lengths), hidden, intermediate)
                for lengths in batches)
    patched = sum(sequence_flops(retention, length, hidden, intermediate, minimum)
                  for lengths in batches for length in lengths)
    return stock / patched
