"""Attention forward that also returns PoWER-BERT significance scores.

The significance of key position j (powerbert/ALGORITHM.md §1) is the attention it receives from the
real query tokens of its sequence, summed over heads, without the self term:

    score[b, j] = sum_h sum_{i : mask[b, i] = 1, i != j} P[b, h, i, j]      (-inf where mask[b, j] = 0)

The eager reference materialises P (B·H·n² values). The Triton path never writes P:

1. ``_attn_fwd_kernel``: flash-attention forward (online softmax), one program per
   (query block, batch·head). Writes the context in ``[B, n, H, d]`` memory (returned as a
   ``[B, H, n, d]`` view, so merging heads for the output projection is a view, not a copy) and
   the row log-sum-exp (base 2) ``lse``, +inf on padded query rows.
2. ``_attn_colsum_kernel``: one program per (key block, batch). It loops over heads and query
   blocks, recomputes ``P = exp2(q·kᵀ·scale·log2e − lse)`` exactly (the normaliser is known
   now; padded rows have lse = +inf, so P = 0 there), and adds it elementwise into a
   [BLOCK_M, BLOCK_N] fp32 register tile, reduced over rows once at the end. Only the query
   blocks that overlap the key block test i != j. Each score is written once by one program:
   deterministic, no atomics, so ties seen by the later top-k cannot flip from run to run.

Padding costs no tile work past each sequence's last real token: the forward stops its key
loop there, pass 2 its query loop, and a key block without a real key skips every head.

dtypes: on CUDA the kernels take fp16 and bf16; fp32 (and fp64) inputs take the torch reference
(``backend=None``), since fp32 ``tl.dot`` spills registers (IEEE, and tf32x3 on sm_80 at d 64 and
128). ``python -m kernels.compiled_cost`` prints registers, spills and SASS instructions per
tile as the JIT compiles these kernels for sm_80 and sm_90.

A one-pass variant cannot produce column sums: with online softmax the normaliser of a row is
only known after its last key block, so column partials would need a rescale per row.

``need_scores=False`` skips pass 2 (and still costs one fp32 ``lse`` write per row).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch as L

__all__ = ["attention_with_significance", "attention_with_significance_ref"]

# The Triton kernels take L.FLOAT_DTYPES (fp16/bf16/fp32); the reference (backend "torch", and
# None for float64 inputs) L.TORCH_DTYPES, float64 too. On CUDA the kernels take
# L.DOT_CUDA_DTYPES (fp16 and bf16) only: fp32 tl.dot spills registers there (see kernels.launch),
# so fp32 takes the torch path (see attention_with_significance).
HEAD_DIMS = (32, 64, 128)
_LOG2E = 1.4426950408889634
# Finite stand-in for a padded key's logit (base-2 units). Finite rather than -inf so that a
# sequence without any real token gets a uniform softmax, as HF eager attention does with
# finfo.min, instead of NaN; with at least one real key it underflows to probability 0.
_PAD_LOGIT = tl.constexpr(-1.0e30)


# --------------------------------------------------------------------------------------------
# Reference (the specification)
# --------------------------------------------------------------------------------------------
def attention_with_significance_ref(q, k, v, mask, scale=None):
    """Eager attention plus significance scores; the specification of the Triton path.

    Args:
        q, k, v: ``[B, H, n, d]`` floating tensors (any strides).
        mask: ``[B, n]`` key-padding mask, nonzero/True = real token, 0 = padding.
        scale: logit scale, default ``d ** -0.5``.

    Returns:
        ``(context, scores)``: context ``[B, H, n, d]`` in q's dtype,
        ``softmax(q kᵀ·scale, padded keys filled with finfo.min) @ v``; scores ``[B, n]``
        float32 (float64 for float64 inputs), ``sum_h sum_{real i != j} P[b, h, i, j]``,
        ``-inf`` at padded positions.
    """
    d = q.shape[-1]
    if scale is None:
        scale = d ** -0.5
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    real = mask != 0  # [B, n]
    logits = torch.matmul(q.to(cdt), k.to(cdt).transpose(-1, -2)) * scale
    # masked_fill (not an additive bias) so an all-padding sequence is exactly uniform.
    logits = logits.masked_fill(~real[:, None, None, :], torch.finfo(cdt).min)
    probs = torch.softmax(logits, dim=-1)  # [B, H, n(query), n(key)]
    context = torch.matmul(probs, v.to(cdt)).to(q.dtype)

    votes = (probs * real[:, None, :, None].to(cdt)).sum(dim=1)  # [B, n(query), n(key)]
    votes.diagonal(dim1=-2, dim2=-1).zero_()  # the self term i == j does not count
    scores = votes.sum(dim=1).masked_fill(~real, float("-inf"))
    return context, scores.to(cdt)


# --------------------------------------------------------------------------------------------
# Triton kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _real_extent(m_base, stride_mn, N, BLOCK: tl.constexpr):
    """1 + the position of the last real token of a sequence (0 when it has none): every key
    and query row from there on is padding. N >= 1."""
    # A real last token (no trailing padding) needs no scan of the mask.
    last_real = tl.load(m_base + (N - 1) * stride_mn) != 0
    hi = tl.where(last_real, N, 0)
    for start in range(0, tl.where(last_real, 0, N), BLOCK):
        offs = start + tl.arange(0, BLOCK)
        real = tl.load(m_base + offs * stride_mn, mask=offs < N, other=0) != 0
        hi = tl.maximum(hi, tl.max(tl.where(real, offs + 1, 0), axis=0))
    return hi


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_IN_INPUT_DTYPE: tl.constexpr):
    """Device function: one key block of a flash-attention forward (online softmax, base 2).

    s: [BLOCK_M, BLOCK_N] fp32 base-2 logits, -inf where a key is out of range, at least one
    finite per row; v: [BLOCK_N, HEAD_DIM] (the input dtype, or fp32 without
    DOT_IN_INPUT_DTYPE); the row state m_i (running max), l_i (running sum of exp2(s - m_i))
    and acc ([BLOCK_M, HEAD_DIM] fp32, unnormalised P·V) before the block. Returns that state
    after it; the context is acc / l_i once the last block is in, the base-2 lse m_i + log2(l_i).
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if DOT_IN_INPUT_DTYPE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, lse_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_mb, stride_mn,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
):
    """Flash-attention forward: the context (any strides; the launcher's [B, n, H, d] memory)
    and the base-2 row log-sum-exp lse [B*H, N], +inf on padded query rows (no vote in pass 2)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N

    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    m_base = mask_ptr + b * stride_mb

    # Key blocks past the last real key hold padding only; skipping them is exact (next to a
    # real key a padded one gets probability exactly 0). A sequence without a real key keeps
    # every block: its softmax is uniform over all n keys, as the reference's.
    hi = _real_extent(m_base, stride_mn, N, BLOCK_N)
    hi = tl.where(hi == 0, N, hi)
    query_real = tl.load(m_base + offs_m * stride_mn, mask=row_ok, other=0) != 0

    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        # The interpreter gets bf16 arithmetic and bf16 tl.dot wrong: work in fp32 there.
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < N
        key_real = tl.load(m_base + offs_n * stride_mn, mask=col_ok, other=0) != 0
        # K loaded transposed, [HEAD_DIM, BLOCK_N], so the dot needs no tl.trans.
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=col_ok[:, None], other=0.0)
        if not DOT_IN_INPUT_DTYPE:
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)

        s = tl.dot(q, kt, input_precision="ieee") * qk_scale  # base-2 logits, fp32
        s = tl.where(key_real[None, :], s, _PAD_LOGIT)
        # Every block holds at least one in-range key, so m_new stays finite (no inf - inf).
        s = tl.where(col_ok[None, :], s, float("-inf"))

        m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_IN_INPUT_DTYPE)

    acc = acc / l_i[:, None]
    o_base = out_ptr + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    # A padded query row does not vote: pass 2 reads lse = +inf there, hence probability
    # exactly 0 (and no overflow from the huge logits of an all-padding sequence).
    lse = tl.where(query_real, m_i + tl.log2(l_i), float("inf"))
    tl.store(lse_ptr + pid_bh.to(tl.int64) * N + offs_m, lse, mask=row_ok)


@triton.jit
def _colsum_tile(acc, kt, q_base, lse_base, start_m, offs_n, N, qk_scale, stride_qn, stride_qd, diag,
                 HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, DOT_IN_INPUT_DTYPE: tl.constexpr):
    """acc + P[rows start_m .. start_m + BLOCK_M, columns offs_n] of one head, recomputed from
    q, kᵀ and lse. Rows past N read lse = +inf (probability 0), as padded rows do. ``diag``
    (a run-time scalar): the tile holds entries i == j, which are dropped (no self vote); other
    tiles skip the test."""
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < N
    q = tl.load(q_base + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None], other=0.0)
    if not DOT_IN_INPUT_DTYPE:
        q = q.to(tl.float32)
    lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
    s = tl.dot(q, kt, input_precision="ieee") * qk_scale
    p = tl.exp2(s - lse[:, None])
    if diag:
        p = tl.where(offs_m[:, None] != offs_n[None, :], p, 0.0)
    # Padded key columns are not masked here: the caller overwrites them with -inf.
    return acc + p


@triton.jit
def _attn_colsum_kernel(
    q_ptr, k_ptr, mask_ptr, lse_ptr, scores_ptr,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_mb, stride_mn,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_IN_INPUT_DTYPE: tl.constexpr,
):
    """Significance of one key block of one sequence: column sums of P over heads and real
    query rows, diagonal excluded, recomputed from q, k and the forward's lse. Scores [B, N].

    P accumulates elementwise into a [BLOCK_M, BLOCK_N] fp32 register tile and is reduced over
    rows once, after every head and query block: a reduction per tile would cross warps
    through shared memory each time."""
    pid_n = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    col_ok = offs_n < N
    m_base = mask_ptr + b * stride_mb
    key_real = tl.load(m_base + offs_n * stride_mn, mask=col_ok, other=0) != 0

    # Query rows past the last real token are padding and do not vote: their blocks are skipped.
    n_rows = _real_extent(m_base, stride_mn, N, BLOCK_M)
    # A key block without a real key scores -inf whatever P holds: it skips every head.
    n_heads = tl.where(tl.max(key_real.to(tl.int32), axis=0) > 0, H, 0)

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    # Per-head base pointers advance by one head stride per iteration; the batch offset is
    # computed once in int64.
    q_base = q_ptr + b * stride_qb
    k_base = k_ptr + b * stride_kb
    lse_base = lse_ptr + b * H * N
    for _h in range(0, n_heads):
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :], other=0.0)
        if not DOT_IN_INPUT_DTYPE:
            kt = kt.to(tl.float32)
        for start_m in range(0, n_rows, BLOCK_M):
            # Only the blocks overlapping the key block's rows hold i == j: only they test it.
            diag = (start_m < n0 + BLOCK_N) & (start_m + BLOCK_M > n0)
            acc = _colsum_tile(acc, kt, q_base, lse_base, start_m, offs_n, N, qk_scale,
                               stride_qn, stride_qd, diag, HEAD_DIM, BLOCK_M, DOT_IN_INPUT_DTYPE)
        q_base += stride_qh
        k_base += stride_kh
        lse_base += N

    scores = tl.where(key_real, tl.sum(acc, axis=0), float("-inf"))
    tl.store(scores_ptr + b * N + offs_n, scores, mask=col_ok)


# --------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, mask, scale, need_scores, backend):
    B, _, n, _ = L.check_qkv(q, ("B", "H", "n", "d"), {"k": k, "v": v}, {"mask": mask}, HEAD_DIMS)
    if mask.dim() != 2 or tuple(mask.shape) != (B, n):
        raise ValueError(f"mask must have shape [B, n] = {(B, n)}, got {tuple(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask must be bool, integer or floating, got {mask.dtype}")
    L.check_scale(scale)
    if not isinstance(need_scores, bool):
        raise TypeError(f"need_scores must be a bool, got {type(need_scores).__name__}")
    L.check_backend(backend)


def _block_sizes(n: int, interpret: bool):
    """(BLOCK_M, BLOCK_N, num_warps). tl.dot needs every dim >= 16.

    64x64 tiles on the GPU (fp16/bf16: no spill at d 32-128 on sm_80 and sm_90, checked by
    tests/kernels/test_spill.py). The interpreter gets 32-wide tiles: less numpy work per program.
    """
    cap = 32 if interpret else 64
    block = max(16, min(cap, L.next_power_of_2(n)))
    return block, block, 4


def _colsum_block_n(n: int, B: int, block: int, device, num_sms: int | None = None) -> int:
    """Pass 2 runs only B * cdiv(n, BLOCK_N) programs (each loops over every head and query
    block); halve BLOCK_N, down to 16, until they fill one wave of the GPU's SMs.
    ``num_sms`` stands in for the device's SM count (kernels.aot compiles for GPUs it lacks)."""
    if num_sms is None and device.type != "cuda":
        return block
    sms = num_sms or torch.cuda.get_device_properties(device).multi_processor_count
    while block > 16 and B * triton.cdiv(n, block) < sms:
        block //= 2
    return block


