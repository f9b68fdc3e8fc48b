"""The extract layer (spec §2): significance, top-k selection and gather in at most two launches.

Triton path, at most two launches and no host synchronisation:
  1. ``_score_select_kernel`` (launched by :func:`launch_score_select`), one program per batch
     row: the column sums (kernels.significance.column_sums) over heads and real
     query rows accumulate in fp32 registers ([BLOCK_N], BLOCK_N = next_power_of_2(n) <= 512),
     padding keys become -inf, and the packed-key top-k writes the [B, k] indices. The scores
     never make a [B, n] round trip through memory.
  2. the gather kernel (kernels.gather.launch_gather): the kept hidden rows and mask entries.
``extract_from_scores`` starts from scores computed elsewhere (e.g. inside the attention
kernel): launch 1 is then the plain selection kernel.
float64 probabilities / scores take the torch path (scored and selected in float64); a NaN
score counts as -inf on both paths (kernels.select).

A per-row k ([B] integer tensor with an output ``width``, spec §8): both launches take it. The
selection writes row i's k_i' = min(max(k_i, 1), W) positions and 0 in its filler slots; the
gather copies the filler slots' rows (hidden[b, 0]) and stores their mask entries as 0, so
filler slots are padding downstream. Still two launches, no host sync, no extra torch op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import launch as L
from kernels.gather import gather_ref, gather_torch, launch_gather
from kernels.select import (keep_all, launch_select, load_row_k, select_ref, select_row, select_torch,
                            select_torch_rows)
from kernels.significance import column_sums, significance_ref, significance_torch


# ----------------------------------------------------------------------------- reference


def _filler_as_padding_ref(mask_kept: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Reference: with a per-row k, slots j >= k_i' = min(max(k_i, 1), W) of row i are filler
    and their mask entries padding (0 in the mask's dtype)."""
    W = mask_kept.shape[1]
    mask_kept = mask_kept.clone()
    for b, kb in enumerate(k.tolist()):
        mask_kept[b, min(max(kb, 1), W):] = 0
    return mask_kept


def extract_ref(probs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k, *, width: int | None = None):
    """Eager reference of the extract layer: significance_ref -> select_ref -> gather_ref.

    Args:
        probs: [B, H, n, n] float softmax attention probabilities (float64 scored in float64).
        hidden: [B, n, D] float. mask: [B, n] bool/int/float (1 real, 0 padding).
        k: int >= 1, or a [B] integer tensor (one k per row) with ``width`` (int >= 1).
        A column whose sum meets a NaN gets a NaN score, which selection counts as -inf.
    Returns:
        int k: (hidden_kept [B, k, D] hidden.dtype, mask_kept [B, k] mask.dtype, indices [B, k]
        int64); k >= n returns (hidden, mask, arange(n) per row) with hidden and mask unchanged.
        Tensor k: [B, W] / [B, W, D] outputs, W = min(width, n); indices as select_ref's, the
        rows and mask entries gathered by them, mask_kept 0 in the filler slots.
    """
    B, _, n, _ = probs.shape
    if not isinstance(k, torch.Tensor) and k >= n:
        return hidden, mask, keep_all(B, n, hidden.device)
    row_k = {} if width is None else {"width": width}
    indices = select_ref(significance_ref(probs, mask), k, **row_k)
    hidden_kept, mask_kept = gather_ref(hidden, mask, indices)
    if isinstance(k, torch.Tensor):
        mask_kept = _filler_as_padding_ref(mask_kept, k)
    return hidden_kept, mask_kept, indices


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _score_select_kernel(
    probs_ptr, mask_ptr, out_ptr, k_ptr, n, H, k,
    stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn, stride_ob, stride_ok, stride_k,
    ROW_K: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (B,); one program scores and selects one whole batch row.
    # k: the slots of an output row. Without ROW_K every row keeps k (k_ptr, stride_k unused);
    # with ROW_K, k is the width W and row b keeps min(max(k_ptr[b], 1), W), the rest 0.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    acc = column_sums(probs_ptr, mask_ptr, b, offs, n, H,
                  stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn,
                  BLOCK_I, BLOCK_N)
    real = tl.load(mask_ptr + b * stride_mb + offs.to(tl.int64) * stride_mn,
                   mask=offs < n, other=0).to(tl.float32) != 0
    score = tl.where(real, acc, float("-inf"))  # a padding key is never preferred to a real one
    if ROW_K:
        select_row(score, offs, n, load_row_k(k_ptr, b, stride_k, k), k,
                    out_ptr + b * stride_ob, stride_ok, True, BLOCK_N)
    else:
        select_row(score, offs, n, k, k, out_ptr + b * stride_ob, stride_ok, False, BLOCK_N)


