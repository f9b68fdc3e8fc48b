"""Proportional (length-aware) retention, powerbert/ALGORITHM.md §8: each sequence keeps a share of its own
length. Checked against an independent per-sequence reference: every row alone, unpadded,
through the spec implementation with that row's own k_{l,i}."""
import math

import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import powerbert
from powerbert.elimination.retention import ideal_vs_dynamic_padding, keep_counts, row_keep_counts, vector_ratio
from tiny_bert import batch, build, per_sequence_reference, reference_counts

FRACTIONS = (0.7, 0.45, 0.2)
SIZES = (13, 9, 4, 1)


@pytest.mark.parametrize("minimum", [None, (3, 2, 2)])
def test_row_keep_counts_follow_the_formula(minimum):
    lengths = torch.tensor([1, 2, 3, 7, 13, 64, 128, 511])
    counts = row_keep_counts(FRACTIONS, minimum, lengths)
    for column, length in enumerate(lengths.tolist()):
        assert counts[:, column].tolist() == reference_counts(FRACTIONS, minimum, length)
        assert keep_counts(FRACTIONS, length, minimum) == reference_counts(FRACTIONS, minimum, length)


def test_ceil_is_taken_in_float64():
    # 0.29 * 100 = 28.999999999999996 in float64 (ceil 29); float32 would round it to 29.0 (ceil 29) too,
    # but 0.58 * 50 = 28.999999999999996 -> 29; a product exactly representable stays: 0.25 * 8 = 2.
    assert row_keep_counts((0.29,), None, torch.tensor([100]))[0].tolist() == [math.ceil(0.29 * 100)]
    assert row_keep_counts((0.25,), None, torch.tensor([8]))[0].tolist() == [2]
    assert row_keep_counts((0.1,), None, torch.tensor([30]))[0].tolist() == [math.ceil(0.1 * 30)]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("minimum", [None, (4, 3, 2)])
def test_each_row_equals_the_row_alone_through_the_spec(attn, minimum, static):
    model = build(BertModel, attn)
    inputs = batch(sizes=SIZES)
    expected, positions = per_sequence_reference(model, inputs, FRACTIONS, minimum)
    powerbert.patch(model, list(FRACTIONS), retention_min=minimum, static_shapes=static)
    with torch.no_grad():
        out = model(**inputs)
    for row, (reference, kept) in enumerate(zip(expected, positions)):
        real = out.kept_mask[row]
        assert int(real.sum()) == len(kept) == reference_counts(FRACTIONS, minimum, SIZES[row])[-1]
        assert out.kept_positions[row][real].tolist() == kept  # selection exact, in order
        assert bool(real[: len(kept)].all()), "survivors come first, padding after"
        torch.testing.assert_close(out.last_hidden_state[row][real], reference, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("static", [False, True])
def test_leading_shares_of_one_keep_everything_without_scoring(static, monkeypatch):
    """Layers of a leading run of 1.0 keep every real token of every row: they run like the stock
    layer (fused attention, no scores, no selection), and the output still follows the spec."""
    from powerbert.elimination import dispatch as ops

    fractions = (1.0, 1.0, 0.45)
    model = build(BertModel)
    inputs = batch(sizes=SIZES)
    expected, positions = per_sequence_reference(model, inputs, fractions)
    powerbert.patch(model, list(fractions), static_shapes=static)
    extractions = []
    real_extract = ops.extract
    monkeypatch.setattr(ops, "extract", lambda *a, **k: extractions.append(1) or real_extract(*a, **k))
    with torch.no_grad():
        out = model(**inputs)
    assert len(extractions) == 1  # the third layer alone selects
    for row, (reference, kept) in enumerate(zip(expected, positions)):
        real = out.kept_mask[row]
        assert out.kept_positions[row][real].tolist() == kept
        torch.testing.assert_close(out.last_hidden_state[row][real], reference, atol=3e-5, rtol=3e-5)


def test_batch_invariance_and_max_length_padding():
    model = powerbert.patch(build(BertModel), list(FRACTIONS))
    inputs = batch(sizes=SIZES)
    padded = {name: torch.cat([t, torch.zeros(4, 20, dtype=t.dtype)], 1) for name, t in inputs.items()}
    with torch.no_grad():
        together = model(**inputs)
        wide = model(**padded)
        for row, size in enumerate(SIZES):
            alone = model(**{name: t[row:row + 1, :size] for name, t in inputs.items()})
            real = together.kept_mask[row]
            torch.testing.assert_close(alone.last_hidden_state[0], together.last_hidden_state[row][real],
                                       atol=1e-5, rtol=1e-5)
    assert torch.equal(wide.kept_mask, together.kept_mask)
    torch.testing.assert_close(wide.last_hidden_state[wide.kept_mask], together.last_hidden_state[together.kept_mask],
                               atol=1e-5, rtol=1e-5)


def test_head_logits_equal_the_reference():
    model = build(BertForSequenceClassification)
    inputs = batch(sizes=SIZES)
    expected, _ = per_sequence_reference(model.bert, inputs, FRACTIONS)
    reference = model.classifier(model.bert.pooler(torch.stack([out[:1] for out in expected])))
    powerbert.patch(model, list(FRACTIONS))
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference, atol=3e-5, rtol=3e-5)


