"""Any padding layout, no work on padding (powerbert/ALGORITHM.md §7): real tokens first at entry,
all-padding columns dropped (dynamic layout) or kept (static layout)."""
import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import powerbert
from powerbert.elimination.layout import real_tokens_first, static_shapes_now
from test_families import CASES, FAMILIES
from test_families import batch as family_batch
from test_families import build as family_build
from tiny_bert import batch, build, spec_outputs

RETENTION = (9, 6, 3)


def test_real_tokens_first_keeps_order_and_drops_padding_columns():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 1]], dtype=torch.bool)
    hidden = torch.arange(15.0).view(3, 5, 1)
    h, m, positions, padded = real_tokens_first(hidden, mask, trim=True)
    assert positions.tolist() == [[2, 3, 4], [0, 2, 1], [4, 0, 1]]
    assert m.tolist() == [[True] * 3, [True, True, False], [True, False, False]]
    assert h[..., 0].tolist() == [[2.0, 3.0, 4.0], [5.0, 7.0, 6.0], [14.0, 10.0, 11.0]]
    assert padded
    h, m, positions, padded = real_tokens_first(hidden, mask, trim=False)
    assert positions.shape == (3, 5) and positions[:, :3].tolist() == [[2, 3, 4], [0, 2, 1], [4, 0, 1]]
    assert m.sum(1).tolist() == [3, 2, 1]


def test_right_padded_input_is_sliced_and_full_rows_need_no_mask():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    hidden = torch.randn(2, 4, 3)
    h, m, positions, padded = real_tokens_first(hidden, mask, trim=True)
    assert h.shape == (2, 3, 3) and torch.equal(h, hidden[:, :3]) and not padded
    assert positions.tolist() == [[0, 1, 2]] * 2


def test_static_shapes_setting():
    assert static_shapes_now(True) and not static_shapes_now(False)
    assert not static_shapes_now(None)  # eager, not capturing: dynamic


def _left_padded(inputs: dict) -> dict:
    """The same rows with their padding moved to the left; positions passed explicitly so that
    every token keeps its position embedding."""
    mask = inputs["attention_mask"]
    order = torch.sort(mask, dim=1, stable=True).indices  # padding (0) first, then real tokens in order
    moved = {name: torch.gather(t, 1, order) for name, t in inputs.items()}
    moved["position_ids"] = (torch.cumsum(moved["attention_mask"], 1) - 1).clamp(min=0)
    return moved


def _right_with_positions(inputs: dict) -> dict:
    out = dict(inputs)
    out["position_ids"] = (torch.cumsum(inputs["attention_mask"], 1) - 1).clamp(min=0)
    return out


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("name", FAMILIES + ["bert"])
def test_left_and_right_padding_give_the_same_outputs(name, static):
    if name == "bert":
        model, inputs = build(BertModel), batch()
        applications = 3
    else:
        model, inputs = family_build(name), family_batch()
        applications = CASES[name].applications
    retention = (9,) * (applications - 2) + (6, 5)
    powerbert.patch(model, retention, static_shapes=static)
    right, left = _right_with_positions(inputs), _left_padded(inputs)
    with torch.no_grad():
        a, b = model(**right), model(**left)
    assert torch.equal(a.kept_mask, b.kept_mask)
    # real survivors equal; padding slots (k_L > a row's length) hold whatever padding vector
    torch.testing.assert_close(a.last_hidden_state[a.kept_mask], b.last_hidden_state[b.kept_mask],
                               atol=1e-5, rtol=1e-5)
    # kept_positions point into each input: the same tokens
    ids_a = torch.gather(right["input_ids"], 1, a.kept_positions)[a.kept_mask]
    ids_b = torch.gather(left["input_ids"], 1, b.kept_positions)[b.kept_mask]
    assert torch.equal(ids_a, ids_b)


@pytest.mark.parametrize("retention", [RETENTION, (13, 13, 13)])
def test_padding_to_max_length_equals_dynamic_padding(retention):
    model = powerbert.patch(build(BertModel), retention)
    dynamic = batch(sizes=(9, 7, 4), length=9)
    padded = {name: torch.cat([t, torch.zeros(3, 23, dtype=t.dtype)], 1) for name, t in dynamic.items()}
    with torch.no_grad():
        a, b = model(**dynamic), model(**padded)
    width = min(retention[-1], 9)
    assert a.last_hidden_state.shape == b.last_hidden_state.shape == (3, width, 32)
    assert torch.equal(a.kept_mask, b.kept_mask) and torch.equal(a.kept_positions, b.kept_positions)
    torch.testing.assert_close(a.last_hidden_state[a.kept_mask], b.last_hidden_state[b.kept_mask],
                               atol=1e-5, rtol=1e-5)
    expected, positions = spec_outputs(model, dynamic, retention)
    assert b.kept_positions.tolist() == [p[:width] for p in positions]


def test_static_layout_keeps_the_input_shape_and_the_values():
    dynamic = powerbert.patch(build(BertModel), RETENTION)
    static = powerbert.patch(build(BertModel), RETENTION, static_shapes=True)
    inputs = batch(sizes=(5, 4, 2), length=12)  # every row shorter than k_1 = 9 < N = 12
    with torch.no_grad():
        a, b = dynamic(**inputs), static(**inputs)
    assert a.last_hidden_state.shape == (3, 3, 32) and b.last_hidden_state.shape == (3, 3, 32)
    torch.testing.assert_close(a.last_hidden_state[a.kept_mask], b.last_hidden_state[b.kept_mask],
                               atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        full = static(**batch(sizes=(5, 4, 2), length=12), output_hidden_states=True)
        short = dynamic(**batch(sizes=(5, 4, 2), length=12), output_hidden_states=True)
    assert [h.shape[1] for h in full.hidden_states] == [12, 9, 6, 3]
    assert [h.shape[1] for h in short.hidden_states] == [5, 5, 5, 3]


def test_static_shapes_is_validated():
    with pytest.raises(TypeError, match="static_shapes"):
        powerbert.patch(build(BertModel), RETENTION, static_shapes="yes")


@pytest.mark.parametrize("static", [None, True])
@pytest.mark.parametrize("retention", [(9, 6, 3), (0.7, 0.45, 0.2)], ids=["fixed", "proportional"])
@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_a_batch_whose_mask_is_all_zero_gives_finite_outputs(cls, retention, static):
    """Every row empty (attention_mask all 0): stock gives finite outputs, and so does a patched
    model, its slots all masked; no kernel message about k."""
    inputs = batch()
    inputs["attention_mask"] = torch.zeros_like(inputs["attention_mask"])
    model = powerbert.patch(build(cls), retention, static_shapes=static)
    with torch.no_grad():
        out = model(**inputs)
    if cls is BertModel:
        assert torch.isfinite(out.last_hidden_state).all()
        assert not out.kept_mask.any()
    else:
        assert torch.isfinite(out.logits).all() and out.logits.shape == (4, 3)
