"""An independent eager implementation of PoWER-BERT inference, written from powerbert/ALGORITHM.md.

Deliberately plain: per-sequence Python loops for scoring and selection, the textbook
layer order (attention output for every row, then select, then FFN), float64 scores.
It shares no code with ``powerbert`` or ``kernels``; tests compare the library against it.
"""
import math

import torch


def spec_scores(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """§1 for one sequence: probs [H, n, n], mask [n] bool -> [n] float64."""
    heads, n, _ = probs.shape
    p = probs.double()
    scores = torch.empty(n, dtype=torch.float64)
    for j in range(n):
        if not mask[j]:
            scores[j] = -math.inf
            continue
        total = 0.0
        for i in range(n):
            if mask[i] and i != j:
                total += float(p[:, i, j].sum())
        scores[j] = total
    return scores


def spec_keep(scores: torch.Tensor, k: int) -> list[int]:
    """§2 for one sequence: [CLS] first, then by score descending, ties to the lower index.

    A NaN score counts as -inf, as padding does (Python's sort has no order for NaN).
    """
    n = scores.numel()
    values = [float(v) for v in scores.reshape(-1).tolist()]
    values = [-math.inf if math.isnan(v) else v for v in values]
    order = sorted(range(n), key=lambda j: (0 if j == 0 else 1, -values[j], j))
    return sorted(order[:k])


def bert_layer_modules(layer):
    sa = layer.attention.self
    return dict(
        q=sa.query, k=sa.key, v=sa.value, heads=sa.num_attention_heads,
        o=layer.attention.output.dense, ln1=layer.attention.output.LayerNorm,
        ffn_in=layer.intermediate.dense, act=layer.intermediate.intermediate_act_fn,
        ffn_out=layer.output.dense, ln2=layer.output.LayerNorm,
    )


def spec_choose(probs: torch.Tensor, mask: torch.Tensor, k: int) -> list[int]:
    """PoWER-BERT's choice: the top-k by significance (§1-§2)."""
    return spec_keep(spec_scores(probs, mask), k)


def head_ws_choose(probs: torch.Tensor, mask: torch.Tensor, k: int) -> list[int]:
    """Head-WS ablation: the first k real positions, then padding, lowest index first."""
    n = mask.numel()
    real = [j for j in range(n) if mask[j] or j == 0]
    pads = [j for j in range(n) if j not in real]
    return sorted((real + pads)[:k])


@torch.no_grad()
def spec_encoder(hidden: torch.Tensor, mask: torch.Tensor, layers, retention, choose=spec_choose,
                 position_bias=None, last_vectors=None):
    """Run encoder layers with hard extraction. hidden [B, N, D], mask [B, N] 0/1.

    ``layers``: list of dicts as built by ``bert_layer_modules``; ``choose(probs [H, n, n],
    mask [n], k) -> kept positions``; ``position_bias(positions) -> [H, n, n]``: what every
    layer adds to its scaled logits, from the original positions (a list) of the vectors alive
    in it (§9, MPNet), or None. Returns the list of per-sequence outputs [k_L, D] and the kept
    original positions of each sequence. ``last_vectors``: a list that receives, per sequence,
    ``[N, D]`` every position's last vector (a survivor's output; an eliminated vector as it
    entered the layer that dropped it).
    """
    outputs, kept_positions = [], []
    for b in range(hidden.shape[0]):
        h = hidden[b]
        m = mask[b].bool()
        positions = list(range(h.shape[0]))
        last = h.clone()
        for mods, k in zip(layers, retention):
            last[positions] = h
            n, width = h.shape
            heads = mods["heads"]
            d = width // heads
            q = mods["q"](h).view(n, heads, d).transpose(0, 1)
            kk = mods["k"](h).view(n, heads, d).transpose(0, 1)
            v = mods["v"](h).view(n, heads, d).transpose(0, 1)
            logits = q @ kk.transpose(1, 2) / math.sqrt(d)
            if position_bias is not None:
                logits = logits + position_bias(positions)
            logits = logits.masked_fill(~m[None, None, :], float("-inf"))
            probs = logits.softmax(-1)
            context = (probs @ v).transpose(0, 1).reshape(n, width)
            a = mods["ln1"](mods["o"](context) + h)
            if k < n:
                keep = choose(probs, m, k)
                a, m = a[keep], m[keep]
                positions = [positions[i] for i in keep]
            h = mods["ln2"](mods["ffn_out"](mods["act"](mods["ffn_in"](a))) + a)
        last[positions] = h
        outputs.append(h)
        kept_positions.append(positions)
        if last_vectors is not None:
            last_vectors.append(last)
    return outputs, kept_positions
