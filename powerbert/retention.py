"""The retention configuration (k_1, ..., k_L): validation and ideal speedups.

ALGORITHM.md §2 defines the configuration, §6 the cost model the ideals come from.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence


def validate_retention(retention, num_layers: int, max_length: int | None = None) -> tuple[int, ...]:
    """Check a retention configuration and return it as a tuple of ints.

    Args:
        retention: one positive int per encoder layer, non-increasing: ``retention[l]`` is the
            number of word vectors kept after layer ``l + 1``'s attention.
        num_layers: L, the number of encoder layers (applications) of the model.
        max_length: if given, the largest sensible entry (the model's maximum input length).

    Raises:
        TypeError: ``retention`` is not a sequence of ints.
        ValueError: wrong length, an entry below 1 or above ``max_length``, or an entry larger
            than the one before it (the configuration must not grow).
    """
    if isinstance(retention, (str, bytes)) or not isinstance(retention, Sequence):
        raise TypeError(
            f"retention must be a sequence of {num_layers} ints (one per layer), got {type(retention).__name__}"
        )
    if len(retention) != num_layers:
        raise ValueError(
            f"retention has {len(retention)} entries but the model has {num_layers} layers; "
            f"give one int per layer"
        )
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


def effective_lengths(retention: Sequence[int], seq_len: int) -> list[int]:
    """Vectors that leave each layer for inputs of length ``seq_len``: ``min(k_l, seq_len)``."""
    return [min(int(k), seq_len) for k in retention]


def vector_ratio(retention: Sequence[int], seq_len: int) -> float:
    """Ideal speedup by vectors processed: ``L * N / sum_l min(k_l, N)`` (ALGORITHM.md §6)."""
    return len(retention) * seq_len / sum(effective_lengths(retention, seq_len))


def layer_flops(n_in: int, k_out: int, hidden: int, intermediate: int) -> int:
    """Multiply-adds of one layer: attention on ``n_in`` vectors, FFN on ``k_out`` (§6)."""
    return 4 * n_in * hidden**2 + 2 * n_in**2 * hidden + 2 * k_out * hidden * intermediate


def flops_ideal(retention: Sequence[int], seq_len: int, hidden: int, intermediate: int) -> float:
    """Ideal speedup by the §6 cost model: stock multiply-adds over patched multiply-adds."""
    stock = len(retention) * layer_flops(seq_len, seq_len, hidden, intermediate)
    patched, n_in = 0, seq_len
    for k in effective_lengths(retention, seq_len):
        patched += layer_flops(n_in, k, hidden, intermediate)
        n_in = k
    return stock / patched
