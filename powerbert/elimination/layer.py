"""The eliminating encoder layer forward, shared by every family (see ``families.py``).

Per layer (powerbert/ALGORITHM.md §2): self-attention on the n vectors that entered, significance of
every position from this layer's own attention probabilities, keep the top-k (CLS always,
original order), then the FFN on the k survivors only.

One reordering that changes no value: the attention output projection, its residual and
LayerNorm act row by row, so they are applied *after* selection, to the k surviving rows
only (their probability rows times V, plus the gathered residual). This saves the (n - k)
rows of P·V and of the output projection that elimination would discard anyway.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from powerbert.elimination import dispatch
from powerbert.elimination.families import LayerParts


def split_heads(linear: torch.nn.Linear, x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Project ``x [B, n, D]`` and split heads: ``[B, H, n, d]`` (a strided view)."""
    y = linear(x)
    batch, length, width = y.shape
    return y.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


# A layer module may hold one Linear of its query, key and value projections stacked ([3 D, D]),
# under this attribute (``deployment.fuse_qkv`` gives one to the copy it exports): the layer then
# runs one GEMM instead of three, and ONNX Runtime's int8 quantises its input once, not thrice.
FUSED_QKV = "powerbert_fused_qkv"


def project_qkv(parts: LayerParts, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x [B, n, D]`` -> ``(q, k, v)``, each ``[B, H, n, d]`` (strided views), through the fused
    projection where the layer module holds one (``FUSED_QKV``), else the three Linears."""
    fused = None if parts.module is None else getattr(parts.module, FUSED_QKV, None)
    if fused is None:
        return tuple(split_heads(linear, x, parts.num_heads) for linear in (parts.query, parts.key, parts.value))
    y = fused(x)
    batch, length, width = y.shape
    heads = y.view(batch, length, 3, parts.num_heads, width // (3 * parts.num_heads)).permute(2, 0, 3, 1, 4)
    return heads[0], heads[1], heads[2]


def merge_heads(context: torch.Tensor) -> torch.Tensor:
    """``[B, H, n, d]`` -> ``[B, n, H * d]``: a view when the heads are laid out as ``[B, n, H, d]``
    in memory (the context of ``kernels.attention_with_significance``), a copy otherwise."""
    batch, heads, length, dim = context.shape
    return context.transpose(1, 2).reshape(batch, length, heads * dim)


def attention_output(parts: LayerParts, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``context [B, H, m, d]``, ``residual [B, m, D]`` -> attention sub-layer output ``[B, m, D]``."""
    return parts.attn_norm(parts.attn_dropout(parts.attn_out(merge_heads(context))) + residual)


def feed_forward(parts: LayerParts, x: torch.Tensor) -> torch.Tensor:
    return parts.ffn_norm(parts.ffn_dropout(parts.ffn_out(parts.ffn_act(parts.ffn_in(x)))) + x)


def _sdpa(parts: LayerParts, q, k, v, mask: torch.Tensor | None, bias: torch.Tensor | None = None) -> torch.Tensor:
    if bias is None:
        attn_mask = None if mask is None else mask[:, None, None, :]
    else:
        attn_mask = bias_with_padding(bias.to(q.dtype), mask)
    dropout = parts.probs_dropout.p if parts.probs_dropout.training else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)