def launch_attention(q, k, v, mask, scale, need_scores, block_m=None, block_n=None,
                     dot_in_input_dtype=None, num_sms=None):
    """Launch both passes, inputs unchecked (see :func:`attention_with_significance`).

    Args:
        q, k, v: [B, H, n, d] float16/bfloat16 (float32 too: exact under the interpreter, spills
            on CUDA), same shape, dtype and device, any strides; d in HEAD_DIMS.
        mask: [B, n] bool/int/float, nonzero = real token. scale: the logit scale (float).
        need_scores: False skips pass 2 (scores come back as None).
        block_m / block_n: override the tile heuristic (powers of two >= 16; tests use small ones).
        dot_in_input_dtype: overrides the GPU/interpreter choice of tl.dot operand dtype (tests
            run the GPU variant under the interpreter for fp16/fp32, where that is exact).
        num_sms: the SM count that sizes pass 2 (kernels.aot compiles for GPUs it lacks).
    Returns:
        (context [B, H, n, d] q.dtype, a view of [B, n, H, d] memory; scores [B, n] float32 or None).
    """
    B, H, n, d = q.shape
    bm, bn, num_warps = _block_sizes(n, L.interpreting())
    block_m, block_n, dot_in_input_dtype = L.dot_tiles(block_m, block_n, bm, bn, dot_in_input_dtype)
    mask_i8 = L.mask_as_int8(mask)
    qk_scale = float(scale) * _LOG2E

    # The context is written in [B, n, H, d] memory: merging heads into [B, n, H * d] is a view.
    out = L.new_output((B, n, H, d), q.dtype, q.device).transpose(1, 2)
    lse = L.new_output((B * H, n), torch.float32, q.device)
    _attn_fwd_kernel[(triton.cdiv(n, block_m), B * H)](
        q, k, v, mask_i8, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *mask_i8.stride(),
        H, n, qk_scale,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_IN_INPUT_DTYPE=dot_in_input_dtype, num_warps=num_warps,
    )
    if not need_scores:
        return out, None
    scores = L.new_output((B, n), torch.float32, q.device)
    cb_n = _colsum_block_n(n, B, block_n, q.device, num_sms)
    _attn_colsum_kernel[(triton.cdiv(n, cb_n), B)](
        q, k, mask_i8, lse, scores,
        *q.stride(), *k.stride(), *mask_i8.stride(),
        H, n, qk_scale,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=cb_n,
        DOT_IN_INPUT_DTYPE=dot_in_input_dtype, num_warps=num_warps,
    )
    return out, scores


