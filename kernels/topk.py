"""Top-k selection of the word vectors to keep (spec §2, steps 1-3).

Keep the k highest-scoring positions, [CLS] (position 0) always kept, ties broken by the lower
index, and return them sorted ascending. A NaN score counts as -inf, whatever its sign bit (the
same as padding: never preferred to a real token with a number), on every path: the reference,
the torch path, the Triton kernel and the fused extract kernel that shares its row helper.
float64 scores are compared in float64 (torch path and reference only).

Top to bottom: the eager reference, the vectorised torch path, the Triton kernel (and the
per-row helper the fused extract kernel shares), the launcher, the public function.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels import _launch as L


# ----------------------------------------------------------------------------- reference


def _keep_all(B: int, n: int, device) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64, device=device).expand(B, n).contiguous()


def select_ref(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Eager reference for the selection.

    Args:
        scores: [B, n] float16/bfloat16/float32/float64; -inf marks padding. A NaN score counts
            as -inf, whatever its sign bit: never preferred to a real token with a number.
        k: number of positions to keep, int >= 1.
    Returns:
        [B, min(k, n)] int64: per row the top-k positions with position 0 forced in, ties to the
        lower index (stable descending sort), sorted ascending. k >= n gives arange(n) per row.
    """
    B, n = scores.shape
    if k >= n:
        return _keep_all(B, n, scores.device)
    s = scores.double()  # exact for every accepted dtype: one rule, one comparison
    s = torch.where(torch.isnan(s), float("-inf"), s)  # NaN counts as -inf (torch.sort puts NaN first)
    s[:, 0] = float("inf")  # [CLS] is always kept
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def _nan_to_neginf(s: torch.Tensor) -> torch.Tensor:
    """NaN (either sign bit) -> -inf; everything else, +-inf included, unchanged."""
    return torch.where(torch.isnan(s), torch.full((), float("-inf"), dtype=s.dtype, device=s.device), s)


def _packed_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 sort keys, unique per row: order-preserving score bits above the inverted index.

    High 32 bits: the fp32 bits mapped to a signed int that orders like the float (negative
    floats get every bit but the sign flipped). Low 32 bits: n - 1 - j, so among equal scores
    the lower index has the larger key: a descending order of keys breaks ties to the lower
    index by construction, and every key is distinct (top-k of them is well defined).
    NaN becomes -inf first: left as is, its key would depend on its sign bit (a negative NaN
    maps below -inf, a positive one above +inf).
    """
    B, n = scores.shape
    s = _nan_to_neginf(scores.float())           # a fresh fp32 tensor: safe to write into
    s[:, 0] = float("inf")                       # [CLS] always kept
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 ties with +0.0, as in torch.sort
    bits = s.view(torch.int32)
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    inv = (n - 1) - torch.arange(n, dtype=torch.int64, device=scores.device)
    return (key32 << 32) | inv


def _select_torch_fp64(scores: torch.Tensor, k: int) -> torch.Tensor:
    """float64 scores: 64 score bits leave no room for an index in an int64 key, so select by
    threshold instead. The k-th largest value t is well defined whatever topk does with ties;
    every position above t is kept, and of those equal to t the lowest-indexed ones fill the
    remaining slots (ties to the lower index). == and > treat -0.0 as +0.0, as torch.sort does.
    No host synchronisation: the ascending slots come from a prefix count and a scatter.
    """
    B, n = scores.shape
    s = _nan_to_neginf(scores)
    s[:, 0] = float("inf")                                   # [CLS] always kept
    kth = torch.topk(s, k, dim=1, sorted=True).values[:, k - 1:k]
    above = s > kth
    tied = s == kth
    room = k - above.sum(dim=1, keepdim=True)                # slots left for the ties (>= 1)
    keep = above | (tied & (torch.cumsum(tied, dim=1) <= room))  # exactly k per row
    slot = torch.where(keep, torch.cumsum(keep, dim=1) - 1, k)   # dropped lanes go to slot k
    pos = torch.arange(n, dtype=torch.int64, device=scores.device).expand(B, n)
    out = torch.empty(B, k + 1, dtype=torch.int64, device=scores.device)
    return out.scatter_(1, slot, pos)[:, :k]


def _select_torch(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Vectorised torch path: top-k of the packed keys (exact, no ties), then ascending order;
    float64 scores go through the threshold selection (:func:`_select_torch_fp64`)."""
    if scores.dtype == torch.float64:
        return _select_torch_fp64(scores, k)
    n = scores.shape[1]
    top = torch.topk(_packed_keys(scores), k, dim=1, sorted=False).values
    idx = (n - 1) - (top & 0xFFFFFFFF)
    return idx.sort(dim=1).values


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _select_row(score, offs, n, k, out_ptr, stride_on, BLOCK_N: tl.constexpr):
    """Store the top-k lanes of ``score`` ([BLOCK_N] fp32, lanes offs >= n ignored) ascending.

    Writes k int64 positions to out_ptr + slot * stride_on, slot = 0..k-1. A NaN score counts
    as -inf (the rule of every selection path).
    """
    in_row = offs < n
    # NaN counts as -inf; left as is, its packed key would depend on its sign bit (a negative
    # NaN below -inf, a positive one above +inf). != is unordered: true for NaN only.
    score = tl.where(score != score, float("-inf"), score)
    score = tl.where(offs == 0, float("inf"), score)  # [CLS] is always kept
    score = tl.where(score == 0.0, 0.0, score)        # -0.0 ties with +0.0, as in torch.sort
    # Packed sortable key: the fp32 bits mapped to an order-preserving signed int (flip every
    # bit but the sign of negative floats) in the high 32 bits, the INVERTED index
    # BLOCK_N - 1 - j in the low 32 bits. Keys are unique, and a descending sort puts equal
    # scores lower-index first by construction. Lanes j >= n get the smallest high half
    # (int32 min, below the key of -inf), so they sort after every real position.
    bits = score.to(tl.int32, bitcast=True)
    key32 = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)
    key32 = tl.where(in_row, key32, -2147483647 - 1)
    key = (key32 << 32) | (BLOCK_N - 1 - offs).to(tl.int64)
    ranked = tl.sort(key, descending=True)
    # The k-th largest key is the threshold; exactly k lanes reach it (keys are unique).
    kth = tl.sum(tl.where(offs == k - 1, ranked, 0), axis=0)
    keep = key >= kth
    # Instead of a second sort by index: a prefix count over the kept lanes, taken in index
    # order, is each kept position's slot in the ascending output.
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + slot.to(tl.int64) * stride_on, offs.to(tl.int64), mask=keep)


