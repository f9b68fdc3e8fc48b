"""Test-side pieces of MPNet (shared by the family, MPNet and sentence-model tests): its layers as
``spec_reference`` dicts, the relative-position bucket written out, the §9 bias of one sequence
from its original positions, and each row alone through the spec."""
import math

import numpy as np
import torch

from spec_reference import spec_encoder
from tiny_bert import reference_counts


def mpnet_layers(base) -> list[dict]:
    return [
        dict(
            q=layer.attention.attn.q, k=layer.attention.attn.k, v=layer.attention.attn.v,
            heads=layer.attention.attn.num_attention_heads, o=layer.attention.attn.o, ln1=layer.attention.LayerNorm,
            ffn_in=layer.intermediate.dense, act=layer.intermediate.intermediate_act_fn,
            ffn_out=layer.output.dense, ln2=layer.output.LayerNorm,
        )
        for layer in base.encoder.layer
    ]


def relative_bucket(offset: int, buckets: int = 32, max_distance: int = 128) -> int:
    """MPNet's (T5's bidirectional) bucket of a key-minus-query offset, one int at a time; the
    log in float32 as stock takes it (the boundaries fall on exact powers of two)."""
    half = buckets // 2
    bucket = half if offset > 0 else 0
    distance = abs(offset)
    exact = half // 2
    if distance < exact:
        return bucket + distance
    ratio = np.log(np.float32(distance) / np.float32(exact)) / np.float32(math.log(max_distance / exact))
    return bucket + min(half - 1, exact + int(np.float32(ratio * np.float32(half - exact))))


def mpnet_bias(base):
    """§9 for one sequence: original positions -> ``[H, n, n]`` from the encoder's bias table."""
    table = base.encoder.relative_attention_bias.weight

    def bias(positions):
        buckets = torch.tensor([[relative_bucket(j - i) for j in positions] for i in positions])
        return table[buckets].permute(2, 0, 1)
    return bias


def each_row_alone(base, inputs, fractions, last_vectors=None):
    """Every row alone, unpadded, through the spec with its own §8 counts and the §9 bias:
    ``(outputs [k_i, D] per row, kept original positions per row)``; ``last_vectors``: a list
    receiving each row's ``[len_i, D]`` last vectors (``spec_encoder``)."""
    outputs, positions = [], []
    for row in range(inputs["input_ids"].shape[0]):
        length = int(inputs["attention_mask"][row].sum())
        ids = inputs["input_ids"][row:row + 1][inputs["attention_mask"][row:row + 1].bool()].view(1, length)
        with torch.no_grad():
            hidden = base.embeddings(input_ids=ids)
        out, kept = spec_encoder(hidden, torch.ones(1, length), mpnet_layers(base),
                                 reference_counts(fractions, None, length), position_bias=mpnet_bias(base),
                                 last_vectors=last_vectors)
        outputs.append(out[0])
        positions.append(kept[0])
    return outputs, positions
