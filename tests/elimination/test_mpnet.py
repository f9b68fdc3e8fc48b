"""MPNet: the relative-position bias after elimination (powerbert/ALGORITHM.md §9).

The generic family tests (``test_families.py``: keep-all equals stock, fixed elimination and the
heads against the spec, round trips, soft extract) run MPNet too; here are what only a family
with a position bias needs: per-row proportional selection against each row alone, the bias of
every layer built from that layer's survivors only, padding on either side with MPNet's own
position ids, and ``torch.export``.
"""
import pytest
import torch
from transformers import MPNetForMultipleChoice, MPNetForSequenceClassification, MPNetModel

import powerbert
from spec_reference import spec_encoder
from test_families import CASES, LENGTH, VOCAB
from test_families import build as family_build
from tiny_mpnet import each_row_alone

SIZES = (13, 11, 7, 4, 2)
FRACTIONS = (0.8, 0.5, 0.3)
PAD = 1  # MPNet's padding id: its position ids count the tokens that are not PAD


def batch(sizes=SIZES, length=LENGTH, seed=3, left=False):
    """Random ids in [2, VOCAB), padded with PAD on the right (or the left)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(sizes), length), PAD)
    mask = torch.zeros(len(sizes), length, dtype=torch.long)
    for row, size in enumerate(sizes):
        span = slice(length - size, length) if left else slice(0, size)
        ids[row, span] = torch.randint(2, VOCAB, (size,), generator=g)
        mask[row, span] = 1
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.parametrize("static", [False, True])
def test_each_row_equals_the_row_alone(static):
    model = family_build("mpnet")
    inputs = batch()
    expected, positions = each_row_alone(model, inputs, FRACTIONS)
    powerbert.patch(model, list(FRACTIONS), static_shapes=static)
    with torch.no_grad():
        out = model(**inputs)
    for row, (reference, kept) in enumerate(zip(expected, positions)):
        real = out.kept_mask[row]
        assert out.kept_positions[row][real].tolist() == kept  # selection exact, in order
        torch.testing.assert_close(out.last_hidden_state[row][real], reference, atol=3e-5, rtol=3e-5)


def test_elimination_changes_the_bias_and_the_spec_sees_it():
    """The §9 bias matters: the spec without it (slot indices as stock would use them after
    elimination would be wrong, and so is no bias) disagrees with the patched model."""
    model = family_build("mpnet")
    inputs = batch()
    retention = (9, 5, 3)
    with torch.no_grad():
        hidden = CASES["mpnet"].embed(model, inputs["input_ids"])
    layers = CASES["mpnet"].layers(model)
    bias = CASES["mpnet"].bias(model)
    slots = lambda positions: bias(list(range(len(positions))))  # noqa: E731 (the slot-index misreading)
    right, _ = spec_encoder(hidden, inputs["attention_mask"], layers, retention, position_bias=bias)
    wrong, _ = spec_encoder(hidden, inputs["attention_mask"], layers, retention, position_bias=slots)
    powerbert.patch(model, retention)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    torch.testing.assert_close(out, torch.stack(right), atol=3e-5, rtol=3e-5)
    assert not torch.allclose(out, torch.stack(wrong), atol=1e-3)


@pytest.mark.parametrize("padding", ["left", "right", "none"])
def test_each_layer_builds_only_its_own_bias(padding):
    """The bias table is read once per layer, for ``[B | 1, n_l, n_l]`` pairs: the vectors alive
    in that layer, never the input's ``[B, N, N]`` again; rows sharing positions (right padding
    or none, before any elimination: slots 0..n-1) share one."""
    model = family_build("mpnet")
    inputs = batch(sizes=(LENGTH,) * 4) if padding == "none" else batch(left=padding == "left")
    retention = (9, 5, 3)
    shapes = []
    handle = model.encoder.relative_attention_bias.register_forward_hook(
        lambda module, args, out: shapes.append(tuple(out.shape)))
    powerbert.patch(model, retention)
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    rows = inputs["input_ids"].shape[0]
    first = rows if padding == "left" else 1
    assert shapes == [(first, LENGTH, LENGTH, 4), (rows, 9, 9, 4), (rows, 5, 5, 4)]


@pytest.mark.parametrize("cls", [MPNetModel, MPNetForSequenceClassification])
def test_left_and_right_padding_agree_with_mpnet_position_ids(cls):
    """No position ids passed: MPNet derives them from PAD. Stock's real-token vectors agree
    across padding sides (its bias sees offsets only), but its heads and pooler read slot 0,
    which left padding fills with PAD. The patched model moves [CLS] to slot 0 (§7): left equals
    right equals stock right-padded, for keep-all, fixed and proportional elimination."""
    model = family_build("mpnet", cls)
    right, left = batch(), batch(left=True)
    key = "logits" if cls is MPNetForSequenceClassification else "pooler_output"
    with torch.no_grad():
        stock_right = model(**right)
        if cls is MPNetModel:
            real_left = model(**left).last_hidden_state[left["attention_mask"].bool()]
            real_right = stock_right.last_hidden_state[right["attention_mask"].bool()]
            torch.testing.assert_close(real_left, real_right, atol=1e-5, rtol=1e-5)
        for retention in ([LENGTH] * 3, (9, 5, 3), list(FRACTIONS)):
            powerbert.patch(model, retention)
            a, b = model(**right), model(**left)
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-5)
            if retention == [LENGTH] * 3:
                torch.testing.assert_close(a[key], stock_right[key], atol=1e-5, rtol=1e-5)
            else:
                assert not torch.allclose(a[key], stock_right[key], atol=1e-6, rtol=0)  # elimination did something
            if cls is MPNetModel:
                ids_a = torch.gather(right["input_ids"], 1, a.kept_positions)[a.kept_mask]
                ids_b = torch.gather(left["input_ids"], 1, b.kept_positions)[b.kept_mask]
                assert torch.equal(ids_a, ids_b)
            powerbert.unpatch(model)


def test_multiple_choice_padding_sides_agree():
    model = family_build("mpnet", MPNetForMultipleChoice)
    right, left = batch(sizes=(13, 9, 4, 12, 6, 2)), batch(sizes=(13, 9, 4, 12, 6, 2), left=True)
    powerbert.patch(model, (9, 5, 2))
    with torch.no_grad():
        a = model(**{k: t.view(2, 3, LENGTH) for k, t in right.items()}).logits
        b = model(**{k: t.view(2, 3, LENGTH) for k, t in left.items()}).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_keeps_the_fp32_selection(dtype):
    """The bias joins the logits in the model's dtype; selections match fp32 on clear inputs."""
    model = family_build("mpnet")
    inputs = batch()
    powerbert.patch(model, (9, 5, 3))
    with torch.no_grad():
        reference = model(**inputs)
        half = model.to(dtype)(**inputs)
    assert half.last_hidden_state.dtype == dtype
    agree = (half.kept_positions == reference.kept_positions).float().mean()
    assert agree >= 0.9
    assert torch.isfinite(half.last_hidden_state.float()).all()


@pytest.mark.parametrize("retention", [(9, 5, 3), [0.8, 0.5, 0.3]], ids=["fixed", "proportional"])
def test_torch_export_takes_any_batch_and_length(retention):
    from powerbert.deployment import export_program

    model = family_build("mpnet", MPNetForSequenceClassification)
    powerbert.patch(model, retention)
    example = batch(sizes=(13, 6), seed=5)
    program = export_program(model, example, "sequence-classification").module()
    for sizes, length in [((4,), 4), ((12, 3, 8), 12), ((13, 13, 2, 7, 1), 13)]:
        inputs = batch(sizes=sizes, length=length, seed=len(sizes))
        with torch.no_grad():
            expected = model(**inputs).logits
            got = program(inputs["input_ids"], inputs["attention_mask"])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
