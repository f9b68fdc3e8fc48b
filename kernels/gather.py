"""Gather the kept word vectors and their mask entries (spec §2, step 4).

    hidden_kept[b, r] = hidden[b, indices[b, r]],  mask_kept[b, r] = mask[b, indices[b, r]]

The mask is gathered with the same indices, never sliced. Top to bottom: the eager reference,
the vectorised torch path (:func:`gather_torch`), the Triton kernel, the launcher
(:func:`launch_gather`, also used by the extract), the public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch as L


# ----------------------------------------------------------------------------- reference


def gather_ref(hidden: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor):
    """Eager reference: a loop over the batch, written for clarity.

    Args:
        hidden: [B, n, D] any float dtype. mask: [B, n] any dtype. indices: [B, k] int64 in [0, n).
    Returns:
        (hidden_kept [B, k, D] hidden.dtype, mask_kept [B, k] mask.dtype).
    """
    rows = [hidden[b].index_select(0, indices[b]) for b in range(hidden.shape[0])]
    masks = [mask[b].index_select(0, indices[b]) for b in range(mask.shape[0])]
    return torch.stack(rows), torch.stack(masks)


def gather_torch(hidden: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor):
    """Vectorised torch path of :func:`gather`, inputs unchecked.

    Args:
        hidden: [B, n, D] any dtype. mask: [B, n] any dtype. indices: [B, k] int64 in [0, n).
    Returns:
        (hidden_kept [B, k, D] hidden.dtype, mask_kept [B, k] mask.dtype).

    One index_select over the flattened [B * n] rows (4-5x faster on CPU than advanced
    indexing), or advanced indexing when hidden's rows cannot be flattened without a copy.
    """
    B, n, D = hidden.shape
    k = indices.shape[1]
    flat = (indices + torch.arange(B, device=indices.device)[:, None] * n).reshape(-1)
    mask_kept = mask.reshape(B * n).index_select(0, flat).view(B, k)  # mask is small: reshape may copy
    if hidden.stride(0) == n * hidden.stride(1):                      # flatten(0, 1) is a view
        return hidden.flatten(0, 1).index_select(0, flat).view(B, k, D), mask_kept
    batch = torch.arange(B, device=hidden.device)[:, None]
    return hidden[batch, indices], mask_kept


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _gather_kernel(
    hidden_ptr, mask_ptr, idx_ptr, out_h_ptr, out_m_ptr, k_ptr, k, D,
    stride_hb, stride_hn, stride_hd, stride_mb, stride_mn, stride_ib, stride_ik,
    stride_ob, stride_ok, stride_od, stride_omb, stride_omk, stride_k,
    ROW_K: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B, cdiv(k, BLOCK_K)); one program copies BLOCK_K kept rows of one batch row.
    # ROW_K (per-row k of the selection): slots r >= min(max(k_ptr[b], 1), k) are filler, and
    # their mask entries are stored as 0 (padding); without it k_ptr, stride_k are unused.
    b = tl.program_id(0).to(tl.int64)
    offs_r = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    r_in = offs_r < k
    rows = tl.load(idx_ptr + b * stride_ib + offs_r.to(tl.int64) * stride_ik, mask=r_in, other=0)
    rows = rows.to(tl.int64)  # int64 offsets: rows * stride can exceed 2^31
    # Pure data movement, no arithmetic: values are copied in their own dtype (bit-exact for
    # every dtype, fp64 included), so the interpreter's bf16 arithmetic issue does not arise.
    m = tl.load(mask_ptr + b * stride_mb + rows * stride_mn, mask=r_in)
    if ROW_K:
        k_row = tl.minimum(tl.maximum(tl.load(k_ptr + b * stride_k), 1), k)  # as kernels.select.load_row_k
        m = tl.where(offs_r < k_row, m, 0)
    tl.store(out_m_ptr + b * stride_omb + offs_r.to(tl.int64) * stride_omk, m, mask=r_in)
    src = hidden_ptr + b * stride_hb + rows[:, None] * stride_hn
    dst = out_h_ptr + b * stride_ob + offs_r.to(tl.int64)[:, None] * stride_ok
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        io = r_in[:, None] & (offs_d < D)[None, :]
        v = tl.load(src + offs_d.to(tl.int64)[None, :] * stride_hd, mask=io)
        tl.store(dst + offs_d.to(tl.int64)[None, :] * stride_od, v, mask=io)


def _block_sizes(k: int, D: int) -> tuple[int, int]:
    block_d = min(L.next_power_of_2(max(D, 1)), 256)
    block_k = max(1, min(L.next_power_of_2(k), 4096 // block_d))
    return block_k, block_d


def launch_gather(hidden: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor,
                  k_rows: torch.Tensor | None = None):
    """Launch the gather kernel, inputs unchecked.

    Args:
        hidden: [B, n, D] float16/bfloat16/float32/float64, any strides. mask: [B, n] bool/int/float.
        indices: [B, k] int64 in [0, n), all on one CUDA device (or CPU under the interpreter).
        k_rows: the [B] integer per-row k of a selection with filler slots (indices [B, W]);
            slot r of row b with r >= min(max(k_rows[b], 1), W) then gets mask 0 (padding).
    Returns:
        (hidden_kept [B, k, D] hidden.dtype contiguous, mask_kept [B, k] mask.dtype).
    """
    B, _, D = hidden.shape
    k = indices.shape[1]
    out_h = L.new_output((B, k, D), hidden.dtype, hidden.device)
    out_m = L.new_output((B, k), mask.dtype, mask.device)
    m_in, m_out = L.mask_for_kernel(mask), L.mask_for_kernel(out_m)
    k_ptr = k_rows if k_rows is not None else indices             # dummy pointer without it
    block_k, block_d = _block_sizes(k, D)
    grid = (B, triton.cdiv(k, block_k))
    _gather_kernel[grid](
        hidden, m_in, indices, out_h, m_out, k_ptr, k, D,
        *hidden.stride(), *m_in.stride(), *indices.stride(), *out_h.stride(), *m_out.stride(),
        k_ptr.stride(0), ROW_K=k_rows is not None,
        BLOCK_K=block_k, BLOCK_D=block_d, num_warps=L.num_warps_for(block_k * block_d),
    )
    return out_h, out_m


# ----------------------------------------------------------------------------- public


def gather(hidden: torch.Tensor, mask: torch.Tensor, indices: torch.Tensor, *, backend: str | None = None):
    """Gather kept rows of hidden and the matching mask entries.

    Args:
        hidden: [B, n, D] float16/bfloat16/float32/float64, may be non-contiguous.
        mask: [B, n] bool/int/float.
        indices: [B, k] int64, values in [0, n) (not checked on device: no host sync).
        backend: None (auto: Triton for CUDA tensors, torch path on CPU), "triton" or "torch".
    Returns:
        (hidden_kept [B, k, D] hidden.dtype contiguous, mask_kept [B, k] mask.dtype).
    """
    B, n, _ = L.check_hidden(hidden)
    L.check_mask(mask, B, n)
    L.check_indices(indices, B, n)
    device = L.check_same_device(hidden=hidden, mask=mask, indices=indices)
    if L.resolve_backend(backend, device) == "triton":
        return launch_gather(hidden, mask, indices)
    return gather_torch(hidden, mask, indices)
