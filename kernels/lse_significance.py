"""Per-head significance partials of packed (varlen) attention, from q, k and the row log-sum-exp.

The significance of key j (powerbert/ALGORITHM.md §1) is the attention it receives from the other
tokens of its sequence, summed over heads. On the GPU the attention itself comes from
FlashAttention-2 (varlen), which returns the output and the natural-log row log-sum-exp ``lse``
but not the probabilities. Knowing the normaliser, this kernel recomputes them tile by tile and
sums columns, without ever writing P:

    partials[h, j] = sum_{i in seq(j), i != j} exp(scale · q[i, h]·k[j, h] − lse[h, i])

Packed layout: ``T`` rows (a capacity) hold ``B`` sequences back to back; ``cu_seqlens``
(int32 ``[B + 1]``, nondecreasing, ``cu[0] = 0``, ``cu[B] <= T``) says sequence b is rows
``cu[b] .. cu[b+1] - 1`` (possibly none). Rows from ``cu[B]`` on belong to no sequence: the
kernel never reads them in q, k or lse and never writes them in the output (they keep what the
fresh buffer holds: NaN under the interpreter / POWERBERT_POISON_OUTPUTS=1, uninitialised on CUDA).

``_lse_colsum_kernel``: grid ``(cdiv(max_seqlen, BLOCK_N), B, H)``. One program owns one key
block of one sequence and one head. It returns at once when its block starts past the
sequence's end (``max_seqlen`` only sizes the grid; no length is ever read on the host, so the
launch can be captured in a CUDA graph), loads its K block once, loops over the sequence's
query blocks recomputing ``P = exp2(q·kᵀ·scale·log2e − lse·log2e)`` (exact: rows outside the
sequence read lse = +inf, hence P = 0; only the query blocks that overlap the key block test
i != j), adds P elementwise into a [BLOCK_M, BLOCK_N] fp32 register tile and reduces it over
rows once. Each partial is written once by one program: deterministic, no atomics, so ties in
the later top-k cannot flip from run to run. Heads sit in the grid (the padded column-sum pass of
kernels.attention loops over them inside a program), so even one sequence fills B·H·cdiv(n, 64)
programs; the launcher narrows BLOCK_N further when that is below about one wave of SMs.

dtypes: fp16/bf16 on CUDA (tl.dot on the input dtype, fp32 accumulation); fp32 too under the
interpreter, where everything is upcast right after the load (its bf16 arithmetic is wrong).
float64, and fp32 on CUDA (IEEE fp32 tl.dot spills registers), take the torch reference, which
reads ``cu_seqlens`` on the host (a sync; not capturable).
"""
from __future__ import annotations

from numbers import Integral

import torch
import triton
import triton.language as tl

from kernels import launch as L
from kernels.attention import HEAD_DIMS

__all__ = ["lse_significance", "lse_significance_ref", "launch_lse_significance", "aot_calls"]

