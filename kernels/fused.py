"""The extract layer (spec §2): significance, top-k selection and gather, fused.

Triton path, at most two launches and no host synchronisation:
  1. ``_score_select_kernel``, one program per batch row: the column sums over heads and real
     query rows accumulate in fp32 registers ([BLOCK_N], BLOCK_N = next_power_of_2(n) <= 512),
     padding keys become -inf, and the packed-key top-k writes the [B, k] indices. The scores
     never make a [B, n] round trip through memory.
  2. ``_gather_kernel`` (kernels.gather_rows): the kept hidden rows and mask entries.
``extract_from_scores`` starts from scores computed elsewhere (e.g. inside the attention
kernel): launch 1 is then the plain selection kernel.
float64 probabilities / scores take the torch path (scored and selected in float64); a NaN
score counts as -inf on both paths (kernels.topk).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _launch as L
from kernels.gather_rows import _gather_torch, _gather_triton, gather_ref
from kernels.scores import _colsum, _significance_torch, significance_ref
from kernels.topk import _keep_all, _select_row, _select_torch, _select_triton, select_ref


# ----------------------------------------------------------------------------- reference


def extract_ref(probs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k: int):
    """Eager reference of the extract layer: significance_ref -> select_ref -> gather_ref.

    Args:
        probs: [B, H, n, n] float softmax attention probabilities (float64 scored in float64).
        hidden: [B, n, D] float. mask: [B, n] bool/int/float (1 real, 0 padding). k: int >= 1.
        A column whose sum meets a NaN gets a NaN score, which selection counts as -inf.
    Returns:
        (hidden_kept [B, k, D] hidden.dtype, mask_kept [B, k] mask.dtype, indices [B, k] int64);
        k >= n returns (hidden, mask, arange(n) per row) with hidden and mask unchanged.
    """
    B, _, n, _ = probs.shape
    if k >= n:
        return hidden, mask, _keep_all(B, n, hidden.device)
    indices = select_ref(significance_ref(probs, mask), k)
    hidden_kept, mask_kept = gather_ref(hidden, mask, indices)
    return hidden_kept, mask_kept, indices


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _score_select_kernel(
    probs_ptr, mask_ptr, out_ptr, n, H, k,
    stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn, stride_ob, stride_ok,
    BLOCK_I: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (B,); one program scores and selects one whole batch row
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    acc = _colsum(probs_ptr, mask_ptr, b, offs, n, H,
                  stride_pb, stride_ph, stride_pi, stride_pj, stride_mb, stride_mn,
                  BLOCK_I, BLOCK_N)
    real = tl.load(mask_ptr + b * stride_mb + offs.to(tl.int64) * stride_mn,
                   mask=offs < n, other=0).to(tl.float32) != 0
    score = tl.where(real, acc, float("-inf"))  # a padding key is never preferred to a real one
    _select_row(score, offs, n, k, out_ptr + b * stride_ob, stride_ok, BLOCK_N)


def _block_sizes(n: int) -> tuple[int, int]:
    block_n = L.next_power_of_2(n)
    return L.colsum_block_i(block_n), block_n


def _score_select_triton(probs: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    B, H, n, _ = probs.shape
    out = L.new_output((B, k), torch.int64, probs.device)
    m = L.mask_for_kernel(mask)
    block_i, block_n = _block_sizes(n)
    _score_select_kernel[(B,)](
        probs, m, out, n, H, k,
        *probs.stride(), *m.stride(), *out.stride(),
        BLOCK_I=block_i, BLOCK_N=block_n, num_warps=L.num_warps_for(block_i * block_n),
    )
    return out


# ----------------------------------------------------------------------------- public


def _check_extract(first_name, first, hidden, mask, k, backend):
    """Shared checks of extract / extract_from_scores; returns (k, resolved backend).

    The backend follows probs' / scores' dtype (float64: torch path); the gather moves hidden
    in any accepted dtype, float64 included, on either path.
    """
    B, n = first.shape[0], first.shape[-1]
    L.check_mask(mask, B, n)
    L.check_hidden(hidden, B, n)
    k = L.check_k(k)
    device = L.check_same_device(**{first_name: first}, hidden=hidden, mask=mask)
    return k, L.resolve_backend(backend, device, n, L.MAX_TRITON_N, (first_name, first.dtype))


def extract(probs: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k: int, *, backend: str | None = None):
    """Hard extract layer (spec §2): keep the k most significant word vectors of each sequence.

    Args:
        probs: [B, H, n, n] float16/bfloat16/float32 attention probabilities of this layer
            (query i, key j), may be non-contiguous; float64 on the torch path only (scored and
            selected in float64). A NaN reaching a column's sum makes its score NaN, and a NaN
            score counts as -inf: never preferred to a real token with a number.
        hidden: [B, n, D] float16/bfloat16/float32/float64 hidden states, may be non-contiguous.
        mask: [B, n] bool, or int/float with 1 = real token, 0 = padding.
        k: int >= 1, vectors to keep.
        backend: None (auto: Triton for CUDA tensors with n <= 512 and fp16/bf16/fp32 probs,
            else the vectorised torch path), "triton" (two launches, n <= 512, not float64)
            or "torch".
    Returns:
        (hidden_kept [B, k, D] hidden.dtype, mask_kept [B, k] mask.dtype, indices [B, k] int64
        ascending, [CLS] included). k >= n: (hidden, mask, arange(n) per row), the same
        hidden/mask objects, no launch.
    """
    B, H, n = L.check_probs(probs)
    k, resolved = _check_extract("probs", probs, hidden, mask, k, backend)
    if k >= n:
        return hidden, mask, _keep_all(B, n, hidden.device)
    if resolved == "triton":
        indices = _score_select_triton(probs, mask, k)
        hidden_kept, mask_kept = _gather_triton(hidden, mask, indices)
    else:
        indices = _select_torch(_significance_torch(probs, mask), k)
        hidden_kept, mask_kept = _gather_torch(hidden, mask, indices)
    return hidden_kept, mask_kept, indices


def extract_from_scores(scores: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k: int, *,
                        backend: str | None = None):
    """Extract layer from precomputed significance scores (e.g. from the attention kernel).

    Args:
        scores: [B, n] float32 (float16/bfloat16 upcast exactly; float64 on the torch path
            only, compared in float64) significance scores; positions with mask == 0 are
            treated as -inf whatever their score, and a NaN score counts as -inf.
        hidden, mask, k, backend: as in :func:`extract`.
    Returns:
        As :func:`extract`.
    """
    B, n = L.check_scores(scores)
    k, resolved = _check_extract("scores", scores, hidden, mask, k, backend)
    if k >= n:
        return hidden, mask, _keep_all(B, n, hidden.device)
    if resolved == "triton":
        indices = _select_triton(scores, k, mask=mask)
        hidden_kept, mask_kept = _gather_triton(hidden, mask, indices)
    else:
        indices = _select_torch(scores.masked_fill(mask == 0, float("-inf")), k)
        hidden_kept, mask_kept = _gather_torch(hidden, mask, indices)
    return hidden_kept, mask_kept, indices


def extract_from_scores_ref(scores: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor, k: int):
    """Eager reference of :func:`extract_from_scores` (same shapes and dtypes)."""
    B, n = scores.shape
    if k >= n:
        return hidden, mask, _keep_all(B, n, hidden.device)
    indices = select_ref(scores.masked_fill(mask == 0, float("-inf")), k)
    hidden_kept, mask_kept = gather_ref(hidden, mask, indices)
    return hidden_kept, mask_kept, indices


def aot_specs(n: int = 128):
    """(name, jit_fn, signature, constexprs) of the fused kernel, per probs dtype, for kernels.aot.

    Launch 2 of the fused path is kernels.gather_rows._gather_kernel, compiled by its own specs.
    """
    block_i, block_n = _block_sizes(n)
    specs = []
    for dt in L.AOT_DTYPES:
        sig = {
            "probs_ptr": L.TRITON_PTR[dt], "mask_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "H": "i32",
            "k": "i32", "stride_pb": "i64", "stride_ph": "i32", "stride_pi": "i32", "stride_pj": "i32",
            "stride_mb": "i32", "stride_mn": "i32", "stride_ob": "i32", "stride_ok": "i32",
            "BLOCK_I": "constexpr", "BLOCK_N": "constexpr",
        }
        specs.append((f"score_select[{L.dtype_name(dt)}]", _score_select_kernel, sig,
                      {"BLOCK_I": block_i, "BLOCK_N": block_n}))
    return specs