def _block_sizes(n: int) -> tuple[int, int]:
    block_n = L.next_power_of_2(n)
    return L.colsum_block_i(block_n), block_n


def launch_score_select(probs: torch.Tensor, mask: torch.Tensor, k, width: int | None = None) -> torch.Tensor:
    """Launch 1 of the extract: score and select in one kernel, inputs unchecked.

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32, n <= MAX_TRITON_N, any strides.
        mask: [B, n] bool/int/float on probs' device.
        k: an int, 1 <= k < n; or a [B] integer tensor on probs' device with ``width``.
        width: with a tensor k, the W <= n output slots.
    Returns:
        [B, k] (or [B, W]) int64 positions, ascending, as ``select(significance(probs, mask), k)``.
    """
    B, H, n, _ = probs.shape
    row_k = width is not None
    slots = width if row_k else k
    out = L.new_output((B, slots), torch.int64, probs.device)
    m = L.mask_for_kernel(mask)
    k_rows = k if row_k else out                                  # dummy pointer for an int k
    block_i, block_n = _block_sizes(n)
    _score_select_kernel[(B,)](
        probs, m, out, k_rows, n, H, slots,
        *probs.stride(), *m.stride(), *out.stride(), k_rows.stride(0),
        ROW_K=row_k, BLOCK_I=block_i, BLOCK_N=block_n, num_warps=L.num_warps_for(block_i * block_n),
    )
    return out


# ----------------------------------------------------------------------------- public


def _check_extract(first_name, first, hidden, mask, k, width, backend):
    """Shared checks of extract / extract_from_scores; returns (k, W, resolved backend), W None
    for an int k.

    The backend follows probs' / scores' dtype (float64: torch path); the gather moves hidden
    in any accepted dtype, float64 included, on either path.
    """
    B, n = first.shape[0], first.shape[-1]
    L.check_mask(mask, B, n)
    L.check_hidden(hidden, B, n)
    device = L.check_same_device(**{first_name: first}, hidden=hidden, mask=mask)
    k, W = L.check_k_width(k, width, B, n, device, first_name)
    return k, W, L.resolve_backend(backend, device, n, L.MAX_TRITON_N, (first_name, first.dtype))


def _extract_torch_rows(hidden, mask, scores, k, W):
    """Torch path of a per-row k: select on ``scores`` (padding already -inf), gather, and
    mark the filler slots as padding (one op on the [B, W] mask)."""
    indices, filler = select_torch_rows(scores, k, W)
    hidden_kept, mask_kept = gather_torch(hidden, mask, indices)
    # A bool mask: & (ONNX Runtime has no Where on bools, which masked_fill exports to).
    kept = mask_kept & ~filler if mask_kept.dtype == torch.bool else mask_kept.masked_fill(filler, 0)
    return hidden_kept, kept, indices