_LOG2E = 1.4426950408889634
# The same constant inside the kernel: lse comes as a natural log, exp2 wants base-2 units.
_LOG2E_C = tl.constexpr(_LOG2E)
# About one wave of an A100 (108 SMs) or H100 (132): the launcher narrows the key block, down to
# 16, while the grid has fewer programs. A constant, not a device query, so the choice is the
# same on every GPU and ahead-of-time compiles see the kernel the JIT builds.
_TARGET_PROGRAMS = 128


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------
def lse_significance_ref(q, k, lse, cu_seqlens, scale=None):
    """Eager reference: explicit probabilities per sequence; the specification of the kernel.

    Args:
        q, k: ``[T, H, d]`` floating tensors (any strides).
        lse: ``[H, T]`` natural-log row log-sum-exp of the scaled logits over each row's sequence.
        cu_seqlens: ``[B + 1]`` integer tensor of sequence boundaries (read on the host).
        scale: logit scale, default ``d ** -0.5``.

    Returns:
        ``[H, T]`` float32 (float64 for float64 q), computed in that dtype:
        ``partials[h, j] = sum_{i in seq(j), i != j} exp(scale * q[i, h]·k[j, h] - lse[h, i])``
        on the rows of a sequence; NaN on rows of no sequence (the kernel leaves them unwritten).
    """
    T, H, d = q.shape
    if scale is None:
        scale = d ** -0.5
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.full((H, T), float("nan"), dtype=cdt, device=q.device)
    cu = [int(c) for c in cu_seqlens.tolist()]
    for start, end in zip(cu[:-1], cu[1:]):
        if end <= start:
            continue
        qs = q[start:end].to(cdt).transpose(0, 1)              # [H, n, d]
        ks = k[start:end].to(cdt).transpose(0, 1)
        logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [H, n(query i), n(key j)]
        probs = torch.exp(logits - lse[:, start:end].to(cdt)[:, :, None])
        probs.diagonal(dim1=-2, dim2=-1).zero_()                # no self vote
        out[:, start:end] = probs.sum(dim=1)
    return out


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _lse_colsum_tile(acc, kt, q_base, lse_base, start_m, offs_n, seqlen, qk_scale,
                     stride_qt, stride_lt, diag,
                     HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr):
    """acc + P[rows start_m .. start_m + BLOCK_M, columns offs_n] of one head and one sequence
    (row and column offsets relative to the sequence's first row). Rows past ``seqlen`` are not
    read: q = 0 and lse = +inf there, so P = 0. ``diag`` (a run-time scalar): the tile holds
    entries i == j, which are dropped; other tiles skip the test."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seqlen
    q = tl.load(q_base + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=row_ok[:, None], other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        # The interpreter gets bf16 arithmetic and bf16 tl.dot wrong: work in fp32 there.
        q = q.to(tl.float32)
    lse = tl.load(lse_base + offs_m * stride_lt, mask=row_ok, other=float("inf")).to(tl.float32)
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale      # base-2 logits, fp32
    p = tl.exp2(s - lse[:, None] * _LOG2E_C)                  # lse is a natural log
    if diag:
        p = tl.where(offs_m[:, None] != offs_n[None, :], p, 0.0)
    # Key columns past seqlen are not masked here: the caller does not store them.
    return acc + p


@triton.jit
def _lse_colsum_kernel(
    q_ptr, k_ptr, lse_ptr, cu_ptr, out_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lh, stride_lt, stride_oh,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
):
    """Partials of one key block of one sequence and one head: column sums of P over the
    sequence's query rows, diagonal excluded. q, k [T, H, d] (last stride 1), lse [H, T],
    cu [B + 1] int32, out [H, T] fp32 (last stride 1).

    P accumulates elementwise into a [BLOCK_M, BLOCK_N] fp32 register tile, reduced over rows
    once after the last query block: a reduction per tile would cross warps through shared
    memory each time."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)

    start = tl.load(cu_ptr + b)
    seqlen = tl.load(cu_ptr + b + 1) - start
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:  # max_seqlen sizes the grid for the longest sequence; shorter ones stop here
        return
    start = start.to(tl.int64)  # row * stride products of a large capacity exceed int32

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < seqlen
    # Per-sequence, per-head bases in int64; offsets inside a sequence (row < max_seqlen, times
    # a row stride) stay int32.
    q_base = q_ptr + start * stride_qt + h * stride_qh
    k_base = k_ptr + start * stride_kt + h * stride_kh
    lse_base = lse_ptr + h * stride_lh + start * stride_lt
    # K loaded transposed, [HEAD_DIM, BLOCK_N], once: the dot needs no tl.trans.
    kt = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        kt = kt.to(tl.float32)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start_m in range(0, seqlen, BLOCK_M):
        # Only the query blocks overlapping the key block hold i == j: only they test it.
        diag = (start_m < n0 + BLOCK_N) & (start_m + BLOCK_M > n0)
        acc = _lse_colsum_tile(acc, kt, q_base, lse_base, start_m, offs_n, seqlen, qk_scale,
                               stride_qt, stride_lt, diag, HEAD_DIM, BLOCK_M, DOT_IN_INPUT_DTYPE)

    tl.store(out_ptr + h * stride_oh + start + offs_n, tl.sum(acc, axis=0), mask=col_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _check_inputs(q, k, lse, cu_seqlens, max_seqlen, scale, backend):
    T, H, _ = L.check_qkv(q, ("T", "H", "d"), {"k": k}, {"lse": lse, "cu_seqlens": cu_seqlens}, HEAD_DIMS,
                          unit_head_stride=True)
    if tuple(lse.shape) != (H, T):
        raise ValueError(f"lse must have shape [H, T] = {[H, T]}, got {list(lse.shape)}")
    lse_dtypes = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if lse.dtype not in lse_dtypes:
        accepted = " or ".join(L.dtype_name(dt) for dt in lse_dtypes)
        raise TypeError(f"lse must be {accepted} (for q of dtype {L.dtype_name(q.dtype)}), "
                        f"got {L.dtype_name(lse.dtype)}")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] with B >= 0, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {L.dtype_name(cu_seqlens.dtype)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, Integral):
        raise TypeError(f"max_seqlen must be a Python int >= 0 (a host value, >= every sequence length), "
                        f"got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        raise ValueError(f"max_seqlen must be an int >= 0, got {int(max_seqlen)}")
    L.check_scale(scale)
    L.check_backend(backend)


def _block_sizes(max_seqlen: int, B: int, H: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, num_warps). tl.dot needs every dim >= 16.

    GPU: 64-row query tiles; the key block starts at 64 and halves, down to 16, while the grid
    (cdiv(max_seqlen, BLOCK_N) * B * H programs) is under about one wave (_TARGET_PROGRAMS).
    BERT-base at B 8 keeps 64x64 tiles (192 programs at n 128); one sequence of 128 gets 16-wide
    key blocks (96 programs). The interpreter gets 32-wide tiles: less numpy work per program.
    """
    cap = 32 if interpret else 64
    block_m = max(16, min(cap, L.next_power_of_2(max_seqlen)))
    block_n = block_m
    if not interpret:
        while block_n > 16 and triton.cdiv(max_seqlen, block_n) * B * H < _TARGET_PROGRAMS:
            block_n //= 2
    return block_m, block_n, L.num_warps_for(block_m * block_n)


def launch_lse_significance(q, k, lse, cu_seqlens, max_seqlen, scale, block_m=None, block_n=None,
                            dot_in_input_dtype=None):
    """Launch the kernel, inputs unchecked (see :func:`lse_significance`).

    Args:
        q, k: [T, H, d] float16/bfloat16 (float32 too: exact under the interpreter, IEEE fp32
            tl.dot on CUDA), last-dim stride 1, other strides free; d in HEAD_DIMS.
        lse: [H, T] float32, natural log, any strides. cu_seqlens: [B + 1] int32 on q's device.
        max_seqlen: host int >= every sequence length (sizes the grid). scale: the logit scale.
        block_m / block_n: override the tile heuristic (powers of two >= 16; tests use small ones).
        dot_in_input_dtype: overrides the GPU/interpreter choice of tl.dot operand dtype.
    Returns:
        partials [H, T] float32; rows of no sequence are not written.
    """
    T, H, d = q.shape
    B = cu_seqlens.shape[0] - 1
    bm, bn, num_warps = _block_sizes(max_seqlen, B, H, L.interpreting())
    block_m, block_n, dot_in_input_dtype = L.dot_tiles(block_m, block_n, bm, bn, dot_in_input_dtype)
    out = L.new_output((H, T), torch.float32, q.device)
    if B == 0 or max_seqlen == 0 or H == 0:
        return out
    _lse_colsum_kernel[(triton.cdiv(max_seqlen, block_n), B, H)](
        q, k, lse, cu_seqlens, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1), out.stride(0),
        float(scale) * _LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_IN_INPUT_DTYPE=dot_in_input_dtype, num_warps=num_warps,
    )
    return out


def lse_significance(q, k, lse, cu_seqlens, max_seqlen, *, scale=None, backend=None):
    """Per-head significance partials of packed attention, from q, k and FlashAttention's lse.

    Args:
        q, k: ``[T, H, d]`` float16 / bfloat16 (float32: the interpreter, or the torch reference
            on CUDA; float64: the torch reference), same shape, dtype and device; last-dim stride
            1, other strides free (e.g. views of a fused QKV projection ``[T, 3, H, d]``);
            d in {32, 64, 128}.
        lse: ``[H, T]`` float32 (float64 also accepted with float64 q), any strides: the natural-
            log row log-sum-exp ``lse[h, i] = log sum_{j in seq(i)} exp(scale * q[i,h]·k[j,h])``
            (the layout of ``aten._flash_attention_forward``'s varlen ``softmax_lse``).
        cu_seqlens: ``[B + 1]`` int32 on q's device: nondecreasing, ``cu[0] = 0``, ``cu[B] <= T``;
            sequence b is rows ``cu[b] .. cu[b+1] - 1`` (length 0 allowed). Its values are the
            caller's promise: the Triton path never reads them on the host (CUDA-graph safe).
        max_seqlen: Python int >= every sequence length; only sizes the grid.
        scale: logit scale, default ``d ** -0.5``.
        backend: ``None`` (CUDA fp16/bf16 -> Triton; otherwise the torch reference), ``"triton"``
            (fp16/bf16 on CUDA; fp16/bf16/fp32 CPU tensors under ``TRITON_INTERPRET=1``) or
            ``"torch"`` (the reference: reads cu_seqlens on the host, not capturable).

    Returns:
        partials ``[H, T]`` float32 (float64 for float64 q, torch path):
        ``partials[h, j] = sum_{i in seq(j), i != j} exp(scale * q[i,h]·k[j,h] - lse[h, i])`` for
        every row j of a sequence (no self term). Rows ``>= cu[B]`` (no sequence) are not written:
        their values are unspecified (NaN on the torch path). Summing over h in order 0..H-1
        gives the significance of powerbert/ALGORITHM.md §1. Inputs are never modified.
    """
    _check_inputs(q, k, lse, cu_seqlens, max_seqlen, scale, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if L.resolve_attention_backend(backend, q.device, q.dtype, __name__) == "triton":
        return launch_lse_significance(q, k, lse, cu_seqlens, max_seqlen, scale)
    return lse_significance_ref(q, k, lse, cu_seqlens, scale)


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile check (kernels.aot)
# --------------------------------------------------------------------------------------------
AOT_DTYPES = (torch.float16, torch.bfloat16)
AOT_BATCH, AOT_HEADS, AOT_LENGTHS = 8, 12, (128, 77)


def aot_calls(cap: int):
    """``(module, name, call)`` per dtype, head dim and length: the unchecked launcher on empty CPU
    tensors of BERT-base shape (B 8, H 12, packed sequences of 128 tokens in T = 8·128 rows, and of
    77 in 8·77), q and k views of a fused ``[T, 3, H, d]`` projection, lse ``[H, T]`` fp32.
    ``cap`` is unused: no launch choice depends on the GPU. Names: ``lse_colsum[float16,d64]``,
    ``lse_colsum[float16,d64,n77]``."""
    del cap
    calls = []
    for dt in AOT_DTYPES:
        for d in HEAD_DIMS:
            for n in AOT_LENGTHS:
                T = AOT_BATCH * n
                qkv = torch.empty(T, 3, AOT_HEADS, d, dtype=dt)
                lse = torch.empty(AOT_HEADS, T, dtype=torch.float32)
                cu = torch.arange(AOT_BATCH + 1, dtype=torch.int32) * n
                suffix = "" if n == AOT_LENGTHS[0] else f",n{n}"
                calls.append(("kernels.lse_significance", f"lse_colsum[{L.dtype_name(dt)},d{d}{suffix}]",
                              lambda x=qkv, s=lse, c=cu, n=n: launch_lse_significance(
                                  x[:, 0], x[:, 1], s, c, n, x.shape[-1] ** -0.5)))
    return calls