@triton.jit
def _select_kernel(
    scores_ptr, mask_ptr, out_ptr, n, k,
    stride_sb, stride_sn, stride_mb, stride_mn, stride_ob, stride_on,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (B,); one program selects one batch row, held whole in registers
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < n
    score = tl.load(scores_ptr + b * stride_sb + offs.to(tl.int64) * stride_sn,
                    mask=in_row, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        real = tl.load(mask_ptr + b * stride_mb + offs.to(tl.int64) * stride_mn,
                       mask=in_row, other=0).to(tl.float32) != 0
        score = tl.where(real, score, float("-inf"))
    _select_row(score, offs, n, k, out_ptr + b * stride_ob, stride_on, BLOCK_N)


def _select_triton(scores: torch.Tensor, k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the selection kernel (k < n, n <= MAX_TRITON_N, fp16/bf16/fp32 scores); padding
    forced to -inf if mask given."""
    B, n = scores.shape
    out = L.new_output((B, k), torch.int64, scores.device)
    block_n = L.next_power_of_2(n)
    m = L.mask_for_kernel(mask) if mask is not None else scores  # dummy pointer when no mask
    _select_kernel[(B,)](
        scores, m, out, n, k,
        *scores.stride(), *m.stride(), *out.stride(),
        HAS_MASK=mask is not None, BLOCK_N=block_n, num_warps=L.num_warps_for(block_n * 8),
    )
    return out


# ----------------------------------------------------------------------------- public


def select(scores: torch.Tensor, k: int, *, backend: str | None = None) -> torch.Tensor:
    """Positions to keep: top-k by score, [CLS] always kept, ties to the lower index, ascending.

    Args:
        scores: [B, n] float32 (float16/bfloat16 are upcast exactly), or float64 (torch path
            only: compared in float64). -inf marks padding, which then fills leftover slots
            lowest index first. A NaN score counts as -inf, whatever its sign bit: it is never
            preferred to a real token with a number, and ties with padding (lower index first).
        k: int >= 1.
        backend: None (auto: Triton for CUDA tensors with n <= 512 and a float16/bfloat16/
            float32 dtype, else the torch path), "triton" (n <= 512, not float64) or "torch".
    Returns:
        [B, k] int64 (``[B, n]`` = arange(n) per row when k >= n, without a launch); equal to
        :func:`select_ref` exactly.
    """
    B, n = L.check_scores(scores)
    k = L.check_k(k)
    resolved = L.resolve_backend(backend, scores.device, n, L.MAX_TRITON_N, ("scores", scores.dtype))
    if k >= n:
        return _keep_all(B, n, scores.device)
    if resolved == "triton":
        return _select_triton(scores, k)
    return _select_torch(scores, k)


def aot_specs(n: int = 128):
    """(name, jit_fn, signature, constexprs) of every kernel here, per scores dtype, for kernels.aot."""
    specs = []
    for dt in L.AOT_DTYPES:
        sig = {
            "scores_ptr": L.TRITON_PTR[dt], "mask_ptr": "*i64", "out_ptr": "*i64", "n": "i32", "k": "i32",
            "stride_sb": "i32", "stride_sn": "i32", "stride_mb": "i32", "stride_mn": "i32",
            "stride_ob": "i32", "stride_on": "i32", "HAS_MASK": "constexpr", "BLOCK_N": "constexpr",
        }
        specs.append((f"select[{L.dtype_name(dt)}]", _select_kernel, sig,
                      {"HAS_MASK": True, "BLOCK_N": L.next_power_of_2(n)}))
    return specs
