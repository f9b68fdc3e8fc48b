"""Model-level tests of powerbert.patch on BERT: equivalence, round trips, bad input."""
import json

import pytest
import torch
from transformers import (
    BertForMultipleChoice,
    BertForQuestionAnswering,
    BertForSequenceClassification,
    BertForTokenClassification,
    BertLMHeadModel,
    BertModel,
)

import kernels
import powerbert
from powerbert.elimination.layer import baseline_scores
from spec_reference import head_ws_choose
from tiny_bert import LAYERS, batch, build, spec_outputs

ATTN = ["eager", "sdpa"]


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_keep_all_equals_stock(cls, attn):
    model = build(cls, attn)
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs)
        powerbert.patch(model, [13] * LAYERS)
        patched = model(**inputs)
    for name in ("last_hidden_state", "pooler_output", "logits"):
        if name in stock:
            torch.testing.assert_close(patched[name], stock[name], atol=1e-5, rtol=1e-5)


def test_keep_all_equals_stock_without_padding():
    model = build(BertModel)
    inputs = batch(sizes=(13, 13))
    with torch.no_grad():
        stock = model(**inputs).last_hidden_state
        powerbert.patch(model, [13] * LAYERS)
        torch.testing.assert_close(model(**inputs).last_hidden_state, stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("retention", [(9, 6, 3), (12, 12, 1), (5, 2, 2), (1, 1, 1)])
def test_elimination_equals_spec(attn, retention):
    model = build(BertModel, attn)
    inputs = batch()
    expected, positions = spec_outputs(model, inputs, retention)
    powerbert.patch(model, retention)
    with torch.no_grad():
        out = model(**inputs)
    assert out.last_hidden_state.shape == (4, retention[-1], 32)
    for row, reference in enumerate(expected):
        torch.testing.assert_close(out.last_hidden_state[row], reference, atol=2e-5, rtol=2e-5)
    pooled = model.pooler(torch.stack([r for r in expected]))
    torch.testing.assert_close(out.pooler_output, pooled, atol=2e-5, rtol=2e-5)
    assert all(p[0] == 0 for p in positions)  # [CLS] always survives


def test_cls_only_last_layer_matches_full_last_layer():
    retention = (9, 6, 3)
    model = build(BertForSequenceClassification)
    inputs = batch()
    with torch.no_grad():
        powerbert.patch(model, retention, cls_only_last_layer=False)
        full = model(**inputs).logits
        powerbert.unpatch(model)
        powerbert.patch(model, retention)
        cls_only = model(**inputs).logits
    expected, _ = spec_outputs(model.bert, inputs, retention)
    reference = model.classifier(model.bert.pooler(torch.stack(expected)))
    torch.testing.assert_close(cls_only, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cls_only, reference, atol=2e-5, rtol=2e-5)


def test_multiple_choice_matches_spec():
    retention = (7, 4, 2)
    model = build(BertForMultipleChoice)
    flat = batch(sizes=(11, 8, 11, 3, 6, 10), length=11)
    inputs = {name: t.view(2, 3, 11) for name, t in flat.items()}
    expected, _ = spec_outputs(model.bert, flat, retention)
    reference = model.classifier(model.bert.pooler(torch.stack(expected))).view(2, 3)
    powerbert.patch(model, retention)
    with torch.no_grad():
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=2e-5)


def test_batch_invariance_of_padding():
    """A sequence's result does not depend on how much padding its batch adds."""
    retention = (6, 4, 2)
    model = build(BertModel)
    powerbert.patch(model, retention)
    alone = batch(sizes=(9,), length=9)
    padded = {name: torch.cat([t, torch.zeros(1, 7, dtype=t.dtype)], 1) for name, t in alone.items()}
    with torch.no_grad():
        a = model(**alone).last_hidden_state
        b = model(**padded).last_hidden_state
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_inputs_are_not_mutated():
    model = build(BertModel)
    inputs = batch()
    before = {name: t.clone() for name, t in inputs.items()}
    powerbert.patch(model, (5, 3, 2))
    with torch.no_grad():
        model(**inputs)
    for name, t in inputs.items():
        assert torch.equal(t, before[name]), name


# ---------------------------------------------------------------- round trips


def test_patch_unpatch_round_trip():
    model = build(BertForSequenceClassification)
    state = {name: t.clone() for name, t in model.state_dict().items()}
    encoder_dict = dict(model.bert.encoder.__dict__)
    config = model.config.to_dict()
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs).logits
        assert powerbert.patch(model, (5, 3, 2)) is model
        assert powerbert.is_patched(model)
        assert model.config.powerbert_retention == [5, 3, 2]
        assert not torch.allclose(model(**inputs).logits, stock)
        assert powerbert.unpatch(model) is model
        again = model(**inputs).logits
    assert not powerbert.is_patched(model)
    assert dict(model.bert.encoder.__dict__) == encoder_dict
    assert model.config.to_dict() == config
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[n], t) for n, t in state.items())
    torch.testing.assert_close(again, stock, atol=0, rtol=0)


def test_save_pretrained_stores_retention_and_reloads(tmp_path):
    model = build(BertForSequenceClassification)
    inputs = batch()
    powerbert.patch(model, (6, 4, 2))
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["powerbert_retention"] == [6, 4, 2]
    loaded = BertForSequenceClassification.from_pretrained(tmp_path).eval()
    powerbert.patch(loaded)
    assert powerbert.patched_retention(loaded) == (6, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, logits, atol=1e-6, rtol=1e-6)


