"""Segmented top-k selection fused with gather + bias + LayerNorm, on packed (varlen) rows (spec §2, §8).

The packed GPU layer holds its sequences back to back: sequence b is input rows
cu_in[b]..cu_in[b+1]-1 (n_b of them, possibly 0) and its survivors go to output rows
cu_out[b]..cu_out[b+1]-1 (k_b of them). After attention the layer has the per-head column sums
``partials [H, T_in]`` (the significance of each key, spec §1) and the attention-output GEMM
applied to every input row with the residual folded in (``x = residual + context @ W_o^T``, no
bias yet). One launch then, per sequence, selects the k_b survivors by the rule of
kernels.select (spec §2: [CLS] forced, NaN as -inf, ties to the lower index, ascending) and
writes, for each survivor j_r,

    y[cu_out[b] + r]      = LayerNorm(x[cu_in[b] + j_r] + pre_bias) * weight + bias
    y_plus[cu_out[b] + r] = y (fp32, before its cast) + residual_bias
    source[cu_out[b] + r] = cu_in[b] + j_r

``y_plus`` is the FFN-output GEMM's residual with that GEMM's bias already added, so the next
GEMM needs no separate bias add. ``select=False`` is the same kernel without the selection
(survivor r is j = r): the gather + LayerNorm of a layer that keeps everything.

Top to bottom: the eager reference, the vectorised torch path, the Triton kernel, the
launcher (:func:`launch_select_gather_norm`), the public function, the ahead-of-time compile
calls (:func:`aot_calls`).
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels import launch as L
from kernels.select import select_ref, select_torch_rows, top_k_lanes

# Output rows one program writes (it recomputes its sequence's selection once for all of them).
MAX_ROWS = 16
# fp32 values of the [TILE, BLOCK_D] tile the rows are normalised in: TILE rows' loads in flight
# at once, and a few such tiles fit in registers without spilling.
TILE_ELEMS = 4096


# ----------------------------------------------------------------------------- reference


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for fp16/bf16/fp32 rows, fp64 for fp64 rows (torch path and reference only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _summed_scores(partials: torch.Tensor, cols) -> torch.Tensor:
    """score[j] = sum over h = 0..H-1 of partials[h, cols[j]], added in that order in fp32: the
    order the kernel adds them in, so that both rank the very same fp32 values."""
    s = partials[0, cols].float()
    for h in range(1, partials.shape[0]):
        s = s + partials[h, cols]
    return s


def select_gather_norm_ref(x, partials, cu_in, cu_out, *, max_len_in, max_keep, out_rows, weight, bias, eps,
                           pre_bias=None, residual_bias=None, select=True, positions=None):
    """Eager reference of :func:`select_gather_norm` (same arguments, without ``backend``):
    a loop over the sequences, reading cu_in / cu_out on the host.

    Per sequence: the summed scores through kernels.select.select_ref (select=True) or
    j_r = r (select=False), a torch gather, ``F.layer_norm`` in fp32 (fp64 for fp64 x).
    ``max_len_in`` and ``max_keep`` size nothing here. Output rows the kernel leaves unwritten
    (past cu_out[B]) hold NaN in y / y_plus and -1 in source.
    """
    D = x.shape[1]
    ct = _compute_dtype(x.dtype)
    y = torch.full((out_rows, D), float("nan"), dtype=x.dtype, device=x.device)
    y_plus = None if residual_bias is None else y.clone()
    source = torch.full((out_rows,), -1, dtype=torch.int64, device=x.device)
    starts, outs = cu_in.tolist(), cu_out.tolist()
    for b in range(len(starts) - 1):
        start, n, o, k = starts[b], starts[b + 1] - starts[b], outs[b], outs[b + 1] - outs[b]
        if k == 0:
            continue
        if select:
            cols = torch.arange(start, start + n, device=x.device)
            keep = select_ref(_summed_scores(partials, cols)[None], k)[0]
        else:
            keep = torch.arange(k, device=x.device)
        src = start + keep
        v = x[src].to(ct)
        if pre_bias is not None:
            v = v + pre_bias.to(ct)
        out = F.layer_norm(v, (D,), weight.to(ct), bias.to(ct), eps)
        y[o:o + k] = out.to(x.dtype)
        if y_plus is not None:
            y_plus[o:o + k] = (out + residual_bias.to(ct)).to(x.dtype)
        source[o:o + k] = src if positions is None else positions[src]
    return y, y_plus, source


# ----------------------------------------------------------------------------- torch path


def select_gather_norm_torch(x, partials, cu_in, cu_out, max_len_in, max_keep, out_rows, weight, bias, eps,
                             pre_bias, residual_bias, select, positions=None):
    """Vectorised torch path of :func:`select_gather_norm`, inputs unchecked, no host sync.

    Every sequence gets W = min(max_keep, max_len_in) slots (max_keep without selection): its
    summed scores padded to max_len_in with -inf go through kernels.select.select_torch_rows with
    its own k_b; the slots r < k_b are normalised and scattered to rows cu_out[b] + r, the others
    to a dump row past the output.
    """
    B, (T_in, D) = cu_in.shape[0] - 1, x.shape
    W = min(max_keep, max_len_in) if select else max_keep
    y = L.new_output((out_rows + 1, D), x.dtype, x.device)
    y_plus = None if residual_bias is None else L.new_output((out_rows + 1, D), x.dtype, x.device)
    source = L.new_output((out_rows + 1,), torch.int64, x.device)
    if B == 0 or W == 0 or T_in == 0:
        return y[:out_rows], None if y_plus is None else y_plus[:out_rows], source[:out_rows]
    start, n = cu_in[:-1].long(), cu_in[1:].long() - cu_in[:-1].long()
    o, k = cu_out[:-1].long(), cu_out[1:].long() - cu_out[:-1].long()
    k = torch.minimum(k, n)  # as the kernel: a sequence never yields more survivors than it has rows
    r = torch.arange(W, device=x.device)
    if select:
        j = torch.arange(max_len_in, device=x.device)
        real = j < n[:, None]
        cols = torch.where(real, start[:, None] + j, 0).clamp_(max=T_in - 1)
        scores = torch.where(real, _summed_scores(partials, cols), float("-inf"))
        keep, _ = select_torch_rows(scores, k, W)  # k_b clamped to [1, W]; slots r >= k_b are dropped below
    else:
        keep = r.expand(B, W)
    live = r < k[:, None]
    src = torch.where(live, start[:, None] + keep, 0).clamp_(max=T_in - 1).reshape(-1)
    dst = torch.where(live & (o[:, None] + r < out_rows), o[:, None] + r, out_rows).reshape(-1)
    ct = _compute_dtype(x.dtype)
    v = x.index_select(0, src).to(ct)
    if pre_bias is not None:
        v = v + pre_bias.to(ct)
    out = F.layer_norm(v, (D,), weight.to(ct), bias.to(ct), eps)
    y.index_copy_(0, dst, out.to(x.dtype))  # dead slots all land on the dump row out_rows
    if y_plus is not None:
        y_plus.index_copy_(0, dst, (out + residual_bias.to(ct)).to(x.dtype))
    source.index_copy_(0, dst, src if positions is None else positions.index_select(0, src))
    return y[:out_rows], None if y_plus is None else y_plus[:out_rows], source[:out_rows]


# ----------------------------------------------------------------------------- Triton


@triton.jit
def _select_gather_norm_kernel(
    x_ptr, p_ptr, cu_in_ptr, cu_out_ptr, w_ptr, b_ptr, pre_ptr, res_ptr, pos_ptr, y_ptr, yp_ptr, src_ptr,
    H, D, out_rows, eps,
    stride_xt, stride_ph, stride_pt, stride_w, stride_b, stride_pre, stride_res, stride_pos, stride_yt,
    SELECT: tl.constexpr, HAS_PRE: tl.constexpr, HAS_RES: tl.constexpr, HAS_POS: tl.constexpr,
    ROWS: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # grid: (B, cdiv(max_keep, ROWS)); program (b, t) writes survivors r in [t*ROWS, (t+1)*ROWS)
    # of sequence b. Each program recomputes its sequence's whole selection: H loads of
    # [BLOCK_N] fp32 and one sort of BLOCK_N keys, cheap next to its ROWS rows of D values, and
    # it saves the launch (and the [B, max_keep] index round trip) of a separate top-k kernel.
    b = tl.program_id(0)
    r0 = tl.program_id(1) * ROWS
    start = tl.load(cu_in_ptr + b)
    n = tl.load(cu_in_ptr + b + 1) - start
    out_start = tl.load(cu_out_ptr + b)
    k = tl.load(cu_out_ptr + b + 1) - out_start
    # The precondition is k <= n and cu_out[B] <= out_rows; clamping to both costs nothing and
    # keeps a broken cu array from reading or writing out of bounds.
    r_end = tl.minimum(tl.minimum(r0 + ROWS, tl.minimum(k, n)), out_rows - out_start)
    if r0 >= r_end:
        return
    if SELECT:
        offs = tl.arange(0, BLOCK_N)
        in_row = offs < n
        # score[j] = sum_h partials[h, start + j], added h = 0..H-1 in order, in fp32 (the
        # reference adds in the same order, so both rank bit-identical values).
        p_ptrs = p_ptr + (start.to(tl.int64) + offs.to(tl.int64)) * stride_pt
        score = tl.zeros([BLOCK_N], dtype=tl.float32)
        for _h in range(H):
            score += tl.load(p_ptrs, mask=in_row, other=0.0).to(tl.float32)
            p_ptrs += stride_ph
        # The selection rule of kernels.select (its packed keys; NaN as -inf, [CLS] kept). The
        # kept mask stays in registers: select_row would store the indices instead.
        keep = top_k_lanes(score, offs, n, k, BLOCK_N)
        # Instead of a second sort by index: the inclusive prefix count of kept lanes, in index
        # order. Survivor r (0-based) is the kept lane whose count is r + 1, i.e. its index is
        # the number of lanes whose count is still <= r (the count is non-decreasing).
        count = tl.cumsum(keep.to(tl.int32), axis=0)
    offs_d = tl.arange(0, BLOCK_D)
    d_in = offs_d < D
    w = tl.load(w_ptr + offs_d * stride_w, mask=d_in, other=0.0).to(tl.float32)[None, :]
    bb = tl.load(b_ptr + offs_d * stride_b, mask=d_in, other=0.0).to(tl.float32)[None, :]
    if HAS_PRE:
        pre = tl.load(pre_ptr + offs_d * stride_pre, mask=d_in, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        res = tl.load(res_ptr + offs_d * stride_res, mask=d_in, other=0.0).to(tl.float32)[None, :]
    # The rows go TILE at a time as a [TILE, BLOCK_D] tile: TILE row loads in flight at once.
    for t0 in range(r0, r_end, TILE):
        r = t0 + tl.arange(0, TILE)
        r_ok = r < r_end
        if SELECT:
            j = tl.sum((count[None, :] <= r[:, None]).to(tl.int32), axis=1)  # [TILE, BLOCK_N] -> [TILE]
        else:
            j = r
        src = start.to(tl.int64) + j.to(tl.int64)  # int64: row * stride can exceed 2^31
        io = r_ok[:, None] & d_in[None, :]
        v = tl.load(x_ptr + src[:, None] * stride_xt + offs_d[None, :], mask=io, other=0.0).to(tl.float32)
        if HAS_PRE:
            v += pre
        mean = tl.sum(v, axis=1) / D
        diff = tl.where(io, v - mean[:, None], 0.0)
        var = tl.sum(diff * diff, axis=1) / D
        out = diff * (1.0 / tl.sqrt(var + eps))[:, None] * w + bb  # fp32; one cast per store
        dst = out_start.to(tl.int64) + r.to(tl.int64)
        tl.store(y_ptr + dst[:, None] * stride_yt + offs_d[None, :], out.to(y_ptr.dtype.element_ty), mask=io)
        if HAS_RES:
            tl.store(yp_ptr + dst[:, None] * stride_yt + offs_d[None, :], (out + res).to(yp_ptr.dtype.element_ty),
                     mask=io)
        if HAS_POS:  # carry each row's input position along: no gather of its own per layer
            tl.store(src_ptr + dst, tl.load(pos_ptr + src * stride_pos, mask=r_ok, other=0), mask=r_ok)
        else:
            tl.store(src_ptr + dst, src, mask=r_ok)


def _block_sizes(max_len_in: int, max_keep: int, D: int, select: bool) -> tuple[int, int, int, int, int]:
    """(ROWS, TILE, BLOCK_N, BLOCK_D, num_warps). ROWS: up to MAX_ROWS survivors per program
    (fewer when no sequence keeps that many), normalised TILE rows at a time, TILE * BLOCK_D
    <= TILE_ELEMS; BLOCK_N: the selection block (1 without selection); warps by the larger of
    the row tile and the [BLOCK_N] int64 keys."""
    rows = min(MAX_ROWS, L.next_power_of_2(max_keep))
    block_d = L.next_power_of_2(D)
    tile = max(1, min(rows, TILE_ELEMS // block_d))
    block_n = L.next_power_of_2(max_len_in) if select else 1
    return rows, tile, block_n, block_d, L.num_warps_for(max(tile * block_d, 8 * block_n))


def launch_select_gather_norm(x, partials, cu_in, cu_out, max_len_in, max_keep, out_rows, weight, bias, eps,
                              pre_bias, residual_bias, select, positions=None):
    """Launch the fused kernel, inputs unchecked (arguments as :func:`select_gather_norm`;
    partials may be None when select is False). One launch, or none when nothing can survive."""
    B, (T_in, D) = cu_in.shape[0] - 1, x.shape
    y = L.new_output((out_rows, D), x.dtype, x.device)
    y_plus = None if residual_bias is None else L.new_output((out_rows, D), x.dtype, x.device)
    source = L.new_output((out_rows,), torch.int64, x.device)
    if B == 0 or max_keep == 0 or out_rows == 0 or T_in == 0:
        return y, y_plus, source
    rows, tile, block_n, block_d, num_warps = _block_sizes(max_len_in, max_keep, D, select)
    p = partials if select else weight                 # dummy pointers for absent inputs
    pre = pre_bias if pre_bias is not None else weight
    res = residual_bias if residual_bias is not None else weight
    yp = y_plus if y_plus is not None else y
    pos = positions if positions is not None else source
    _select_gather_norm_kernel[(B, triton.cdiv(max_keep, rows))](
        x, p, cu_in, cu_out, weight, bias, pre, res, pos, y, yp, source,
        partials.shape[0] if select else 1, D, out_rows, float(eps),
        x.stride(0), *(partials.stride() if select else (0, 0)), weight.stride(0), bias.stride(0),
        pre.stride(0), res.stride(0), pos.stride(0), y.stride(0),
        SELECT=select, HAS_PRE=pre_bias is not None, HAS_RES=residual_bias is not None, HAS_POS=positions is not None,
        ROWS=rows, TILE=tile, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, y_plus, source


# ----------------------------------------------------------------------------- public


def _check_size(value, name: str) -> int:
    """A host size: a Python int >= 0 (a tensor would have to be read on the host)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be a Python int >= 0 (a host value, never a tensor), got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be a Python int >= 0, got {int(value)}")
    return int(value)


