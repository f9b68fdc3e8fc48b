"""The inference probabilities path in groups of batch rows (``layer._attend_and_extract_in_chunks``):
every group size gives the spec's outputs and selections, the in-place softmax equals the fresh
one in every dtype, and training or active attention dropout keep the whole-batch path."""
import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import powerbert
from powerbert.elimination import layer
from tiny_bert import batch, build, spec_outputs
from test_proportional import FRACTIONS, SIZES
from tiny_bert import per_sequence_reference, reference_counts

ROW_BYTES = 2 * 13 * 13 * 4  # one row's probabilities in the tiny model (H 2, n 13, fp32)


@pytest.mark.parametrize("rows_per_group", [1, 2, 3, 4])
@pytest.mark.parametrize("retention", [(9, 6, 3), (5, 2, 1)])
def test_fixed_retention_in_groups_equals_the_spec(rows_per_group, retention, monkeypatch):
    monkeypatch.setattr(layer, "PROBS_CHUNK_BYTES", rows_per_group * ROW_BYTES)
    model = build(BertModel)
    inputs = batch(sizes=(13, 9, 4, 1))  # 4 rows: groups of 3 leave a last group of 1
    expected, positions = spec_outputs(model, inputs, retention)
    powerbert.patch(model, retention)
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape == (4, retention[-1], 32)
    for row, (reference, kept) in enumerate(zip(expected, positions)):
        assert out.kept_positions[row].tolist() == list(kept)
        torch.testing.assert_close(out.last_hidden_state[row], reference, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("rows_per_group", [1, 3])
@pytest.mark.parametrize("minimum", [None, (4, 3, 2)])
def test_proportional_retention_in_groups_equals_each_row_alone(rows_per_group, minimum, monkeypatch):
    monkeypatch.setattr(layer, "PROBS_CHUNK_BYTES", rows_per_group * ROW_BYTES)
    model = build(BertModel)
    inputs = batch(sizes=SIZES)
    expected, positions = per_sequence_reference(model, inputs, FRACTIONS, minimum)
    powerbert.patch(model, list(FRACTIONS), retention_min=minimum)
    with torch.no_grad():
        out = model(**inputs)
    for row, (reference, kept) in enumerate(zip(expected, positions)):
        real = out.kept_mask[row]
        assert int(real.sum()) == reference_counts(FRACTIONS, minimum, SIZES[row])[-1]
        assert out.kept_positions[row][real].tolist() == kept
        torch.testing.assert_close(out.last_hidden_state[row][real], reference, atol=3e-5, rtol=3e-5)


def test_groups_do_not_change_the_logits(monkeypatch):
    model = powerbert.patch(build(BertForSequenceClassification), [0.6, 0.4, 0.2])
    inputs = batch(sizes=(13, 11, 7, 5, 2))
    with torch.no_grad():
        whole = model(**inputs).logits
        monkeypatch.setattr(layer, "PROBS_CHUNK_BYTES", 1)  # one row per group
        grouped = model(**inputs).logits
    torch.testing.assert_close(grouped, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_softmax_in_a_reused_buffer_equals_fresh_tensors(dtype, masked):
    g = torch.Generator().manual_seed(0)
    batch_size, heads, n, d = 3, 4, 37, 16  # odd n; q, k strided views as split_heads gives them
    q = torch.randn(batch_size, n, heads, d, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(batch_size, n, heads, d, generator=g).to(dtype).transpose(1, 2)
    mask = torch.ones(batch_size, n, dtype=torch.bool)
    mask[1, 20:] = False
    mask[2, 5:] = False
    buffer = torch.full((batch_size * heads * n * n + 11,), float("nan"), dtype=dtype)  # larger, dirty
    fresh = layer.attention_probs(q, k, mask if masked else None)
    reused = layer.attention_probs(q, k, mask if masked else None, out=buffer)
    assert reused.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(reused, fresh, atol=0, rtol=0)


def _count_group_calls(monkeypatch) -> list:
    calls = []
    original = layer._attend_and_extract_in_chunks
    monkeypatch.setattr(layer, "_attend_and_extract_in_chunks", lambda *a: calls.append(1) or original(*a))
    return calls


def test_training_and_attention_dropout_keep_the_whole_batch_path(monkeypatch):
    calls = _count_group_calls(monkeypatch)
    model = powerbert.patch(build(BertForSequenceClassification, attention_probs_dropout_prob=0.2), (9, 6, 3))
    inputs = batch()
    with torch.no_grad():
        model(**inputs)
    assert calls, "eval + no_grad takes the grouped path"
    calls.clear()
    model.train()
    model(**inputs).logits.sum().backward()  # autograd: the probabilities stay in the graph
    with torch.no_grad():
        torch.manual_seed(0)
        first = model(**inputs).logits
        torch.manual_seed(1)
        second = model(**inputs).logits
    assert not calls
    assert not torch.equal(first, second), "attention dropout is applied under no_grad in train mode"