def bias_with_padding(bias: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """An additive logits bias ``[B | 1, H, n_q, n_k]`` with padded keys (``mask [B, n_k]`` False)
    set to the dtype's minimum, as the stock eager attention adds its mask; a new tensor."""
    if mask is None:
        return bias
    return bias.masked_fill(~mask[:, None, None, :], torch.finfo(bias.dtype).min)


SELECTIONS = ("attention", "first", "random")


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, *,
                    out: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention probabilities, before dropout (significance is computed from these).

    Args:
        q, k: ``[B, H, n, d]`` (strided views are fine). mask: ``[B, n]`` bool or None (no padding).
        out: a contiguous buffer of at least ``B * H * n * n`` elements of q's dtype to compute
            in (logits, then the softmax in place), or None for fresh tensors. Not for autograd.
        bias: ``[B | 1, H, n, n]`` added to the scaled logits (MPNet's relative-position bias,
            ``Family.position_bias``), or None.

    Returns:
        ``[B, H, n, n]`` in q's dtype (a view of ``out`` when given); padded keys get probability 0.
    """
    # One batched GEMM on contiguous head-major operands with the scale and the padding bias
    # folded in (baddbmm): a strided [B, H, n, d] matmul is several times slower on CPU than the
    # copies cost (25 ms vs 7 ms at BERT-base, B 16, n 128, one thread), and scaling q and
    # masking the logits in passes of their own cost 2.6x the fused form (17.1 ms vs 6.6 ms for
    # the probabilities at B 8, H 12, n 256, d 32 on this 2-core CPU).
    batch, heads, n, d = q.shape
    scale = d ** -0.5
    q_rows = q.reshape(batch * heads, n, d)
    k_cols = k.transpose(-1, -2).reshape(batch * heads, d, k.shape[-2])
    if bias is not None:
        # The position bias differs per query row: one [B * H, n, n] addend, padding folded in.
        bias = bias_with_padding(bias.to(q.dtype), mask)
        bias, beta = bias.expand(batch, heads, n, k.shape[-2]).reshape(batch * heads, n, -1), 1.0
    elif mask is None:
        bias, beta = q.new_zeros(1, 1, 1), 0.0
    else:
        bias = q.new_zeros(batch, 1, 1, mask.shape[-1]).masked_fill_(
            ~mask[:, None, None, :], torch.finfo(q.dtype).min)
        bias, beta = bias.expand(batch, heads, 1, mask.shape[-1]).reshape(batch * heads, 1, -1), 1.0
    if out is None:
        logits = torch.baddbmm(bias, q_rows, k_cols, beta=beta, alpha=scale)
        return logits.softmax(dim=-1).view(batch, heads, n, -1)
    logits = out[:batch * heads * n * k.shape[-2]].view(batch * heads, n, k.shape[-2])
    torch.baddbmm(bias, q_rows, k_cols, beta=beta, alpha=scale, out=logits)
    # In place: the softmax kernel reads a row before it writes it.
    torch.ops.aten._softmax.out(logits, -1, False, out=logits)
    return logits.view(batch, heads, n, -1)


def baseline_scores(selection: str, mask: torch.Tensor) -> torch.Tensor:
    """Scores ``[B, n]`` fp32 that make the top-k pick of the ablation strategies.

    ``"first"``: decreasing with position, so the first k survive (Head-WS).
    ``"random"``: uniform noise, so k random positions survive (Rand-WS).
    Padding gets -inf and [CLS] is forced by the selection itself.
    """
    batch, n = mask.shape
    if selection == "first":
        scores = -torch.arange(n, device=mask.device, dtype=torch.float32).expand(batch, n)
    elif selection == "random":
        scores = torch.rand(batch, n, device=mask.device)
    else:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    return scores.masked_fill(~mask, float("-inf"))


class LayerOutput(NamedTuple):
    """What one eliminating layer returns.

    hidden: ``[B, k', D]`` the survivors after the layer's FFN.
    mask: ``[B, k']`` bool, True where a real token survived.
    indices: ``[B, k']`` int64 positions (in this layer's input) of the survivors, or None when
        the layer kept everything in order.
    probs: ``[B, H, n, n]`` the attention probabilities over the n vectors that entered (before
        dropout), only when asked for (``need_probs``), else None.
    """

    hidden: torch.Tensor
    mask: torch.Tensor
    indices: torch.Tensor | None
    probs: torch.Tensor | None


def _context_from_probs(parts: LayerParts, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.matmul(parts.probs_dropout(probs), v)


def _context(parts: LayerParts, q, k, v, attn_mask, probs: torch.Tensor | None, bias=None) -> torch.Tensor:
    """``[B, H, n, d]`` attention context: fused SDPA, or from ``probs`` when they are at hand."""
    return _sdpa(parts, q, k, v, attn_mask, bias) if probs is None else _context_from_probs(parts, probs, v)


def eliminating_layer(
    parts: LayerParts,
    hidden: torch.Tensor,
    mask: torch.Tensor,
    keep,
    *,
    padded: bool,
    cls_only: bool = False,
    selection: str = "attention",
    need_probs: bool = False,
    bias: torch.Tensor | None = None,
) -> LayerOutput:
    """Run one encoder layer with word-vector elimination.

    Args:
        parts: the layer's modules.
        hidden: ``[B, n, D]`` vectors entering the layer.
        mask: ``[B, n]`` bool, True for real tokens.
        keep: k_l, vectors kept after this layer's attention (an int; ``keep >= n`` keeps all),
            or ``(k_rows [B] int64, width)``: row i keeps ``k_rows[i]`` and the output has
            ``width`` slots, a row's unused slots masked as padding (proportional retention).
        padded: False when the batch is known to hold no padding (lets attention skip the mask).
        cls_only: compute only the [CLS] output (lossless when the caller reads only [CLS],
            e.g. the last layer under a sequence-classification head). Ignored with
            ``need_probs``.
        selection: ``"attention"`` (PoWER-BERT significance), or the paper's ablations
            ``"first"`` (Head-WS: the first k positions) and ``"random"`` (Rand-WS: k random
            real positions, torch's global RNG). [CLS] is kept and padding is never
            preferred under every strategy.
        need_probs: also return the ``[B, H, n, n]`` attention probabilities (``output_attentions``);
            the layer then takes the explicit-probabilities path even where SDPA would do.
        bias: ``[B | 1, H, n, n]`` added to the scaled attention logits, from the original positions
            of the n vectors that entered (MPNet's relative-position bias), or None. The fused
            GPU kernel takes no bias: such a layer takes the probabilities path there.

    Returns:
        ``LayerOutput(hidden [B, k', D], mask [B, k'], indices, probs)`` with ``k' = min(keep, n)``
        (``min(width, n)`` per row, 1 if ``cls_only``).
    """
    n = hidden.shape[1]
    k, width = keep if isinstance(keep, tuple) else (keep, None)
    attn_mask = mask if padded else None

    if cls_only and not need_probs:
        k_proj = split_heads(parts.key, hidden, parts.num_heads)
        v_proj = split_heads(parts.value, hidden, parts.num_heads)
        residual = hidden[:, :1]
        q_proj = split_heads(parts.query, residual, parts.num_heads)
        context = _sdpa(parts, q_proj, k_proj, v_proj, attn_mask, None if bias is None else bias[:, :, :1])
        first = torch.zeros(hidden.shape[0], 1, dtype=torch.int64, device=hidden.device)
        return LayerOutput(feed_forward(parts, attention_output(parts, context, residual)), mask[:, :1], first, None)

    q_proj, k_proj, v_proj = project_qkv(parts, hidden)
    probs = attention_probs(q_proj, k_proj, attn_mask, bias=bias) if need_probs else None
    if width is None and k >= n:
        # Nothing to eliminate: no scores needed, so use fused SDPA like the stock model.
        context = _context(parts, q_proj, k_proj, v_proj, attn_mask, probs, bias)
        return LayerOutput(feed_forward(parts, attention_output(parts, context, hidden)), mask, None, probs)

    if selection != "attention":
        # Ablations: the choice ignores attention, so attention itself can stay fused.
        context = _context(parts, q_proj, k_proj, v_proj, attn_mask, probs, bias)
        scores = baseline_scores(selection, mask)
        attention, mask, indices = dispatch.extract_from_scores(
            scores, attention_output(parts, context, hidden), mask, k, width=width)
        return LayerOutput(feed_forward(parts, attention), mask, indices, probs)

    if probs is None and bias is None and dispatch.fused_attention_available(hidden, q_proj.shape[-1]):
        # GPU path: scores come out of the attention kernel; no [B, H, n, n] in memory.
        context, scores = dispatch.attention_with_significance(q_proj, k_proj, v_proj, mask)
        context, mask, indices = dispatch.extract_from_scores(scores, merge_heads(context), mask, k, width=width)
        residual = dispatch.gather_rows(hidden, indices)
        attention = parts.attn_norm(parts.attn_dropout(parts.attn_out(context)) + residual)
        return LayerOutput(feed_forward(parts, attention), mask, indices, None)

    dropout = parts.probs_dropout
    if (probs is None and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and not (dropout.training and dropout.p > 0)):
        context, residual, mask, indices = _attend_and_extract_in_chunks(q_proj, k_proj, v_proj, hidden, mask,
                                                                         attn_mask, k, width, bias)
        return LayerOutput(feed_forward(parts, attention_output(parts, context, residual)), mask, indices, None)

    returned = probs  # returned only when asked for
    if probs is None:
        probs = attention_probs(q_proj, k_proj, attn_mask, bias=bias)

    residual, mask, indices = dispatch.extract(probs, hidden, mask, k, width=width)
    if torch.compiler.is_exporting():
        # An exported graph (ONNX): P·V for every row, then the kept rows of the context by one flat
        # gather. Gathering [B, H, k, n] probability rows needs an index of that size materialised
        # (Expand + GatherElements: 7% of the ORT int8 movie-review graph); the (n - k) extra rows
        # of P·V are under 1% of a layer's FLOPs at MiniLM's width.
        context = dispatch.gather_rows(merge_heads(_context_from_probs(parts, probs, v_proj)), indices)
        attention = parts.attn_norm(parts.attn_dropout(parts.attn_out(context)) + residual)
        return LayerOutput(feed_forward(parts, attention), mask, indices, returned)
    batch, heads, _, _ = probs.shape
    kept = indices.shape[1]
    rows = torch.gather(probs, 2, indices.view(batch, 1, kept, 1).expand(batch, heads, kept, n))
    context = _context_from_probs(parts, rows, v_proj)  # [B, H, k, d]
    return LayerOutput(feed_forward(parts, attention_output(parts, context, residual)), mask, indices, returned)


# Inference on the probabilities path works on groups of batch rows whose [rows, H, n, n]
# probabilities take about this many bytes, in one buffer reused by every group. Fresh tensors
# of the whole batch's probabilities (25 MB each at B 8, H 12, n 256) cost more in page faults
# than in arithmetic on this 2-core CPU: the BBC proportional forward took 0.985 s with them and
# 0.804 s when the allocator kept its pages (MALLOC_MMAP_THRESHOLD_), against 3.5 s for stock.
PROBS_CHUNK_BYTES = 8 << 20


def _attend_and_extract_in_chunks(q, k, v, hidden, mask, attn_mask, keep, width, bias=None):
    """Inference-only probabilities path, a group of batch rows at a time (selection is per row,
    so the result is the whole batch's): attention probabilities computed in one reused buffer
    (softmax in place), significance, selection and gather (``dispatch.extract``), the kept rows'
    probabilities gathered into a second reused buffer, times V.

    Args:
        q, k, v: ``[B, H, n, d]``. hidden: ``[B, n, D]``. mask: ``[B, n]`` bool. attn_mask: mask
            or None (no padding). keep, width, bias: as ``eliminating_layer``'s k, width and bias.

    Returns:
        ``(context [B, H, k', d], residual [B, k', D], mask [B, k'], indices [B, k'])``.
    """
    batch, heads, n, _ = q.shape
    per_row = heads * n * n * q.element_size()
    group = max(1, min(batch, PROBS_CHUNK_BYTES // per_row))
    kept = min(n, keep if width is None else width)
    probs_buffer = q.new_empty(group * heads * n * n)
    rows_buffer = q.new_empty(group * heads * kept * n)
    parts = []
    for start in range(0, batch, group):
        rows = slice(start, start + group)
        size = min(group, batch - start)
        rows_bias = None if bias is None else bias[rows] if bias.shape[0] > 1 else bias
        probs = attention_probs(q[rows], k[rows], None if attn_mask is None else attn_mask[rows], out=probs_buffer,
                                bias=rows_bias)
        keep_rows = keep if width is None else keep[rows]
        residual, mask_kept, indices = dispatch.extract(probs, hidden[rows], mask[rows], keep_rows, width=width)
        gathered = rows_buffer[:size * heads * kept * n].view(size, heads, kept, n)
        torch.gather(probs, 2, indices.view(size, 1, kept, 1).expand(size, heads, kept, n), out=gathered)
        parts.append((torch.matmul(gathered, v[rows]), residual, mask_kept, indices))
    if len(parts) == 1:
        return parts[0]
    return tuple(torch.cat(column) for column in zip(*parts))