def _check_vector(v, name: str, D: int, device) -> None:
    L.check_tensor(v, name)
    if tuple(v.shape) != (D,):
        raise ValueError(f"{name} must have shape [D] = [{D}] (x's last dim), got {list(v.shape)}")
    L.check_dtype(v, name, L.TORCH_DTYPES)
    if v.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {v.device}")


def _check_cu(cu, name: str, device) -> int:
    L.check_tensor(cu, name)
    if cu.dim() != 1 or cu.shape[0] < 1:
        raise ValueError(f"{name} must be 1-D [B + 1] (sequence offsets starting with 0), got shape {list(cu.shape)}")
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {L.dtype_name(cu.dtype)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on x's device {device}, got {cu.device}")
    return cu.shape[0] - 1


def select_gather_norm(x, partials, cu_in, cu_out, *, max_len_in, max_keep, out_rows, weight, bias, eps,
                       pre_bias=None, residual_bias=None, select=True, positions=None, backend=None):
    """Per packed sequence: select the survivors, gather them, add a bias and LayerNorm them.

    Args:
        x: [T_in, D] float16/bfloat16/float32 (float64: torch path only) packed rows, any row
            stride, last-dim stride 1: the attention output with its residual, before its bias.
        partials: [H, T_in] float32, any strides: per-head column sums (significance per key);
            None allowed (and ignored) when select is False.
        cu_in: [B + 1] int32 on x's device: sequence b is input rows cu_in[b]..cu_in[b+1]-1,
            n_b = cu_in[b+1] - cu_in[b] >= 0.
        cu_out: [B + 1] int32 on x's device: sequence b's survivors go to output rows
            cu_out[b]..cu_out[b+1]-1, k_b = cu_out[b+1] - cu_out[b]. Precondition (not checked:
            reading device values on the host would break CUDA-graph capture): k_b <= n_b, and
            k_b >= 1 when n_b >= 1. A sequence never writes more than n_b rows, nor rows at or
            past out_rows.
        max_len_in: Python int >= every n_b: sizes the selection block (<= 512 for Triton).
        max_keep: Python int >= every k_b: sizes the grid.
        out_rows: Python int >= cu_out[B]: the outputs' row count. Rows at or past cu_out[B]
            are not written (uninitialised; NaN / -1 when kernels.launch.poison_outputs()).
        weight, bias: [D] LayerNorm affine (float16/bfloat16/float32/float64), any stride.
        eps: LayerNorm epsilon, a real >= 0.
        pre_bias: [D] or None: added to x before the norm (the attention-output projection's bias).
        residual_bias: [D] or None: added to y to make y_plus (the FFN-output projection's bias).
        select: True: sequence b keeps the k_b positions j with the highest
            score[j] = sum_{h=0..H-1} partials[h, cu_in[b]+j] (added in that order in fp32),
            [CLS] (j = 0) always, NaN as -inf, ties to the lower j, survivors in ascending j
            (kernels.select.select_ref's rule). False: survivor r is j = r (cu_out then
            describes the same lengths as cu_in).
        backend: None (auto: Triton for CUDA tensors with max_len_in <= 512 and a
            float16/bfloat16/float32 x, else the torch path), "triton" or "torch".
    Returns:
        (y, y_plus, source):
        y: [out_rows, D] x.dtype, y[cu_out[b]+r] = LayerNorm(x[cu_in[b]+j_r] + pre_bias) * weight
            + bias, computed in fp32 (fp64 for fp64 x) and cast once;
        y_plus: [out_rows, D] x.dtype, (that unrounded y + residual_bias) cast once; None when
            residual_bias is None;
        source: [out_rows] int64, the global input row cu_in[b]+j_r of each survivor, or with
            ``positions`` ([T_in] int64, any stride) that row's entry, positions[cu_in[b]+j_r]
            (the packed forward carries input positions through its layers this way).
        No host synchronisation on either path (CUDA-graph safe).
    """
    L.check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [T_in, D], got shape {tuple(x.shape)}")
    T_in, D = x.shape
    if D < 1:
        raise ValueError(f"x must have D >= 1 columns, got shape {tuple(x.shape)}")
    L.check_dtype(x, "x", L.HIDDEN_DTYPES)
    if x.stride(1) != 1 and D > 1:
        raise ValueError(f"x must have unit stride in its last dim (any row stride), got strides {x.stride()}")
    if not isinstance(select, bool):
        raise TypeError(f"select must be a bool, got {type(select).__name__}")
    if select:
        if partials is None:
            raise ValueError("partials is required when select=True: pass the [H, T_in] float32 column sums")
        L.check_tensor(partials, "partials")
        if partials.dim() != 2 or partials.shape[0] < 1 or partials.shape[1] != T_in:
            raise ValueError(f"partials must be [H, T_in] = [H >= 1, {T_in}] (T_in = x's rows), "
                             f"got shape {list(partials.shape)}")
        if partials.dtype != torch.float32:
            raise TypeError(f"partials must be float32, got {L.dtype_name(partials.dtype)}")
        if partials.device != x.device:
            raise ValueError(f"partials must be on x's device {x.device}, got {partials.device}")
    B = _check_cu(cu_in, "cu_in", x.device)
    if _check_cu(cu_out, "cu_out", x.device) != B:
        raise ValueError(f"cu_out must have the B + 1 = {B + 1} entries of cu_in, got {cu_out.shape[0]}")
    max_len_in = _check_size(max_len_in, "max_len_in")
    max_keep = _check_size(max_keep, "max_keep")
    out_rows = _check_size(out_rows, "out_rows")
    for name, v in (("weight", weight), ("bias", bias), ("pre_bias", pre_bias), ("residual_bias", residual_bias)):
        if v is not None or name in ("weight", "bias"):
            _check_vector(v, name, D, x.device)
    if positions is not None:
        L.check_tensor(positions, "positions")
        if positions.dim() != 1 or positions.shape[0] != T_in or positions.dtype != torch.int64:
            raise ValueError(f"positions must be [T_in] = [{T_in}] int64, got {list(positions.shape)} "
                             f"{L.dtype_name(positions.dtype)}")
        if positions.device != x.device:
            raise ValueError(f"positions must be on x's device {x.device}, got {positions.device}")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not eps >= 0:
        raise ValueError(f"eps must be a real number >= 0, got {eps!r}")
    if backend == "triton" and select and max_len_in > L.MAX_TRITON_N:
        raise ValueError(f"backend='triton' needs max_len_in in [0, {L.MAX_TRITON_N}] (the selection block), "
                         f"got max_len_in = {max_len_in}")
    n = max_len_in if select else None
    resolved = L.resolve_backend(backend, x.device, n, L.MAX_TRITON_N, ("x", x.dtype))
    run = launch_select_gather_norm if resolved == "triton" else select_gather_norm_torch
    return run(x, partials, cu_in, cu_out, max_len_in, max_keep, out_rows, weight, bias, float(eps),
               pre_bias, residual_bias, select, positions)


# ----------------------------------------------------------------------------- ahead-of-time


def aot_calls(cap: int):
    """``(module, name, call)`` per variant for kernels.aot: the unchecked launcher on BERT-base
    shapes (8 sequences of 128 rows, H 12, D 768, 77 survivors each), fp32/fp16/bf16 x, with
    selection (``select_gather_norm[<dtype>]``) and without (``gather_norm[<dtype>]``), both
    with the two biases. ``cap`` is unused: no launch choice depends on the device."""
    B, H, N, D, K = 8, 12, 128, 768, 77
    cu_in = torch.empty(B + 1, dtype=torch.int32)
    cu_out = torch.empty(B + 1, dtype=torch.int32)
    partials = torch.empty(H, B * N, dtype=torch.float32)
    positions = torch.empty(B * N, dtype=torch.int64)
    calls = []
    for dtype in L.AOT_DTYPES:
        name = L.dtype_name(dtype)
        x = torch.empty(B * N, D, dtype=dtype)
        w, b, pre, res = (torch.empty(D, dtype=dtype) for _ in range(4))
        for select in (True, False):
            calls.append((
                "kernels.select_gather_norm", f"{'select_' if select else ''}gather_norm[{name}]",
                lambda x=x, w=w, b=b, pre=pre, res=res, s=select: launch_select_gather_norm(
                    x, partials, cu_in, cu_out if s else cu_in, N, K if s else N, B * (K if s else N),
                    w, b, 1e-12, pre, res, s, positions),
            ))
    return calls