def test_unpatch_restores_a_loaded_retention(tmp_path):
    model = build(BertModel)
    model.config.powerbert_retention = [4, 4, 4]
    powerbert.patch(model, (3, 2, 1))
    powerbert.unpatch(model)
    assert model.config.powerbert_retention == [4, 4, 4]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "retention, error, match",
    [
        ((4, 3), ValueError, "2 entries but the model has 3 layers"),
        ((4, 3, 2, 1), ValueError, "4 entries but the model has 3 layers"),
        ((4, 0, 0), ValueError, r"retention\[1\] = 0.*at least 1"),
        ((4, 3, -2), ValueError, r"retention\[2\] = -2"),
        ((3, 4, 2), ValueError, "non-increasing"),
        ((0.5, 3, 2), TypeError, r"retention\[1\] = 3: a proportional configuration is all floats"),
        ((4.5, 3, 2), ValueError, r"retention\[0\] = 4.5: a fraction must be in"),
        ((0.5, 0.6, 0.1), ValueError, "non-increasing"),
        ((1.5, 1.0, 0.5), ValueError, r"retention\[0\] = 1.5: a fraction must be in \(0, 1\]"),
        ((0.5, 0.0, 0.0), ValueError, r"retention\[1\] = 0.0: a fraction"),
        ((float("nan"), 0.5, 0.5), ValueError, r"retention\[0\] = nan: a fraction"),
        ((True, 1, 1), TypeError, r"retention\[0\] must be an int"),
        (5, TypeError, "sequence of 3 ints"),
        ("543", TypeError, "sequence of 3 ints"),
        ((65, 3, 2), ValueError, "exceeds the model's maximum input length 64"),
    ],
)
def test_bad_retention_is_refused(retention, error, match):
    model = build(BertModel)
    with pytest.raises(error, match=match):
        powerbert.patch(model, retention)
    assert not powerbert.is_patched(model)
    assert not hasattr(model.config, "powerbert_retention")


def test_missing_retention_is_refused():
    with pytest.raises(ValueError, match="no retention given"):
        powerbert.patch(build(BertModel))


def test_patch_twice_and_unpatch_unpatched():
    model = build(BertModel)
    with pytest.raises(RuntimeError, match="not patched"):
        powerbert.unpatch(model)
    powerbert.patch(model, (3, 2, 1))
    with pytest.raises(RuntimeError, match="already patched"):
        powerbert.patch(model, (3, 2, 1))


@pytest.mark.parametrize("cls", [BertForTokenClassification, BertForQuestionAnswering])
def test_unsupported_heads_are_refused(cls):
    with pytest.raises(TypeError, match=f"does not support {cls.__name__}.*Supported models: BertModel"):
        powerbert.patch(build(cls), (3, 2, 1))


def test_decoders_are_refused():
    with pytest.raises(TypeError, match="does not support BertLMHeadModel"):
        powerbert.patch(build(BertLMHeadModel, is_decoder=True), (3, 2, 1))
    with pytest.raises(TypeError, match="configured as a decoder"):
        powerbert.patch(build(BertModel, is_decoder=True), (3, 2, 1))


def test_non_models_are_refused():
    with pytest.raises(TypeError, match="does not support Linear"):
        powerbert.patch(torch.nn.Linear(2, 2), (1,))


# ---------------------------------------------------------------- ablation strategies


def test_head_ws_keeps_the_first_real_positions():
    retention = (9, 6, 3)
    model = build(BertModel)
    inputs = batch()
    expected, positions = spec_outputs(model, inputs, retention, choose=head_ws_choose)
    powerbert.patch(model, retention, selection="first")
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert positions[0] == [0, 1, 2] and positions[3][0] == 0
    for row, reference in enumerate(expected):
        torch.testing.assert_close(out[row], reference, atol=2e-5, rtol=2e-5)


def test_rand_ws_is_seeded_keeps_cls_and_prefers_real_tokens():
    model = build(BertModel)
    inputs = batch(sizes=(13, 5))
    powerbert.patch(model, (4, 4, 4), selection="random")
    with torch.no_grad():
        torch.manual_seed(3)
        a = model(**inputs).last_hidden_state
        torch.manual_seed(3)
        b = model(**inputs).last_hidden_state
        torch.manual_seed(4)
        c = model(**inputs).last_hidden_state
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.allclose(a[0], c[0])
    # the 5-token row keeps 4 of its real tokens: padding never survives while real tokens remain
    mask = inputs["attention_mask"].bool()
    for trial in range(20):
        scores = baseline_scores("random", mask)
        _, kept, indices = kernels.extract_from_scores(scores, torch.randn(2, 13, 8), mask, 4)
        assert kept.all() and (indices[:, 0] == 0).all()


def test_selection_is_stored_restored_and_validated(tmp_path):
    model = build(BertForSequenceClassification)
    with pytest.raises(ValueError, match="selection must be one of"):
        powerbert.patch(model, (3, 2, 1), selection="best")
    assert not powerbert.is_patched(model)
    powerbert.patch(model, (3, 2, 1), selection="first")
    model.save_pretrained(tmp_path)
    powerbert.unpatch(model)
    assert not hasattr(model.config, "powerbert_selection")
    loaded = BertForSequenceClassification.from_pretrained(tmp_path)
    assert loaded.config.powerbert_selection == "first"
    powerbert.patch(loaded)
    assert powerbert.patch_state(loaded).selection == "first"
