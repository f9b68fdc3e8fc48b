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


# ----------------------------------------------------------------------------- packed (varlen) path

_forced_packed: bool | None = None


@contextlib.contextmanager
def use_packed(enabled: bool | None):
    """Force the packed (varlen) inference forward on (True), off (False) or by device (None)
    inside a block. Forced on with CPU tensors, its kernels run under ``TRITON_INTERPRET=1``
    (how the CPU tests run the GPU code path)."""
    global _forced_packed
    if enabled not in (None, True, False):
        raise ValueError(f"use_packed takes None, True or False, got {enabled!r}")
    previous, _forced_packed = _forced_packed, enabled
    try:
        yield
    finally:
        _forced_packed = previous


PACKED_CUDA_DTYPES = (torch.float16, torch.bfloat16)


def packed_wanted(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a forward on this device and dtype takes the packed path: forced by
    :func:`use_packed`, else CUDA in fp16/bf16 (fp32, fp64 and CPU keep the padded layout)."""
    if _forced_packed is not None:
        return _forced_packed and dtype in PACKED_CUDA_DTYPES + (torch.float32,)
    return device.type == "cuda" and dtype in PACKED_CUDA_DTYPES


def head_dim_served(head_dim: int) -> bool:
    """True when the attention kernels (Triton, and so the packed path) take this head dimension."""
    from kernels.attention import HEAD_DIMS

    return head_dim in HEAD_DIMS


_capability: dict[int, tuple[int, int]] = {}


def flash_attention_serves(q: torch.Tensor) -> bool:
    """True when PyTorch's FlashAttention-2 varlen forward takes these ``[T, H, d]`` operands:
    CUDA, fp16/bf16, sm8x or sm90, ``d % 8 == 0`` and ``d <= 256``, flash SDP enabled. Never when the
    Triton backend is forced (the interpreter tests run the Triton varlen kernel)."""
    if not q.is_cuda or q.dtype not in PACKED_CUDA_DTYPES or _forced_backend == "triton":
        return False
    if q.shape[-1] % 8 or q.shape[-1] > 256 or not torch.backends.cuda.flash_sdp_enabled():
        return False
    index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    if index not in _capability:
        _capability[index] = torch.cuda.get_device_capability(index)
    # PyTorch's FlashAttention-2 runs on sm8x and sm90 only (mha_varlen_fwd checks it); newer
    # architectures take the Triton varlen kernel.
    return _capability[index][0] in (8, 9)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int):
    """Attention within each packed sequence: ``(out [T, H, d] in q's dtype, lse [H, T] fp32, natural log)``.

    q, k, v: ``[T, H, d]`` (last dimension contiguous). cu_seqlens: ``[B + 1]`` int32 on their device.
    max_len: a host int >= every sequence's length. FlashAttention-2 (one launch) where it
    serves, else ``kernels.varlen_attention`` (Triton; the reference on CPU unless forced).
    """
    if flash_attention_serves(q):
        out, lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, 0.0, False, False)
        return out, lse
    return kernels.varlen_attention(q, k, v, cu_seqlens, max_len, backend=_kernel_backend(q))


def lse_significance(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_len: int) -> torch.Tensor:
    """Per-head attention each packed key receives: ``[H, T]`` fp32 (``kernels.lse_significance``)."""
    return kernels.lse_significance(q, k, lse, cu_seqlens, max_len, backend=_kernel_backend(q))


def select_gather_norm(x: torch.Tensor, partials: torch.Tensor | None, cu_in: torch.Tensor, cu_out: torch.Tensor, *,
                       max_len_in: int, max_keep: int, out_rows: int, norm: torch.nn.LayerNorm,
                       pre_bias: torch.Tensor | None, residual_bias: torch.Tensor | None,
                       positions: torch.Tensor, select: bool):
    """Per-sequence top-k, gather, bias and LayerNorm of packed rows (``kernels.select_gather_norm``).

    Returns ``(y [out_rows, D], y + residual_bias [out_rows, D], positions [out_rows] int64)``:
    the survivors normalised by ``norm``, the same plus ``residual_bias``, and each survivor's
    entry in ``positions`` (input positions carried through the layers at no extra launch).
    """
    return kernels.select_gather_norm(
        x, partials, cu_in, cu_out, max_len_in=max_len_in, max_keep=max_keep, out_rows=out_rows,
        weight=norm.weight, bias=norm.bias, eps=norm.eps, pre_bias=pre_bias, residual_bias=residual_bias,
        positions=positions, select=select, backend=_kernel_backend(x))
