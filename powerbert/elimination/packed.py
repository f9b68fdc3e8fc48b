"""The packed (varlen) inference forward: real tokens only, no host synchronisation (powerbert/ALGORITHM.md §10).

Inference on CUDA in fp16/bf16 (and, forced with ``dispatch.use_packed(True)``, under the Triton
interpreter on CPU tensors, which is how CPU tests run this code path). The batch's real tokens are
packed into one ``[T, D]`` matrix at entry (``packed_plan``: rows and counts planned on the host);
every projection, the attention and the FFN then run on real tokens only, and survivors are packed
again after each layer. Nothing here reads a device value on the host.

One eliminating layer is **9 launches** (``LAUNCHES_PER_ELIMINATING_LAYER``), against 17 for the
padded GPU layer and about 13 for a stock BERT layer:

1. one QKV GEMM with the three projections stacked (a weight cached per layer, rebuilt when a
   parameter's storage or version changes, so quantisation or adapters applied later still count);
2. attention over each sequence, output and row log-sum-exp (FlashAttention-2 varlen through
   ``aten._flash_attention_forward`` where it serves, else the Triton varlen kernel);
3. the attention each key receives, per head, from that log-sum-exp (``kernels.lse_significance``);
4. the attention-output GEMM on *all* entering rows, the residual folded in (``addmm_`` in place:
   C = residual); it spends the rows that are eliminated next, +2% of a layer's FLOPs at the
   paper's configuration, and saves a gather of the residual;
5. one kernel: per sequence top-k ([CLS] kept, order kept, ties to the lower index), gather of
   the survivors, the output projection's bias, LayerNorm; it also writes each survivor with the
   FFN output's bias added, the residual of step 8, and each survivor's input position;
6. FFN-in GEMM (bias in the GEMM's epilogue); 7. the activation;
8. FFN-out GEMM in place on (survivors + bias); 9. LayerNorm.

A layer that eliminates nothing skips step 3 and selection (8 launches).
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from powerbert.elimination import dispatch
from powerbert.elimination.families import LayerParts
from powerbert.elimination.packed_plan import LayerShapes, PackedPlan

LAUNCHES_PER_ELIMINATING_LAYER = 9
LAUNCHES_PER_KEEPING_LAYER = 8


# Bumped whenever any module anywhere registers a submodule or a parameter (``setattr`` of a
# Module or a Parameter: quantize_dynamic, adapters, ``load_state_dict(assign=True)``, a swapped
# Linear). What a model's layers are, and which Parameter objects they hold, cannot change without
# it, so the per-forward caches below check one integer instead of walking every layer's modules
# (``Family.layers`` of BERT-base costs ~0.27 ms of Python a call on this CPU, a GPU forward's
# budget at batch 1).
_tree_version = 0


def _module_tree_changed(module, name, value):
    global _tree_version
    _tree_version += 1


torch.nn.modules.module.register_module_module_registration_hook(_module_tree_changed)
torch.nn.modules.module.register_module_parameter_registration_hook(_module_tree_changed)

# Per encoder: ((tree version, dtype, device), its layers if the packed forward serves them, else None).
_LAYERS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def packed_layers_of(family, encoder: nn.Module, dtype: torch.dtype, device: torch.device) -> list[LayerParts] | None:
    """``family.layers(encoder)`` when every layer fits the packed forward (:func:`layers_fit`)
    in ``dtype``, else None; cached per encoder while no module or parameter was registered
    anywhere since (and dtype and device are the same)."""
    key = (_tree_version, dtype, device)
    cached = _LAYERS.get(encoder)
    if cached is not None and cached[0] == key:
        return cached[1]
    layers = family.layers(encoder)
    served = layers if layers_fit(layers, dtype) else None
    _LAYERS[encoder] = (key, served)
    return served


def tree_version() -> int:
    """The registration counter above: equal values, the same modules and Parameter objects."""
    return _tree_version


def layers_fit(layers: list[LayerParts], dtype: torch.dtype) -> bool:
    """True when every layer has the modules the packed forward runs: plain ``nn.Linear``
    projections with biases in ``dtype`` (not quantised or replaced), ``nn.LayerNorm`` norms, and
    a head dimension the attention kernels take."""
    for parts in layers:
        linears = (parts.query, parts.key, parts.value, parts.attn_out, parts.ffn_in, parts.ffn_out)
        if any(type(m) is not nn.Linear or m.bias is None or m.weight.dtype != dtype for m in linears):
            return False
        if any(type(m) is not nn.LayerNorm or m.weight is None or m.bias is None
               for m in (parts.attn_norm, parts.ffn_norm)):
            return False
        width = parts.query.out_features
        if width % parts.num_heads or not dispatch.head_dim_served(width // parts.num_heads):
            return False
    return True


# Per query Linear: (the six parameters' (data_ptr, _version), stacked weight [3 D, D], bias [3 D]).
_QKV_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fused_qkv(parts: LayerParts) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's query, key and value projections stacked: ``(weight [3 D, D], bias [3 D])``.

    Cached per layer (weakly, by its query module) and refreshed when any of the six parameters
    changed storage (``data_ptr``: ``.to()``, a new Parameter) or was written in place
    (``_version``: an optimiser step, ``load_state_dict``), so the fused GEMM always runs the
    weights the three Linears hold. A refresh writes into the cached tensors when their shape,
    dtype and device still fit: a CUDA graph that captured them stays valid.
    """
    cached = _QKV_CACHE.get(parts.query)
    if cached is not None and cached[0] == _tree_version:
        params = cached[1]  # the same Parameter objects: no module attribute lookups
    else:
        params = (parts.query.weight, parts.key.weight, parts.value.weight,
                  parts.query.bias, parts.key.bias, parts.value.bias)
    # Inference tensors (parameters made under inference_mode) keep no version counter.
    stamp = tuple((p.data_ptr(), 0 if p.is_inference() else p._version) for p in params)
    if cached is not None and cached[1] is params and cached[2] == stamp:
        return cached[3], cached[4]
    # Normal tensors even when built under inference_mode: a later refresh outside it writes into them.
    with torch.no_grad(), torch.inference_mode(False):
        weight = torch.cat(params[:3])
        bias = torch.cat(params[3:])
        if cached is not None and _same_layout(cached[3], weight) and _same_layout(cached[4], bias):
            weight, bias = cached[3].copy_(weight), cached[4].copy_(bias)
    _QKV_CACHE[parts.query] = (_tree_version, params, stamp, weight, bias)
    return weight, bias


