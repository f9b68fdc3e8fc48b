"""The one dispatch point between model code and ``kernels/``.

``kernels`` picks Triton on CUDA tensors and a vectorised torch path on CPU tensors. Here we
add what only the model side knows:

* when autograd must see the gather (training), the indices still come from the kernels but
  the rows are gathered with differentiable torch ops;
* whether a layer can use the Triton attention that emits significance scores (CUDA, no
  autograd): then the ``[B, H, n, n]`` probabilities are never materialised;
* ``use_backend("triton")`` forces the Triton kernels on CPU tensors, so that model-level tests
  can run the GPU code path under ``TRITON_INTERPRET=1``.

Only public ``kernels`` names are used here (the ops, ``HEAD_DIMS``, ``triton_serves``).
"""
from __future__ import annotations

import contextlib

import torch

import kernels
from kernels.launch import size_max, size_min  # noqa: F401 (re-exported: sizes int or symbolic)

_forced_backend: str | None = None


@contextlib.contextmanager
def use_backend(backend: str | None):
    """Force the kernel backend (``"triton"``, ``"torch"`` or None = by device) inside a block."""
    global _forced_backend
    if backend not in (None, "triton", "torch"):
        raise ValueError(f"backend must be None, 'triton' or 'torch', got {backend!r}")
    previous, _forced_backend = _forced_backend, backend
    try:
        yield
    finally:
        _forced_backend = previous


def _needs_autograd(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def fused_attention_available(hidden: torch.Tensor, head_dim: int) -> bool:
    """True if the Triton attention + significance kernel serves this layer.

    It does on CUDA (or when forced) for head dims and dtypes it supports (on CUDA fp16/bf16:
    fp32 takes the probabilities path), and never under autograd (the kernel has no backward;
    training takes the eager path), nor for float64 models.
    """
    from kernels.attention import HEAD_DIMS, triton_serves

    if (_needs_autograd(hidden) or head_dim not in HEAD_DIMS
            or not triton_serves(hidden.device, hidden.dtype)):
        return False
    if _forced_backend is not None:
        return _forced_backend == "triton"
    return hidden.is_cuda


def gather_rows(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Differentiable row gather: x ``[B, n, ...]``, indices ``[B, k]`` int64 -> ``[B, k, ...]``.

    One ``index_select`` over the flattened ``[B * n]`` rows: ``torch.gather`` would need its index
    expanded to the output's shape, which an exported graph materialises (ONNX Expand +
    GatherElements).
    """
    batch, n = x.shape[:2]
    flat = (indices + torch.arange(batch, device=indices.device)[:, None] * n).reshape(-1)
    return x.reshape(batch * n, *x.shape[2:]).index_select(0, flat).view(*indices.shape, *x.shape[2:])


def extract(probs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k, width: int | None = None):
    """Score, select and gather (powerbert/ALGORITHM.md §1-§2) through ``kernels.extract`` (two launches).

    Args:
        probs: ``[B, H, n, n]`` attention probabilities of this layer (fp32/fp16/bf16).
        hidden: ``[B, n, D]`` vectors to gather (any float dtype).
        mask: ``[B, n]`` bool, True for real tokens.
        k: vectors to keep (k >= n keeps everything), or a ``[B]`` int64 tensor: row i keeps
            ``k[i]`` (then ``width`` output slots; unused slots are padding in ``mask_kept``).

    Returns:
        ``(hidden_kept [B, k', D], mask_kept [B, k'], indices [B, k'] int64)``, ``k' = min(k, n)``
        (``min(width, n)`` for a per-row k).
    """
    return _select_and_gather(kernels.extract, probs, hidden, mask, k, width)


def _kernel_backend(first: torch.Tensor) -> str | None:
    """The backend to hand a kernel whose dtype follows ``first``: the forced one, except that
    float64 stays on the torch path even when Triton is forced (the kernels take fp16/bf16/fp32)."""
    return None if first.dtype == torch.float64 else _forced_backend


def significance(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Significance scores (powerbert/ALGORITHM.md §1) of a layer's probabilities, outside autograd.

    Args:
        probs: ``[B, H, n, n]`` attention probabilities (fp32/fp16/bf16/fp64; detached here:
            the ranking is not differentiable).
        mask: ``[B, n]`` bool/int/float, nonzero for real tokens.

    Returns:
        ``[B, n]`` float32 (float64 for float64 probs): the attention each key receives from the
        real query tokens but itself, summed over heads; ``-inf`` at padding.
    """
    with torch.no_grad():
        return kernels.significance(probs.detach(), mask, backend=_kernel_backend(probs))


def _select_and_gather(op, first: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k, width):
    """Run ``op(first, hidden, mask, k)`` (an extract kernel); under autograd gather with
    differentiable torch ops.

    The Triton gather has no backward, and selection is not differentiable anyway: the kernels
    give the indices, and only the gathered vectors carry gradients.
    """
    backend = _kernel_backend(first)
    shape = {} if width is None else {"width": width}  # a per-row k comes with its output width
    if _needs_autograd(hidden):
        with torch.no_grad():
            _, mask_kept, indices = op(first.detach(), hidden.detach(), mask, k, backend=backend, **shape)
        return gather_rows(hidden, indices), mask_kept, indices
    return op(first, hidden, mask, k, backend=backend, **shape)


def attention_with_significance(q, k, v, mask):
    """Triton attention that also returns significance scores (no n x n probabilities stored).

    q, k, v ``[B, H, n, d]``, mask ``[B, n]`` bool -> ``(context [B, H, n, d], scores [B, n] fp32,
    float64 for float64 inputs)``.
    """
    return kernels.attention_with_significance(q, k, v, mask, backend=_forced_backend)


def extract_from_scores(scores: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k,
                        width: int | None = None):
    """Select by precomputed ``scores [B, n]`` fp32 and gather ``hidden [B, n, D]`` and ``mask``.

    ``k`` and ``width`` and the result as :func:`extract`.
    """
    return _select_and_gather(kernels.extract_from_scores, scores, hidden, mask, k, width)


def onnx_tie_order():
    """Context manager: a selection traced inside it relies on ONNX TopK's tie order (lower index
    first), two TopK nodes per layer; only for graphs bound for ONNX Runtime (``kernels.onnx_tie_order``)."""
    return kernels.onnx_tie_order()
