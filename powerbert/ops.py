"""The one dispatch point between model code and ``kernels/``.

``kernels`` picks Triton on CUDA tensors and a vectorised torch path on CPU tensors. Here we
add what only the model side knows: when autograd must see the gather (training), the
indices still come from the kernels but the rows are gathered with differentiable torch ops.
"""
from __future__ import annotations

import torch

import kernels


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Differentiable row gather: x ``[B, n, ...]``, indices ``[B, k]`` int64 -> ``[B, k, ...]``."""
    index = indices.view(*indices.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
    return torch.gather(x, 1, index)


def extract(probs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k: int):
    """Score, select and gather (ALGORITHM.md §1-§2) through the fused kernel.

    Args:
        probs: ``[B, H, n, n]`` attention probabilities of this layer (fp32/fp16/bf16).
        hidden: ``[B, n, D]`` vectors to gather (any float dtype).
        mask: ``[B, n]`` bool, True for real tokens.
        k: vectors to keep (k >= n keeps everything).

    Returns:
        ``(hidden_kept [B, k', D], mask_kept [B, k'], indices [B, k'] int64)``, ``k' = min(k, n)``.
    """
    if _needs_autograd(hidden):
        # Selection is not differentiable; only the gathered vectors carry gradients.
        with torch.no_grad():
            _, mask_kept, indices = kernels.extract(probs.detach(), hidden.detach(), mask, k)
        return gather_rows(hidden, indices), mask_kept, indices
    return kernels.extract(probs, hidden, mask, k)