def cached_qkv(parts: LayerParts) -> tuple[torch.Tensor, torch.Tensor]:
    """The stacked ``(weight, bias)`` as last built by :func:`fused_qkv`, parameters unchecked:
    what a captured CUDA graph reads (``packed_graphs`` emulates replays with it)."""
    *_, weight, bias = _QKV_CACHE[parts.query]
    return weight, bias


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def packed_layer(parts: LayerParts, x: torch.Tensor, shapes: LayerShapes,
                 positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One encoder layer on packed rows.

    Args:
        parts: the layer's modules (``layers_fit``). x: ``[T_in, D]`` packed rows entering the
            layer; **overwritten** (the attention-output GEMM accumulates into it), so it must be
            a buffer of the forward's own. Rows past ``cu_in[B]`` are never read for a sequence.
        shapes: the layer's offsets and sizes. positions: ``[T_in]`` int64 input position of each row.

    Returns:
        ``(x_out [rows_out, D], positions_out [rows_out] int64)`` in x's dtype; rows past
        ``cu_out[B]`` hold no sequence.
    """
    rows_in, width = x.shape
    heads = parts.num_heads
    head_dim = width // heads

    weight, bias = fused_qkv(parts)
    qkv = torch.addmm(bias, x, weight.t()).view(rows_in, 3, heads, head_dim)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    context, lse = dispatch.varlen_attention(q, k, v, shapes.cu_in, shapes.max_in)
    partials = dispatch.lse_significance(q, k, lse, shapes.cu_in, shapes.max_in) if shapes.eliminates else None
    # C = residual: the output projection accumulates into the entering rows (its bias is added
    # by the gather kernel, on the survivors only).
    attended = x.addmm_(context.view(rows_in, width), parts.attn_out.weight.t())
    survivors, ffn_residual, positions = dispatch.select_gather_norm(
        attended, partials, shapes.cu_in, shapes.cu_out, max_len_in=shapes.max_in, max_keep=shapes.max_out,
        out_rows=shapes.rows_out, norm=parts.attn_norm, pre_bias=parts.attn_out.bias,
        residual_bias=parts.ffn_out.bias, positions=positions, select=shapes.eliminates)
    inner = parts.ffn_act(torch.addmm(parts.ffn_in.bias, survivors, parts.ffn_in.weight.t()))
    out = ffn_residual.addmm_(inner, parts.ffn_out.weight.t())
    norm = parts.ffn_norm
    return F.layer_norm(out, norm.normalized_shape, norm.weight, norm.bias, norm.eps), positions


def packed_layers(layers: list[LayerParts], x: torch.Tensor, positions: torch.Tensor,
                  shapes: list[LayerShapes]) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer on packed rows: ``x [T_0, D]`` (overwritten) and ``positions [T_0]`` in,
    the last layer's ``(x [rows_out, D], positions [rows_out])`` out. What a CUDA graph captures."""
    for parts, layer_shapes in zip(layers, shapes):
        x, positions = packed_layer(parts, x, layer_shapes, positions)
    return x, positions


def packed_encoder(layers: list[LayerParts], hidden: torch.Tensor, plan: PackedPlan
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every layer on packed rows, entry packing and exit unpacking included.

    Args:
        layers: the family's layers (``layers_fit``). hidden: ``[B, N, D]`` vectors entering the
            first layer (the embeddings; padded slots are never read). plan: from
            ``packed_plan.plan_packed`` for this batch's mask and the model's retention.

    Returns:
        ``(hidden [B, W, D], kept_mask [B, W] bool, kept_positions [B, W] int64)``: each
        sequence's survivors of the last layer in input order in slots ``0..k - 1``, zeros in
        the other slots (``W``: the most survivors of any sequence).
    """
    x = pack_entry(hidden, plan)
    x, positions = packed_layers(layers, x, plan.device_arrays["entry_positions"][:plan.rows[0]], plan.layer_shapes())
    return unpack_exit(x, positions, plan)


def pack_entry(hidden: torch.Tensor, plan: PackedPlan, out: torch.Tensor | None = None) -> torch.Tensor:
    """The real tokens of ``hidden [B, N, D]`` packed in order into ``[T_0, D]``: a new tensor of
    the forward's own (the layers accumulate into their input; without padding it is a copy all
    the same, since someone, a hook, may hold the embeddings), or written into ``out [T_0, D]``
    (a graph's static input)."""
    batch, width, dim = hidden.shape
    flat = hidden.reshape(batch * width, dim)
    if plan.entry_is_identity:
        return flat.clone() if out is None else out.copy_(flat)
    return torch.index_select(flat, 0, plan.device_arrays["entry_rows"], out=out)


def unpack_exit(x: torch.Tensor, positions: torch.Tensor, plan: PackedPlan, *, fresh: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The last layer's packed rows ``x [>= T_L, D]`` and ``positions`` in the padded output
    layout ``[B, W, D]``, ``kept_mask [B, W]``, ``kept_positions [B, W]``; zeros in empty slots.
    ``fresh``: never a view of ``x`` (a graph's output buffer is overwritten by the next replay)."""
    batch, dim = plan.batch, x.shape[1]
    arrays = plan.device_arrays
    out_width = plan.out_width
    mask = arrays["kept_mask"].clone()  # the plan (cached) keeps its own
    total = plan.rows[-1]
    if plan.exit_is_identity:
        out, kept_positions = x[:total], positions[:total]
        if fresh:
            out, kept_positions = out.clone(), kept_positions.clone()
        return out.view(batch, out_width, dim), mask, kept_positions.view(batch, out_width)
    exit_rows = arrays["exit_rows"]
    out = x.new_zeros(batch * out_width, dim).index_copy_(0, exit_rows, x[:total])
    kept_positions = positions.new_zeros(batch * out_width).index_copy_(0, exit_rows, positions[:total])
    return out.view(batch, out_width, dim), mask, kept_positions.view(batch, out_width)

