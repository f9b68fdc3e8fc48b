"""Tiny random BERTs and batches shared by the model tests of every room, and the per-sequence
reference of proportional retention (powerbert/ALGORITHM.md §8): every row alone, unpadded, through
the spec implementation (``spec_reference``) with that row's own keep counts."""
import math

import torch
from transformers import BertConfig, BertModel

from spec_reference import bert_layer_modules, spec_encoder

LAYERS = 3


def tiny_config(**overrides) -> BertConfig:
    values = dict(
        vocab_size=101, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, num_labels=3,
    )
    values.update(overrides)
    return BertConfig(**values)


def build(cls, attn="sdpa", **overrides):
    torch.manual_seed(0)
    model = cls(tiny_config(**overrides))
    model.set_attn_implementation(attn)
    return model.eval()


def batch(sizes=(13, 9, 4, 1), length=13, vocab=101, seed=1):
    """Random ids with right padding: one row per real length in ``sizes``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(sizes), length), generator=g)
    mask = torch.zeros(len(sizes), length, dtype=torch.long)
    for row, size in enumerate(sizes):
        mask[row, :size] = 1
    ids = ids * mask
    types = torch.randint(0, 2, (len(sizes), length), generator=g) * mask
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types)


def spec_outputs(bert: BertModel, inputs, retention, **kwargs):
    hidden = bert.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
    layers = [bert_layer_modules(layer) for layer in bert.encoder.layer]
    return spec_encoder(hidden, inputs["attention_mask"], layers, retention, **kwargs)


def reference_counts(fractions, minimum, length):
    """§8 written out for one sequence, in Python floats (float64)."""
    counts, previous = [], length
    for layer, f in enumerate(fractions):
        m = 1 if minimum is None else minimum[layer]
        previous = min(previous, max(m, math.ceil(f * length)))
        counts.append(previous)
    return counts


def per_sequence_reference(bert, inputs, fractions, minimum=None, last_vectors=None):
    """Each row alone, without padding, through the spec with its own counts (``last_vectors``:
    a list receiving each row's ``[len_i, D]`` last vectors, see ``spec_encoder``)."""
    layers = [bert_layer_modules(layer) for layer in bert.encoder.layer]
    outputs, positions = [], []
    for row in range(inputs["input_ids"].shape[0]):
        length = int(inputs["attention_mask"][row].sum())
        ids = inputs["input_ids"][row:row + 1, :length]
        types = inputs["token_type_ids"][row:row + 1, :length]
        with torch.no_grad():
            hidden = bert.embeddings(input_ids=ids, token_type_ids=types)
        out, kept = spec_encoder(hidden, torch.ones(1, length), layers, reference_counts(fractions, minimum, length),
                                 last_vectors=last_vectors)
        outputs.append(out[0])
        positions.append(kept[0])
    return outputs, positions
