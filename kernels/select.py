"""Top-k selection of the word vectors to keep (spec §2, steps 1-3).

Keep the k highest-scoring positions, [CLS] (position 0) always kept, ties broken by the lower
index, and return them sorted ascending. A NaN score counts as -inf, whatever its sign bit (the
same as padding: never preferred to a real token with a number), on every path: the reference,
the torch path, the Triton kernel and the fused extract kernel that shares its row helper.
float64 scores are compared in float64 (torch path and reference only).

k is an int (every row keeps k), or a [B] integer tensor with an output ``width`` (spec §8,
proportional retention): row i keeps k_i' = min(max(k_i, 1), W) positions, W = min(width, n),
in slots 0..k_i'-1 of a [B, W] output; slots k_i'..W-1 hold 0. The tensor's values are never
read on the host (no synchronisation): the torch path and the kernels clamp them on device.

Top to bottom: the eager reference, the vectorised torch paths (:func:`select_torch`,
:func:`select_torch_rows`), the Triton kernel and its device functions (:func:`load_row_k`,
:func:`ranking_keys`, :func:`top_k_lanes`, :func:`select_row`, shared with the extract and
the fused select-gather-norm kernels), the launcher (:func:`launch_select`), the
public function.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from kernels import launch as L


# ----------------------------------------------------------------------------- reference


def keep_all(B: int, n: int, device) -> torch.Tensor:
    """[B, n] int64 arange(n) per row, contiguous: the selection when k >= n keeps everything."""
    return torch.arange(n, dtype=torch.int64, device=device).expand(B, n).contiguous()


def select_ref(scores: torch.Tensor, k, *, width: int | None = None) -> torch.Tensor:
    """Eager reference for the selection.

    Args:
        scores: [B, n] float16/bfloat16/float32/float64; -inf marks padding. A NaN score counts
            as -inf, whatever its sign bit: never preferred to a real token with a number.
        k: number of positions to keep, int >= 1; or a [B] integer tensor, one k per row
            (then ``width`` is required).
        width: with a tensor k, the output slots (int >= 1; W = min(width, n)).
    Returns:
        int k: [B, min(k, n)] int64: per row the top-k positions with position 0 forced in, ties
        to the lower index (stable descending sort), sorted ascending. k >= n gives arange(n)
        per row.
        Tensor k: [B, W] int64: row i holds its own top-k_i' positions, k_i' = min(max(k_i, 1), W),
        by the same rule in slots 0..k_i'-1, and 0 in slots k_i'..W-1.
    """
    B, n = scores.shape
    if isinstance(k, torch.Tensor):
        _, W = L.check_k_width(k, width, B, n, scores.device)
        # Row by row through the int-k rule: the per-row spec, in its plainest form.
        out = torch.zeros(B, W, dtype=torch.int64, device=scores.device)
        for b, kb in enumerate(k.tolist()):
            kb = min(max(kb, 1), W)
            out[b, :kb] = select_ref(scores[b:b + 1], kb)[0]
        return out
    if k >= n:
        return keep_all(B, n, scores.device)
    s = scores.double()  # exact for every accepted dtype: one rule, one comparison
    s = torch.where(torch.isnan(s), float("-inf"), s)  # NaN counts as -inf (torch.sort puts NaN first)
    s[:, 0] = float("inf")  # [CLS] is always kept
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]
    return order.sort(dim=1).values


def ascending(idx: torch.Tensor) -> torch.Tensor:
    """``[B, W]`` int64 of distinct values per row, sorted ascending along dim 1: a full topk,
    which equals the sort for distinct values and exports to ONNX (TopK; ONNX has no sort)."""
    return torch.topk(idx, idx.shape[1], dim=1, largest=False, sorted=True).values


def _nan_to_neginf(s: torch.Tensor) -> torch.Tensor:
    """NaN (either sign bit) -> -inf; everything else, +-inf included, unchanged."""
    return torch.where(torch.isnan(s), torch.full((), float("-inf"), dtype=s.dtype, device=s.device), s)


def _ranked(scores: torch.Tensor) -> torch.Tensor:
    """A fresh copy of ``scores [B, n]`` as every torch path ranks them: NaN as -inf, [CLS]
    (position 0) +inf so that it is always kept."""
    s = _nan_to_neginf(scores)
    s[:, 0] = float("inf")
    return s


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
    s = _ranked(scores.float())                  # a fresh fp32 tensor: safe to write into
    s = torch.where(s == 0, torch.zeros_like(s), s)  # -0.0 ties with +0.0, as in torch.sort
    bits = s.view(torch.int32)
    key32 = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(torch.int64)
    inv = (n - 1) - torch.arange(n, dtype=torch.int64, device=scores.device)
    return (key32 << 32) | inv


def _select_by_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """float64 scores (64 score bits leave no room for an index in an int64 key), and any dtype
    while ``torch.export`` traces (the packed key's bit cast has no ONNX op): select by
    threshold instead. The k-th largest value t is well defined whatever topk does with ties;
    every position above t is kept, and of those equal to t the lowest-indexed ones fill the
    remaining slots (ties to the lower index). == and > treat -0.0 as +0.0, as torch.sort does.
    No host synchronisation: the ascending slots come from a prefix count and a scatter.
    """
    B, n = scores.shape
    s = _ranked(scores)
    kth = torch.topk(s, k, dim=1, sorted=True).values[:, k - 1:k]
    above = s > kth
    tied = s == kth
    room = k - above.sum(dim=1, keepdim=True)                # slots left for the ties (>= 1)
    keep = above | (tied & (torch.cumsum(tied, dim=1) <= room))  # exactly k per row
    slot = torch.where(keep, torch.cumsum(keep, dim=1) - 1, k)   # dropped lanes go to slot k
    pos = torch.arange(n, dtype=torch.int64, device=scores.device).expand(B, n)
    out = torch.empty(B, k + 1, dtype=torch.int64, device=scores.device)
    return out.scatter_(1, slot, pos)[:, :k]


# ONNX's TopK breaks ties by the lower index (the operator's specification; ONNX Runtime's CPU
# kernel does, checked on heavily tied rows), torch.topk promises no order among ties. So a graph
# bound for ONNX selects with plain TopK nodes (two per layer instead of the threshold selection's
# ~16: prefix counts, a scatter), while torch.export, whose program runs torch.topk, keeps the
# threshold selection. ``onnx_tie_order()`` is entered by ``powerbert.deployment.export_onnx``.
_onnx_tie_order = False


@contextlib.contextmanager
def onnx_tie_order():
    """Inside this block a traced selection relies on ONNX TopK's tie order (lower index first);
    only for graphs that ONNX Runtime (or another ONNX runtime honouring the spec) will run."""
    global _onnx_tie_order
    previous, _onnx_tie_order = _onnx_tie_order, True
    try:
        yield
    finally:
        _onnx_tie_order = previous


def _onnx_topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``[B, k]`` int64 positions of the k largest scores, [CLS] forced, NaN as -inf, in
    descending score order with ties to the lower index *as ONNX TopK orders them*."""
    return torch.topk(_ranked(scores.float()), k, dim=1, sorted=True).indices


def _onnx_graph(scores: torch.Tensor) -> bool:
    """True while tracing a graph bound for ONNX (``onnx_tie_order``) with scores TopK ranks in
    fp32 (float64 scores keep the threshold selection: fp32 would merge distinct values)."""
    return _onnx_tie_order and scores.dtype != torch.float64 and torch.compiler.is_exporting()


def select_torch(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Vectorised torch path of :func:`select` for an int k, inputs unchecked.

    Args:
        scores: [B, n] float16/bfloat16/float32/float64, -inf at padding. k: int, 1 <= k < n.
    Returns:
        [B, k] int64 positions, ascending, as :func:`select_ref`.

    Top-k of the packed keys (exact, no ties), then ascending order; float64 scores go through
    the threshold selection (:func:`_select_by_threshold`).
    """
    if _onnx_graph(scores):
        return ascending(_onnx_topk_indices(scores, k))
    if scores.dtype == torch.float64 or torch.compiler.is_exporting():
        return _select_by_threshold(scores, k)
    n = scores.shape[1]
    top = torch.topk(_packed_keys(scores), k, dim=1, sorted=False).values
    idx = (n - 1) - (top & 0xFFFFFFFF)
    return ascending(idx)


def select_torch_rows(scores: torch.Tensor, k: torch.Tensor, width: int):
    """Vectorised torch path of :func:`select` for a per-row k, inputs unchecked.

    Args:
        scores: [B, n] float16/bfloat16/float32/float64, -inf at padding.
        k: [B] integer tensor on scores' device (any values: clamped to [1, width] on device).
        width: W <= n output slots.
    Returns (indices [B, W] int64, filler [B, W] bool): row i's top-k_i' positions ascending in
    slots j < k_i' = min(max(k_i, 1), W), 0 in the filler slots j >= k_i'. No host sync.
    """
    B, n = scores.shape
    k = k.to(torch.int64).clamp(1, width)                  # k < 1 keeps [CLS]; k > W is cut to W
    rank = torch.arange(width, dtype=torch.int64, device=scores.device)
    filler = rank >= k[:, None]                            # [B, W]
    if _onnx_graph(scores):
        top_positions = _onnx_topk_indices(scores, width)
    elif scores.dtype == torch.float64 or torch.compiler.is_exporting():
        return _select_by_threshold_rows(scores, k, width), filler
    else:
        # The W largest keys, descending (sorted=True): keys are unique, so rank r is well defined.
        top_positions = (n - 1) - (torch.topk(_packed_keys(scores), width, dim=1, sorted=True).values & 0xFFFFFFFF)
    # Row i keeps ranks r < k_i'. The ranks it drops become n + r, beyond every position, so the
    # ascending sort puts the kept positions first, in slots 0..k_i'-1.
    idx = torch.where(filler, n + rank, top_positions)
    idx = ascending(idx)
    return idx.masked_fill_(filler, 0), filler


def _select_by_threshold_rows(scores: torch.Tensor, k: torch.Tensor, width: int) -> torch.Tensor:
    """float64 scores with a per-row k (already clamped to [1, W]): the threshold selection of
    :func:`_select_by_threshold`, with row i's threshold the k_i'-th largest value of its row
    (gathered from a sorted top-W). Filler slots j >= k_i' hold 0."""
    B, n = scores.shape
    s = _ranked(scores)
    top = torch.topk(s, width, dim=1, sorted=True).values
    kth = top.gather(1, (k - 1)[:, None])                    # [B, 1]
    above = s > kth
    tied = s == kth
    room = k[:, None] - above.sum(dim=1, keepdim=True)       # slots left for the ties (>= 1)
    keep = above | (tied & (torch.cumsum(tied, dim=1) <= room))  # exactly k_i' in row i
    slot = torch.where(keep, torch.cumsum(keep, dim=1) - 1, width)  # dropped lanes go to slot W
    pos = torch.arange(n, dtype=torch.int64, device=scores.device).expand(B, n)
    out = torch.zeros(B, width + 1, dtype=torch.int64, device=scores.device)  # filler slots: 0
    return out.scatter_(1, slot, pos)[:, :width]


# ----------------------------------------------------------------------------- Triton


@triton.jit
def load_row_k(k_ptr, b, stride_k, width):
    """Device function: row b's k (int32 scalar) from a per-row [B] integer tensor, clamped to
    [1, width]: k < 1 keeps [CLS] alone, k > width is cut to the width. Clamped in k's own
    integer dtype (int64: no overflow)."""
    kb = tl.load(k_ptr + b * stride_k)
    return tl.minimum(tl.maximum(kb, 1), width).to(tl.int32)


@triton.jit
def ranking_keys(score, offs, n, BLOCK_N: tl.constexpr):
    """Device function: the int64 sort keys of a row's ``score`` ([BLOCK_N] fp32 at lanes
    ``offs`` = arange(BLOCK_N); lanes offs >= n are not in the row). Unique per lane; the larger
    key ranks first under the selection rule (spec §2).

    Top-k with indices, the packed-key way: each key holds the score and the (inverted) index, so
    one sort of the keys ranks by score with ties to the lower index, by construction.
    """
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
    key32 = tl.where(offs < n, key32, -2147483647 - 1)
    return (key32 << 32) | (BLOCK_N - 1 - offs).to(tl.int64)


@triton.jit
def top_k_lanes(score, offs, n, k, BLOCK_N: tl.constexpr):
    """Device function: [BLOCK_N] bool, true at the k lanes the selection keeps (1 <= k <= n):
    the k largest :func:`ranking_keys` of the row, in lane (index) order."""
    key = ranking_keys(score, offs, n, BLOCK_N)
    ranked = tl.sort(key, descending=True)
    # The k-th largest key is the threshold; exactly k lanes reach it (keys are unique).
    kth = tl.sum(tl.where(offs == k - 1, ranked, 0), axis=0)
    return key >= kth


@triton.jit
def select_row(score, offs, n, k, width, out_ptr, stride_on, FILL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Device function: store the top-k lanes of ``score`` ([BLOCK_N] fp32, lanes offs >= n
    ignored) ascending.

    Writes k int64 positions to out_ptr + slot * stride_on, slot = 0..k-1. A NaN score counts
    as -inf (the rule of every selection path). FILL (a per-row k, 1 <= k <= width <= n): also
    write 0 to the filler slots k..width-1 of the row (``width`` is unused otherwise).
    """
    keep = top_k_lanes(score, offs, n, k, BLOCK_N)
    # Instead of a second sort by index: a prefix count over the kept lanes, taken in index
    # order, is each kept position's slot in the ascending output.
    slot = tl.cumsum(keep.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + slot.to(tl.int64) * stride_on, offs.to(tl.int64), mask=keep)
    if FILL:
        # The row holds width slots (width <= n <= BLOCK_N: one masked store covers them).
        fill = (offs >= k) & (offs < width)
        tl.store(out_ptr + offs.to(tl.int64) * stride_on, tl.zeros([BLOCK_N], dtype=tl.int64), mask=fill)


@triton.jit
def _select_kernel(
    scores_ptr, mask_ptr, out_ptr, k_ptr, n, k,
    stride_sb, stride_sn, stride_mb, stride_mn, stride_ob, stride_on, stride_k,
    HAS_MASK: tl.constexpr, ROW_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # grid: (B,); one program selects one batch row, held whole in registers.
    # k: the slots of an output row. Without ROW_K every row keeps k (k_ptr, stride_k unused);
    # with ROW_K, k is the width W and row b keeps min(max(k_ptr[b], 1), W), the rest 0.
    b = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_N)
    in_row = offs < n
    score = tl.load(scores_ptr + b * stride_sb + offs.to(tl.int64) * stride_sn,
                    mask=in_row, other=float("-inf")).to(tl.float32)
    if HAS_MASK:
        real = tl.load(mask_ptr + b * stride_mb + offs.to(tl.int64) * stride_mn,
                       mask=in_row, other=0).to(tl.float32) != 0
        score = tl.where(real, score, float("-inf"))
    if ROW_K:
        select_row(score, offs, n, load_row_k(k_ptr, b, stride_k, k), k,
                    out_ptr + b * stride_ob, stride_on, True, BLOCK_N)
    else:
        select_row(score, offs, n, k, k, out_ptr + b * stride_ob, stride_on, False, BLOCK_N)


def launch_select(scores: torch.Tensor, k, mask: torch.Tensor | None = None,
                  width: int | None = None) -> torch.Tensor:
    """Launch the selection kernel, inputs unchecked.

    Args:
        scores: [B, n] float16/bfloat16/float32, n <= MAX_TRITON_N, any strides.
        k: an int, 1 <= k < n; or a [B] integer tensor on scores' device with ``width``.
        mask: optional [B, n] bool/int/float: positions with mask == 0 count as -inf.
        width: with a tensor k, the W <= n output slots.
    Returns:
        [B, k] (or [B, W]) int64 positions, as :func:`select`.
    """
    B, n = scores.shape
    row_k = width is not None
    slots = width if row_k else k
    out = L.new_output((B, slots), torch.int64, scores.device)
    block_n = L.next_power_of_2(n)
    m = L.mask_for_kernel(mask) if mask is not None else scores  # dummy pointer when no mask
    k_rows = k if row_k else out                                  # dummy pointer for an int k
    _select_kernel[(B,)](
        scores, m, out, k_rows, n, slots,
        *scores.stride(), *m.stride(), *out.stride(), k_rows.stride(0),
        HAS_MASK=mask is not None, ROW_K=row_k, BLOCK_N=block_n, num_warps=L.num_warps_for(block_n * 8),
    )
    return out


# ----------------------------------------------------------------------------- public


def select(scores: torch.Tensor, k, *, width: int | None = None, backend: str | None = None) -> torch.Tensor:
    """Positions to keep: top-k by score, [CLS] always kept, ties to the lower index, ascending.

    Args:
        scores: [B, n] float32 (float16/bfloat16 are upcast exactly), or float64 (torch path
            only: compared in float64). -inf marks padding, which then fills leftover slots
            lowest index first. A NaN score counts as -inf, whatever its sign bit: it is never
            preferred to a real token with a number, and ties with padding (lower index first).
        k: int >= 1; or a [B] int64/int32/int16/int8/uint8 tensor on the scores' device, one k
            per row (proportional retention, spec §8), read on device only (no host sync).
        width: required with a tensor k, forbidden with an int k: the output slots, int >= 1
            (the caller's promise: >= max k). W = min(width, n).
        backend: None (auto: Triton for CUDA tensors with n <= 512 and a float16/bfloat16/
            float32 dtype, else the torch path), "triton" (n <= 512, not float64) or "torch".
    Returns:
        int k: [B, k] int64 (``[B, n]`` = arange(n) per row when k >= n, without a launch).
        Tensor k: [B, W] int64, always selected per row (a row with k_i < n drops vectors
        even when W == n): row i's top-k_i' positions, k_i' = min(max(k_i, 1), W) ([CLS]
        always survives; k_i > W is cut to W), ascending in slots 0..k_i'-1, 0 in the rest.
        Equal to :func:`select_ref` exactly.
    """
    B, n = L.check_scores(scores)
    k, W = L.check_k_width(k, width, B, n, scores.device)
    resolved = L.resolve_backend(backend, scores.device, n, L.MAX_TRITON_N, ("scores", scores.dtype))
    if W is not None:
        if resolved == "triton":
            return launch_select(scores, k, width=W)
        return select_torch_rows(scores, k, W)[0]
    if k >= n:
        return keep_all(B, n, scores.device)
    if resolved == "triton":
        return launch_select(scores, k)
    return select_torch(scores, k)