def triton_serves(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the Triton kernels take inputs of this dtype on this device: fp16/bf16 on CUDA;
    fp16/bf16/fp32 on CPU under the interpreter."""
    return dtype in (L.DOT_CUDA_DTYPES if device.type == "cuda" else L.FLOAT_DTYPES)


def attention_with_significance(q, k, v, mask, scale=None, *, need_scores=True, backend=None):
    """Bidirectional attention with a key-padding mask, plus PoWER-BERT significance scores.

    Args:
        q, k, v: ``[B, H, n, d]`` float16 / bfloat16 / float32 (float64: the torch reference
            only), same shape, dtype and device, any strides (e.g.
            ``x.view(B, n, H, d).transpose(1, 2)``); d in {32, 64, 128}.
        mask: ``[B, n]`` bool / integer / floating, nonzero = real token, 0 = padding.
        scale: logit scale, default ``d ** -0.5``.
        need_scores: when False, skip the significance pass and return ``None`` for scores.
        backend: ``None`` (CUDA fp16/bf16 -> Triton; otherwise the torch reference, fp32 on
            CUDA included), ``"triton"`` (fp16/bf16 on CUDA; fp16/bf16/fp32 CPU tensors under
            ``TRITON_INTERPRET=1``) or ``"torch"``. fp32 stays off the Triton path on CUDA:
            IEEE fp32 ``tl.dot`` spills registers there, and so does tf32x3 on sm_80.

    Returns:
        ``(context, scores)``: context ``[B, H, n, d]`` in q's dtype, laid out as
        ``[B, n, H, d]`` in memory (``context.transpose(1, 2)`` is contiguous, so merging the
        heads into ``[B, n, H * d]`` is a view, on both backends); scores
        ``[B, n]`` float32 (float64 for float64 inputs, computed in float64),
        ``sum_h sum_{i real, i != j} P[b, h, i, j]``, ``-inf`` at padding (``None`` when
        ``need_scores`` is False). Inputs are never modified.
    """
    _check_inputs(q, k, v, mask, scale, need_scores, backend)
    d = q.shape[-1]
    if scale is None:
        scale = d ** -0.5
    if L.resolve_attention_backend(backend, q.device, q.dtype, __name__) == "triton" and q.numel() > 0:
        return launch_attention(q, k, v, mask, scale, need_scores)
    context, scores = attention_with_significance_ref(q, k, v, mask, scale)
    if q.dtype != torch.float64:
        scores = scores.float()
    # The Triton path's layout: [B, n, H, d] memory behind the [B, H, n, d] view.
    context = context.transpose(1, 2).contiguous().transpose(1, 2)
    return context, (scores if need_scores else None)
