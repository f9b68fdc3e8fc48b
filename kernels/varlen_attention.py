"""Packed (varlen) attention forward with the row log-sum-exp: the Triton fallback for
``torch.ops.aten._flash_attention_forward`` (FlashAttention-2 varlen).

Packed layout: ``T`` rows (a capacity) hold ``B`` sequences back to back. ``cu_seqlens`` (int32
``[B + 1]``, nondecreasing, ``cu[0] = 0``, ``cu[B] <= T``) delimits them: sequence b is rows
``cu[b] .. cu[b + 1] - 1`` (it may be empty), and each row attends to the rows of its own
sequence only (bidirectional, no padding inside a sequence):

    out[i, h] = sum_{j in seq(i)} softmax_j(scale · q[i, h]·k[j, h]) v[j, h]
    lse[h, i] = log sum_{j in seq(i)} exp(scale · q[i, h]·k[j, h])      (natural log)

``lse`` is ``[H, T]`` float32, the layout and convention of the varlen ``softmax_lse`` of
``aten._flash_attention_forward``. Rows ``>= cu[B]`` belong to no sequence: the kernel never
reads them and does not write them (their outputs stay as allocated).

``_varlen_attn_fwd_kernel`` is a flash-attention forward (online softmax in base 2, the scale
folded with log2(e), fp32 accumulators), one program per (query block, sequence, head): heads in
the grid, so a batch of one long sequence still fills the GPU. The grid is sized by the host int
``max_seqlen``; a program whose query block starts past its sequence's length returns at once,
and a program loops over its own sequence's key blocks only (the last one masked by the length).
The sequence bounds are read on the device: nothing is read back on the host, so a launch can be
captured in a CUDA graph.

dtypes: on CUDA the kernel takes fp16 and bf16; fp32 and fp64 take the torch reference
(``backend=None``), as in :mod:`kernels.attention` (fp32 ``tl.dot`` spills registers). The
interpreter runs fp16/bf16/fp32 and computes in fp32 (its bf16 arithmetic is wrong).
"""
from __future__ import annotations

from numbers import Integral

import torch
import triton
import triton.language as tl

from kernels import launch as L
from kernels.attention import HEAD_DIMS, online_softmax_step

__all__ = ["varlen_attention", "varlen_attention_ref"]

_LOG2E = 1.4426950408889634
_LN2 = tl.constexpr(0.6931471805599453)


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------
def varlen_attention_ref(q, k, v, cu_seqlens, scale=None):
    """Eager packed attention, one sequence at a time; the specification of the Triton path.

    Reads ``cu_seqlens`` on the host (a device sync): not for CUDA graphs.

    Args:
        q, k, v: ``[T, H, d]`` floating tensors, same shape (any strides).
        cu_seqlens: ``[B + 1]`` integer tensor, nondecreasing, ``cu[0] = 0``, ``cu[B] <= T``;
            sequence b is rows ``cu[b] .. cu[b + 1] - 1``.
        scale: logit scale, default ``d ** -0.5``.

    Returns:
        ``(out, lse)``: out ``[T, H, d]`` in q's dtype, contiguous, ``softmax(scale · q kᵀ) v``
        within each sequence; lse ``[H, T]`` float32 (float64 for float64 inputs), the natural
        log-sum-exp of each row's logits. Computed in fp32 (fp64 for fp64). Rows of no sequence
        (``>= cu[B]``): out 0 and lse -inf (an empty sum); the kernel leaves them unwritten.
    """
    T, H, d = q.shape
    if scale is None:
        scale = d ** -0.5
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(T, H, d, dtype=cdt, device=q.device)
    lse = torch.full((H, T), float("-inf"), dtype=cdt, device=q.device)
    bounds = [int(c) for c in cu_seqlens.tolist()]
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:
            continue
        qs, ks, vs = (t[start:end].to(cdt).transpose(0, 1) for t in (q, k, v))  # [H, n, d]
        logits = torch.matmul(qs, ks.transpose(-1, -2)) * scale  # [H, n(query), n(key)]
        lse[:, start:end] = torch.logsumexp(logits, dim=-1)
        out[start:end] = torch.matmul(torch.softmax(logits, dim=-1), vs).transpose(0, 1)
    return out.to(q.dtype), lse


