"""Significance of each word vector: the attention it receives from the real tokens (spec §1).

    score[b, j] = sum_h sum_{i : mask[b, i] = 1, i != j} probs[b, h, i, j],  -inf where mask[b, j] = 0

Top to bottom: the eager reference, the vectorised torch path (:func:`significance_torch`), the
Triton kernel and its column-sum device function (:func:`column_sums`, shared with the extract
kernel), the launcher (:func:`launch_significance`), the public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch as L


# ----------------------------------------------------------------------------- reference


def significance_ref(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eager reference for spec §1, written for clarity, not speed.

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32/float64: softmax attention probabilities
            probs[b, h, query i, key j].
        mask: [B, n] bool/int/float, nonzero = real token, 0 = padding.
    Returns:
        [B, n] float32 (float64 if probs is float64): the attention each key j receives from the
        real query rows i != j, summed over heads; -inf where mask[b, j] == 0. A NaN among the
        summed values makes that score NaN (selection then counts it as -inf).
    """
    acc_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    p = probs.to(acc_dtype)
    n = p.shape[-1]
    real = mask != 0                                                     # [B, n]
    not_self = ~torch.eye(n, dtype=torch.bool, device=p.device)          # [n(i), n(j)]
    votes = real[:, None, :, None] & not_self[None, None]                # [B, 1, i, j]
    scores = torch.where(votes, p, torch.zeros((), dtype=acc_dtype, device=p.device)).sum(dim=(1, 2))
    return scores.masked_fill(~real, float("-inf"))


def significance_torch(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Vectorised torch path of :func:`significance`, inputs unchecked.

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32/float64 (query i, key j).
        mask: [B, n] bool/int/float, nonzero = real token.
    Returns:
        [B, n] float32 (float64 for float64 probs), -inf where mask[b, j] == 0.

    Sums over heads first (one fp32-accumulating read of probs, no
    fp32 copy of it; float64 probs accumulate in float64), then drop padded query rows and the
    diagonal from the [B, n, n] head sum and sum over query rows. Selecting with where (not
    multiplying by the mask) keeps a NaN in a padded query row out of the scores, as in the
    kernel and the reference.
    """
    n = probs.shape[-1]
    real = mask != 0
    acc_dtype = torch.float64 if probs.dtype == torch.float64 else torch.float32
    head_sum = probs.sum(dim=1, dtype=acc_dtype)                         # [B, i, j], own buffer
    not_self = ~torch.eye(n, dtype=torch.bool, device=probs.device)
    head_sum.masked_fill_(~(real[:, :, None] & not_self), 0.0)
    return head_sum.sum(dim=1).masked_fill_(~real, float("-inf"))


# ----------------------------------------------------------------------------- Triton


@triton.jit
def column_sums(
    probs_ptr, mask_ptr, b, offs_j, n, H,
    stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    """Device function: fp32 [BLOCK_J] sums of probs[b, :, i, offs_j] over heads and real query
    rows i != j (probs [B, H, n, n] fp16/bf16/fp32 by strides, mask [B, n] any integer/float).

    ``b`` is an int64 scalar so that batch offsets cannot overflow int32. Lanes with
    offs_j >= n come back as 0; the caller applies the key mask.
    """
    j_in = offs_j < n
    col_off = offs_j.to(tl.int64) * stride_pj
    base = probs_ptr + b * stride_pb
    acc = tl.zeros([BLOCK_J], dtype=tl.float32)
    for i0 in range(0, n, BLOCK_I):
        offs_i = i0 + tl.arange(0, BLOCK_I)
        i_in = offs_i < n
        # Padded query rows do not vote (batch invariance), nor does the self term i == j.
        real_i = tl.load(mask_ptr + b * stride_mb + offs_i.to(tl.int64) * stride_mn,
                         mask=i_in, other=0).to(tl.float32) != 0
        vote = (real_i[:, None] & (offs_i[:, None] != offs_j[None, :])) & j_in[None, :]
        ld = i_in[:, None] & j_in[None, :]
        ptrs = base + offs_i.to(tl.int64)[:, None] * stride_pi + col_off[None, :]
        tile = tl.zeros([BLOCK_I, BLOCK_J], dtype=tl.float32)
        for _h in range(0, H):
            # upcast right after the load: bf16 arithmetic is wrong under the interpreter
            tile += tl.load(ptrs, mask=ld, other=0.0).to(tl.float32)
            ptrs += stride_ph  # 64-bit pointer walk: no int32 h * stride_ph product
        # where, not multiply: a NaN in a padded query row must not leak into the sums
        acc += tl.sum(tl.where(vote, tile, 0.0), axis=0)
    return acc


@triton.jit
def _significance_kernel(
    probs_ptr, mask_ptr, out_ptr, n, H,
    stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn, stride_ob, stride_on,
    BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr,
):
    # grid: (B, cdiv(n, BLOCK_J)); one program = one batch row, one block of key columns
    b = tl.program_id(0).to(tl.int64)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    acc = column_sums(probs_ptr, mask_ptr, b, offs_j, n, H,
                  stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn,
                  BLOCK_I, BLOCK_J)
    j_in = offs_j < n
    real_j = tl.load(mask_ptr + b * stride_mb + offs_j.to(tl.int64) * stride_mn,
                     mask=j_in, other=0).to(tl.float32) != 0
    score = tl.where(real_j, acc, float("-inf"))
    tl.store(out_ptr + b * stride_ob + offs_j.to(tl.int64) * stride_on, score, mask=j_in)


def _block_sizes(n: int) -> tuple[int, int]:
    block_j = min(L.next_power_of_2(n), 128)
    return L.colsum_block_i(block_j), block_j


def launch_significance(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Launch the significance kernel, inputs unchecked (n any size: columns are tiled).

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32, CUDA (or CPU under the interpreter), any strides.
        mask: [B, n] bool/int/float on probs' device.
    Returns:
        [B, n] float32 scores, -inf at padding.
    """
    B, H, n, _ = probs.shape
    # NaN-poisoned under tests: any element the kernel fails to write shows up
    out = L.new_output((B, n), torch.float32, probs.device)
    m = L.mask_for_kernel(mask)
    block_i, block_j = _block_sizes(n)
    grid = (B, triton.cdiv(n, block_j))
    _significance_kernel[grid](
        probs, m, out, n, H,
        *probs.stride(), *m.stride(), *out.stride(),
        BLOCK_I=block_i, BLOCK_J=block_j, num_warps=L.num_warps_for(block_i * block_j),
    )
    return out


# ----------------------------------------------------------------------------- public


def significance(probs: torch.Tensor, mask: torch.Tensor, *, backend: str | None = None) -> torch.Tensor:
    """Significance scores of spec §1.

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32 softmax attention probabilities
            (query i, key j); may be non-contiguous (strides are passed to the kernel).
            float64 runs on the torch path only.
        mask: [B, n] bool, or int/float with 1 = real token, 0 = padding.
        backend: None (auto: Triton for CUDA tensors, the vectorised torch path on CPU and for
            float64), "triton" (not float64) or "torch".
    Returns:
        [B, n] float32: sum over heads and real query rows i != j of probs[b, h, i, j],
        accumulated in fp32 (float64 probs: float64 scores, accumulated in float64); -inf where
        mask[b, j] == 0. A NaN among the summed values makes that score NaN.
    """
    B, H, n = L.check_probs(probs)
    L.check_mask(mask, B, n)
    device = L.check_same_device(probs=probs, mask=mask)
    if L.resolve_backend(backend, device, dtype=("probs", probs.dtype)) == "triton":
        return launch_significance(probs, mask)
    return significance_torch(probs, mask)