def test_configuration_round_trips_through_config_json(tmp_path):
    model = powerbert.patch(build(BertForSequenceClassification), [0.6, 0.4, 0.25], retention_min=2)
    model.save_pretrained(tmp_path)
    loaded = powerbert.patch(BertForSequenceClassification.from_pretrained(tmp_path))
    state = powerbert.patch_state(loaded)
    assert state.retention == (0.6, 0.4, 0.25) and state.minimum == (2, 2, 2)
    powerbert.unpatch(model)
    assert not hasattr(model.config, "powerbert_retention_min")


def test_bad_minimum_is_refused():
    with pytest.raises(ValueError, match="retention_min"):
        powerbert.patch(build(BertModel), [0.5, 0.5, 0.5], retention_min=0)
    with pytest.raises(ValueError, match="applies to a proportional configuration"):
        powerbert.patch(build(BertModel), [5, 4, 3], retention_min=2)


def test_ideals():
    assert vector_ratio((0.5, 0.25), 8) == pytest.approx(2 * 8 / (4 + 2))
    # two batches padded to their longest: (8, 4) and (2,)
    stock = 2 * (8 * 2) + 2 * (2 * 1)
    patched = (4 + 2) + (2 + 1) + (1 + 1)
    assert ideal_vs_dynamic_padding((0.5, 0.25), [[8, 4], [2]]) == pytest.approx(stock / patched)


def test_flops_ideal_vs_dynamic_padding_counts_the_first_attention():
    from powerbert.elimination.retention import flops_ideal_vs_dynamic_padding, layer_flops

    # one batch of two sequences (8 and 4 tokens), D 4, I 8, fractions (0.5, 0.25)
    stock = 2 * 2 * layer_flops(8, 8, 4, 8)
    patched = (layer_flops(8, 4, 4, 8) + layer_flops(4, 2, 4, 8)) + (layer_flops(4, 2, 4, 8) + layer_flops(2, 1, 4, 8))
    assert flops_ideal_vs_dynamic_padding((0.5, 0.25), [[8, 4]], 4, 8) == pytest.approx(stock / patched)
    # keeping everything on equal lengths is no speedup
    assert flops_ideal_vs_dynamic_padding((1.0, 1.0), [[6, 6]], 4, 8) == pytest.approx(1.0)


def test_padded_layout_ideal_counts_each_batch_at_its_widest_row():
    # (0.5, 0.25) on lengths 8 and 2: rows keep (4, 2) and (1, 1); padded to the widest: 2 * (4 + 2)
    stock = 2 * 8 * 2
    assert ideal_vs_dynamic_padding((0.5, 0.25), [[8, 2]], layout="padded") == pytest.approx(stock / 12)
    assert ideal_vs_dynamic_padding((0.5, 0.25), [[8, 2]], layout="packed") == pytest.approx(stock / 8)
    # equal lengths: both layouts agree
    assert ideal_vs_dynamic_padding((0.5, 0.25), [[8, 8]], layout="padded") == pytest.approx(
        ideal_vs_dynamic_padding((0.5, 0.25), [[8, 8]]))
    with pytest.raises(ValueError, match="layout"):
        ideal_vs_dynamic_padding((0.5,), [[8]], layout="ragged")


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_proportional_retention_traces_in_one_graph(cls):
    """The default layout is static while Dynamo traces: the keep counts of a full-length row are
    Python ints there (no data-dependent width), and the compiled model gives the eager outputs."""
    model = powerbert.patch(build(cls), FRACTIONS)
    inputs = batch(SIZES)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        out = compiled(**inputs)
        expected = model(**inputs)
    if cls is BertModel:
        static = powerbert.patch(build(cls), FRACTIONS, static_shapes=True)
        with torch.no_grad():
            expected = static(**inputs)
        torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)
        assert torch.equal(out.kept_positions, expected.kept_positions)
    else:
        torch.testing.assert_close(out.logits, expected.logits)
