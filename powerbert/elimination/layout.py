"""The token layout at the encoder's entry: real tokens first, and no column of padding alone.

powerbert/ALGORITHM.md §7: elimination never needs padding. Positions are already embedded, so moving each
row's real tokens to the front, in order, changes no value (attention is permutation-equivariant
and padding is masked as a key), puts [CLS] at slot 0 whatever the padding side, and lets the
columns that are padding in every row go. Inputs padded to ``max_length`` then cost what
dynamically padded ones cost.

Dropping columns needs the longest row on the host (one synchronisation per forward, and a
data-dependent shape): that is the dynamic layout. The static layout only reorders (no
synchronisation, shapes fixed by the input), for CUDA graphs and ``torch.compile``.
"""
from __future__ import annotations

import torch


def static_shapes_now(static_shapes: bool | None) -> bool:
    """Resolve the ``static_shapes`` setting for this call.

    None (auto) is static while ``torch.compile`` traces or a CUDA graph is being captured
    (neither allows a host synchronisation or a data-dependent shape), dynamic otherwise, on CPU
    and CUDA alike: one synchronisation per forward costs microseconds, computing on padding
    costs a share of every layer.
    """
    if static_shapes is not None:
        return bool(static_shapes)
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def real_tokens_first(hidden: torch.Tensor, mask: torch.Tensor, *, trim: bool):
    """Move each row's real tokens to the front (in order) and, with ``trim``, drop the columns
    that hold padding in every row.

    Args:
        hidden: ``[B, n, D]``. mask: ``[B, n]`` bool, True for real tokens, any layout.
        trim: drop trailing all-padding columns (synchronises with the device once).

    Returns:
        ``(hidden [B, n', D], mask [B, n'], positions [B, n'] int64, padded)``: ``positions`` are
        the input positions of the slots; ``n' = n`` without ``trim``, else the longest row
        (at least 1); ``padded`` is False when no slot holds padding (attention can skip the mask).
    """
    batch, n = mask.shape
    if trim:
        lengths = mask.sum(dim=1)
        right_padded = (mask == (torch.arange(n, device=mask.device) < lengths[:, None])).all()
        longest, shortest, in_order = torch.stack([lengths.max(), lengths.min(), right_padded.long()]).tolist()
        width = max(1, longest)
        padded = shortest < width
        if in_order:  # already right-padded: slicing is enough (views, no copy)
            positions = torch.arange(width, device=mask.device).expand(batch, width)
            return hidden[:, :width], mask[:, :width], positions, padded
    else:
        width, padded = n, True
    # Real tokens first, each group in input order: the smallest of the distinct keys
    # (is padding) * n + position. topk, not a stable sort: ONNX has TopK, no sort.
    key = (~mask).to(torch.int64) * n + torch.arange(n, device=mask.device)
    positions = torch.topk(key, width, dim=1, largest=False, sorted=True).indices
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return torch.gather(hidden, 1, index), torch.gather(mask, 1, positions), positions, padded