def extract(probs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k, *, width: int | None = None,
            backend: str | None = None):
    """Hard extract layer (spec §2): keep the k most significant word vectors of each sequence.

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32 attention probabilities of this layer
            (query i, key j), may be non-contiguous; float64 on the torch path only (scored and
            selected in float64). A NaN reaching a column's sum makes its score NaN, and a NaN
            score counts as -inf: never preferred to a real token with a number.
        hidden: [B, n, D] float16/bfloat16/float32/float64 hidden states, may be non-contiguous.
        mask: [B, n] bool, or int/float with 1 = real token, 0 = padding.
        k: int >= 1, vectors to keep; or a [B] int64/int32/int16/int8/uint8 tensor on probs'
            device, one k per row (spec §8; never read on the host).
        width: required with a tensor k, forbidden with an int k: the output slots, int >= 1
            (the caller's promise: >= max k). W = min(width, n).
        backend: None (auto: Triton for CUDA tensors with n <= 512 and fp16/bf16/fp32 probs,
            else the vectorised torch path), "triton" (two launches, n <= 512, not float64)
            or "torch".
    Returns:
        int k: (hidden_kept [B, k, D] hidden.dtype, mask_kept [B, k] mask.dtype, indices [B, k]
        int64 ascending, [CLS] included). k >= n: (hidden, mask, arange(n) per row), the same
        hidden/mask objects, no launch.
        Tensor k: (hidden_kept [B, W, D], mask_kept [B, W], indices [B, W]), always selected
        (no k >= n shortcut): row i's k_i' = min(max(k_i, 1), W) kept positions in slots
        j < k_i' as with an int k, filler slots j >= k_i' with index 0, hidden row hidden[i, 0]
        and mask 0 (padding): mask_kept[i, j] = mask[i, indices[i, j]] if j < k_i' else 0.
    """
    B, H, n = L.check_probs(probs)
    k, W, resolved = _check_extract("probs", probs, hidden, mask, k, width, backend)
    if W is not None:
        if resolved == "triton":
            indices = launch_score_select(probs, mask, k, width=W)
            return (*launch_gather(hidden, mask, indices, k_rows=k), indices)
        return _extract_torch_rows(hidden, mask, significance_torch(probs, mask), k, W)
    if k >= n:
        return hidden, mask, keep_all(B, n, hidden.device)
    if resolved == "triton":
        indices = launch_score_select(probs, mask, k)
        hidden_kept, mask_kept = launch_gather(hidden, mask, indices)
    else:
        indices = select_torch(significance_torch(probs, mask), k)
        hidden_kept, mask_kept = gather_torch(hidden, mask, indices)
    return hidden_kept, mask_kept, indices


def extract_from_scores(scores: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k, *,
                        width: int | None = None, backend: str | None = None):
    """Extract layer from precomputed significance scores (e.g. from the attention kernel).

    Args:
        scores: [B, n] float32 (float16/bfloat16 upcast exactly; float64 on the torch path
            only, compared in float64) significance scores; positions with mask == 0 are
            treated as -inf whatever their score, and a NaN score counts as -inf.
        hidden, mask, k, width, backend: as in :func:`extract` (a tensor k on scores' device).
    Returns:
        As :func:`extract`.
    """
    B, n = L.check_scores(scores)
    k, W, resolved = _check_extract("scores", scores, hidden, mask, k, width, backend)
    if W is not None:
        if resolved == "triton":
            indices = launch_select(scores, k, mask=mask, width=W)
            return (*launch_gather(hidden, mask, indices, k_rows=k), indices)
        return _extract_torch_rows(hidden, mask, scores.masked_fill(mask == 0, float("-inf")), k, W)
    if k >= n:
        return hidden, mask, keep_all(B, n, hidden.device)
    if resolved == "triton":
        indices = launch_select(scores, k, mask=mask)
        hidden_kept, mask_kept = launch_gather(hidden, mask, indices)
    else:
        indices = select_torch(scores.masked_fill(mask == 0, float("-inf")), k)
        hidden_kept, mask_kept = gather_torch(hidden, mask, indices)
    return hidden_kept, mask_kept, indices


def extract_from_scores_ref(scores: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k, *,
                            width: int | None = None):
    """Eager reference of :func:`extract_from_scores` (same shapes and dtypes, same k / width)."""
    B, n = scores.shape
    if not isinstance(k, torch.Tensor) and k >= n:
        return hidden, mask, keep_all(B, n, hidden.device)
    row_k = {} if width is None else {"width": width}
    indices = select_ref(scores.masked_fill(mask == 0, float("-inf")), k, **row_k)
    hidden_kept, mask_kept = gather_ref(hidden, mask, indices)
    if isinstance(k, torch.Tensor):
        mask_kept = _filler_as_padding_ref(mask_kept, k)
    return hidden_kept, mask_kept, indices
