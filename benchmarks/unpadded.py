"""The stock baseline with padding removed: what a GPU user runs on ragged batches without PoWER-BERT.

``flash_attn/bert_padding.py`` (and FasterTransformer's "remove padding") run BERT on the packed
real tokens: after the embeddings, every Linear / LayerNorm / GELU sees ``[total_tokens, D]`` and
attention runs per sequence on packed q, k, v (variable-length attention). Here that is done with
the stock model's own modules, nothing re-implemented but the loop over layers, and torch's own
variable-length attention:

* ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention varlen, CUDA only; in torch >= 2.10),
* else nested tensors with the jagged layout, whose SDPA runs FlashAttention or the
  memory-efficient kernel on CUDA and the math path on CPU (the dry run).

References: :func:`pack` / ``BertModel`` on the padded batch give the same vectors on the real
tokens (``tests/test_gpu_plumbing.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def pack(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``mask`` ``[B, n]`` (1 / True = real token) -> ``(indices [T] int64 into the flattened
    [B*n] positions, cu_seqlens [B + 1] int32, longest length)``. One host synchronisation."""
    lengths = mask.sum(1, dtype=torch.int32)
    indices = torch.nonzero(mask.flatten().bool(), as_tuple=False).flatten()
    cu_seqlens = F.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    return indices, cu_seqlens, int(lengths.max())


def has_varlen_attn(dev: torch.device | str) -> bool:
    """True where ``torch.nn.attention.varlen.varlen_attn`` exists and can run (CUDA)."""
    if torch.device(dev).type != "cuda":
        return False
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def varlen_attention(q, k, v, cu_seqlens, max_len: int, backend: str = "auto") -> torch.Tensor:
    """Attention within each sequence of a packed batch.

    Args:
        q, k, v: ``[T, H, d]`` packed real tokens (fp16/bf16 for ``varlen_attn``).
        cu_seqlens: ``[B + 1]`` int32 offsets of the sequences in T.
        max_len: the longest sequence.
        backend: ``"varlen_attn"``, ``"nested"`` or ``"auto"`` (varlen_attn where it runs).

    Returns:
        ``[T, H, d]``, softmax(q kᵀ / sqrt(d)) v within each sequence.
    """
    if backend == "auto":
        backend = "varlen_attn" if has_varlen_attn(q.device) else "nested"
    if backend == "varlen_attn":
        from torch.nn.attention.varlen import varlen_attn

        # Positional only: the keyword arguments after max_k changed between torch releases.
        return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len)
    if backend != "nested":
        raise ValueError(f"backend must be 'auto', 'varlen_attn' or 'nested', got {backend!r}")
    offsets = cu_seqlens.to(torch.int64)

    def nested(x):  # [B, j, H, d] jagged -> [B, H, j, d], as SDPA takes it
        return torch.nested.nested_tensor_from_jagged(x, offsets, max_seqlen=max_len).transpose(1, 2)

    out = F.scaled_dot_product_attention(nested(q), nested(k), nested(v))
    return out.transpose(1, 2).values()


def bert_forward_unpadded(model, input_ids, attention_mask, token_type_ids=None, backend: str = "auto"):
    """A stock ``BertModel``'s encoder on the real tokens only (eval mode, no dropout).

    Args:
        model: ``transformers.BertModel`` (any ``attn_implementation``: attention runs here).
        input_ids, attention_mask, token_type_ids: ``[B, n]`` as for the model.
        backend: see :func:`varlen_attention`.

    Returns:
        ``(hidden [T, D], indices [T], cu_seqlens [B + 1])``: the last layer's vectors of the T real
        tokens in row order; ``indices`` are their positions in the flattened ``[B*n]`` input.
    """
    hidden = model.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
    indices, cu_seqlens, max_len = pack(attention_mask)
    hidden = hidden.flatten(0, 1)[indices]
    for layer in model.encoder.layer:
        self_attention = layer.attention.self
        heads, head_dim = self_attention.num_attention_heads, self_attention.attention_head_size
        q, k, v = (proj(hidden).view(-1, heads, head_dim)
                   for proj in (self_attention.query, self_attention.key, self_attention.value))
        context = varlen_attention(q, k, v, cu_seqlens, max_len, backend).reshape(-1, heads * head_dim)
        attention_out = layer.attention.output(context, hidden)
        hidden = layer.output(layer.intermediate(attention_out), attention_out)
    return hidden, indices, cu_seqlens