# --------------------------------------------------------------------------------------------
# Triton kernel
# --------------------------------------------------------------------------------------------
@triton.jit
def _varlen_attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, cu_ptr, out_ptr, lse_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh, stride_lh, stride_cu,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
):
    """One query block of one sequence and head: out [T, H, d] (head dim stride 1 everywhere)
    and the natural-log lse [H, T] of its rows. Rows outside the sequence are neither read nor
    written."""
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)

    seq_start = tl.load(cu_ptr + seq * stride_cu)
    seq_len = tl.load(cu_ptr + (seq + 1) * stride_cu) - seq_start
    start_m = pid_m * BLOCK_M
    # The grid is sized by max_seqlen: blocks past this sequence's end have nothing to do.
    if start_m >= seq_len:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = start_m + offs_m < seq_len
    # Row offsets in int64 through the base pointers (first row of the block / the sequence);
    # within a block, offs * stride stays far below 2^31.
    row0 = (seq_start + start_m).to(tl.int64)
    q_blk = q_ptr + row0 * stride_qt + h * stride_qh
    k_blk = k_ptr + seq_start.to(tl.int64) * stride_kt + h * stride_kh
    v_blk = v_ptr + seq_start.to(tl.int64) * stride_vt + h * stride_vh

    q = tl.load(q_blk + offs_m[:, None] * stride_qt + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        # The interpreter gets bf16 arithmetic and bf16 tl.dot wrong: work in fp32 there.
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start_n in range(0, seq_len, BLOCK_N):
        col_ok = start_n + offs_n < seq_len
        # K loaded transposed, [HEAD_DIM, BLOCK_N], so the dot needs no tl.trans.
        kt = tl.load(k_blk + offs_n[None, :] * stride_kt + offs_d[:, None], mask=col_ok[None, :], other=0.0)
        v = tl.load(v_blk + offs_n[:, None] * stride_vt + offs_d[None, :], mask=col_ok[:, None], other=0.0)
        if not DOT_IN_INPUT_DTYPE:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # base-2 logits, fp32
        # Every block holds at least one key of the sequence (start_n < seq_len), so the row
        # max stays finite (no -inf - -inf); keys past the end get probability exactly 0.
        s = tl.where(col_ok[None, :], s, float("-inf"))

        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_IN_INPUT_DTYPE)
        k_blk += BLOCK_N * stride_kt
        v_blk += BLOCK_N * stride_vt

    acc = acc / l_i[:, None]
    o_blk = out_ptr + row0 * stride_ot + h * stride_oh
    tl.store(o_blk + offs_m[:, None] * stride_ot + offs_d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None])
    # aten's varlen softmax_lse is a natural log: base-2 lse times ln 2.
    lse = (m_i + tl.log2(l_i)) * _LN2
    tl.store(lse_ptr + h * stride_lh + row0 + offs_m, lse, mask=row_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _block_sizes(max_seqlen: int, d: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, num_warps). tl.dot needs every dim >= 16.

    GPU: 64-row query tiles up to max_seqlen 511 (BERT's 128-token batches get two query
    blocks per sequence and head, 2·B·H programs), 128-row ones from 512 on (enough programs
    anyway, and half the K/V reloads); 64-wide key tiles. One warp per 16 query rows (the
    height of an mma tile), so each row's softmax max and sum stay inside one warp (no
    shared-memory reduction per key block): 4 warps for 64 rows, 8 for 128. No register
    spills in fp16/bf16 at d 32-128 on sm_80 and sm_90 (:func:`aot_calls`); d 128 with 64-row
    tiles takes 255 registers on sm_80, as kernels.attention's forward does.
    Both shrink to the next power of two of a short max_seqlen. The interpreter gets 32-wide
    tiles: less numpy work per program, and short test sequences span several blocks.
    """
    if interpret:
        cap_m = cap_n = 32
    else:
        cap_m, cap_n = (128 if max_seqlen >= 512 else 64), 64
    fit = max(16, L.next_power_of_2(max_seqlen))
    block_m, block_n = min(cap_m, fit), min(cap_n, fit)
    num_warps = max(1, min(8, block_m // 16))
    return block_m, block_n, num_warps


def launch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale, block_m=None, block_n=None,
                            dot_in_input_dtype=None):
    """Launch the kernel, inputs unchecked (see :func:`varlen_attention`).

    Args:
        q, k, v: [T, H, d] float16/bfloat16 (float32 too: exact under the interpreter, spills
            on CUDA), same shape, dtype and device, last-dim stride 1, other strides free; d in
            HEAD_DIMS.
        cu_seqlens: [B + 1] int32 on q's device, any stride (values are the caller's promise).
        max_seqlen: host int >= every sequence length (sizes the grid only).
        scale: the logit scale (float).
        block_m / block_n: override the tile heuristic (powers of two >= 16; tests use small ones).
        dot_in_input_dtype: overrides the GPU/interpreter choice of tl.dot operand dtype.
    Returns:
        (out [T, H, d] q.dtype contiguous, lse [H, T] float32 natural log); rows >= cu[B]
        unwritten (NaN when :func:`kernels.launch.poison_outputs`).
    """
    T, H, d = q.shape
    B = cu_seqlens.shape[0] - 1
    bm, bn, num_warps = _block_sizes(max_seqlen, d, L.interpreting())
    block_m, block_n, dot_in_input_dtype = L.dot_tiles(block_m, block_n, bm, bn, dot_in_input_dtype)

    out = L.new_output((T, H, d), q.dtype, q.device)
    lse = L.new_output((H, T), torch.float32, q.device)
    _varlen_attn_fwd_kernel[(triton.cdiv(max_seqlen, block_m), B, H)](
        q, k, v, cu_seqlens, out, lse,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0), cu_seqlens.stride(0),
        float(scale) * _LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_IN_INPUT_DTYPE=dot_in_input_dtype, num_warps=num_warps,
    )
    return out, lse


def _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale, backend):
    L.check_qkv(q, ("T", "H", "d"), {"k": k, "v": v}, {"cu_seqlens": cu_seqlens}, HEAD_DIMS, unit_head_stride=True)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must be 1-D [B + 1] with B >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"cu_seqlens must be int32, got {L.dtype_name(cu_seqlens.dtype)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, Integral):
        raise TypeError(f"max_seqlen must be a Python int >= 1, got {type(max_seqlen).__name__}")
    if max_seqlen < 1:
        raise ValueError(f"max_seqlen must be an int >= 1, got {int(max_seqlen)}")
    L.check_scale(scale)
    L.check_backend(backend)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, scale=None, backend=None):
    """Attention within each sequence of a packed batch; returns the output and the row lse.

    Args:
        q, k, v: ``[T, H, d]`` with last-dim stride 1, other strides free (e.g. views of one
            fused QKV projection ``[T, 3, H, d]``: strides ``(3·H·d, d, 1)``); same shape,
            dtype and device; d in {32, 64, 128}. float16 / bfloat16 (Triton on CUDA), float32
            (Triton under the interpreter, the torch reference on CUDA), float64 (the torch
            reference only).
        cu_seqlens: ``[B + 1]`` int32 on q's device, nondecreasing, ``cu[0] = 0``,
            ``cu[B] <= T``; sequence b is rows ``cu[b] .. cu[b + 1] - 1`` (may be empty). Its
            values are not checked (that would read them on the host).
        max_seqlen: Python int >= 1 and >= every sequence length; sizes the grid only.
        scale: logit scale, default ``d ** -0.5``.
        backend: ``None`` (CUDA fp16/bf16 -> Triton; otherwise the torch reference),
            ``"triton"`` (fp16/bf16 on CUDA; fp16/bf16/fp32 CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"torch"`` (the reference; it reads cu_seqlens on the
            host, so only the Triton path can be captured in a CUDA graph).

    Returns:
        ``(out, lse)``: out ``[T, H, d]`` in q's dtype, contiguous; lse ``[H, T]`` float32
        (float64 for float64 inputs), natural log,
        ``lse[h, i] = log sum_{j in seq(i)} exp(scale · q[i, h]·k[j, h])``: the layout and
        convention of ``aten._flash_attention_forward``'s varlen ``softmax_lse``. Rows of no
        sequence (``>= cu[B]``) are not written by the kernel (uninitialised memory; the torch
        path returns 0 and -inf there). Inputs are never modified.
    """
    _check_inputs(q, k, v, cu_seqlens, max_seqlen, scale, backend)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if L.resolve_attention_backend(backend, q.device, q.dtype, __name__) == "triton":
        if q.numel() == 0:  # T = 0 or H = 0: nothing to launch
            return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
                    torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device))
        return launch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, scale)
    out, lse = varlen_attention_ref(q, k, v, cu_seqlens, scale)
    return out, (lse if q.dtype == torch.float64 else lse.float())


# --------------------------------------------------------------------------------------------
# Ahead-of-time compile check
# --------------------------------------------------------------------------------------------
def aot_calls(cap: int):
    """``(module, name, call)`` per dtype, head dim and length: ``launch_varlen_attention`` on
    BERT-base shapes (H 12; q, k, v views of one fused ``[T, 3, H, d]`` projection), for
    :mod:`kernels.aot` to record and compile for sm_<cap> (the launcher does not depend on it).

    Names: ``varlen_attn[float16,d64]`` for 8 sequences of 128 rows (T 1024, max_seqlen 128);
    ``...,n77]`` for 8 of 77 (the first layer after elimination, T 616: the lse row stride
    loses its divisibility by 16); ``...,n512]`` for 2 of 512 (the 128-row query tile).
    """
    H = 12
    calls = []
    for name in ("float16", "bfloat16"):
        dtype = getattr(torch, name)
        for d in HEAD_DIMS:
            for B, n in ((8, 128), (8, 77), (2, 512)):
                T = B * n
                q, k, v = torch.empty(T, 3, H, d, dtype=dtype).unbind(1)
                cu = torch.arange(B + 1, dtype=torch.int32) * n
                suffix = "" if n == 128 else f",n{n}"
                calls.append(("kernels.varlen_attention", f"varlen_attn[{name},d{d}{suffix}]",
                              lambda q=q, k=k, v=v, cu=cu, n=n: launch_varlen_attention(
                                  q, k, v, cu, n, q.shape[-1] ** -0.5)))
    return calls
