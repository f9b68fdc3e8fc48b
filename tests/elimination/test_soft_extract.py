"""Soft extract (powerbert/ALGORITHM.md §3, §8): ranking, rank-wise scaling (absolute and relative rank), projection,
regulariser, read-out."""
import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification, BertModel

import powerbert
from powerbert.elimination.families import LayerParts
from powerbert.elimination.soft_extract import (
    attach_soft_extract,
    configuration_from_masses,
    fractions_from_shares,
    relative_scale,
    soft_extract_layer,
    soft_ranks,
)

INF = float("inf")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls=BertModel, attn="sdpa", layers=3):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = cls(config)
    model.set_attn_implementation(attn)
    return model.eval()


def padded_batch(sizes=(12, 9, 4, 1), length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (len(sizes), length), generator=g)
    mask = torch.zeros(len(sizes), length, dtype=torch.long)
    for row, size in enumerate(sizes):
        mask[row, :size] = 1
    return dict(input_ids=ids * mask, attention_mask=mask)


# ----------------------------------------------------------------------------- ranking


def test_ranks_cls_first_ties_by_lower_index_padding_last():
    scores = torch.tensor([[0.5, 2.0, 1.0, 2.0, -INF]])
    # [CLS] forced to rank 0; 2.0 at positions 1 and 3 tie -> position 1 first; padding last.
    assert soft_ranks(scores).tolist() == [[0, 1, 3, 2, 4]]
    # The released code's variant: [CLS] ranked by its score like any other position.
    assert soft_ranks(scores, cls_first=False).tolist() == [[3, 0, 2, 1, 4]]


def test_ranks_nan_counts_as_minus_inf_like_every_selection_path():
    nan = float("nan")
    negative_nan = torch.tensor([-0x400000], dtype=torch.int32).view(torch.float32).item()  # sign bit set
    scores = torch.tensor([[nan, nan, 1.0, negative_nan, 2.0, -INF]])
    # NaN ranks like -inf: after every number, ties (with padding too) to the lower index.
    assert soft_ranks(scores).tolist() == [[0, 3, 2, 4, 1, 5]]
    assert soft_ranks(scores, cls_first=False).tolist() == [[2, 3, 1, 4, 0, 5]]


def _hand_layer() -> LayerParts:
    """D = 2, one head. Every query row gets the same probabilities softmax_j(x[j, 1] / sqrt 2),
    so the significance order of the real keys is the order of x[:, 1]. Value, attention output
    and FFN output are zero and both norms the identity, so the layer returns a * r[rank] = x * r[rank]."""

    def linear(weight, bias):
        layer = nn.Linear(2, 2)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor(weight))
            layer.bias.copy_(torch.tensor(bias))
        return layer

    zero = ([[0.0, 0.0], [0.0, 0.0]], [0.0, 0.0])
    return LayerParts(
        query=linear(*zero[:1], [1.0, 0.0]), key=linear([[0.0, 1.0], [0.0, 0.0]], [0.0, 0.0]),
        value=linear(*zero), num_heads=1, probs_dropout=nn.Dropout(0.0), attn_out=linear(*zero),
        attn_dropout=nn.Dropout(0.0), attn_norm=nn.Identity(), ffn_in=linear(*zero), ffn_act=torch.relu,
        ffn_out=linear(*zero), ffn_dropout=nn.Dropout(0.0), ffn_norm=nn.Identity(),
    )


def test_layer_scales_rank_p_by_r_p_hand_checked():
    parts = _hand_layer()
    x = torch.tensor([
        [[1.0, 0.0], [2.0, 1.0], [3.0, 3.0], [4.0, 2.0]],  # order 2 > 3 > 1 > 0: ranks 0(CLS),3,1,2
        [[1.0, 0.0], [2.0, 1.0], [3.0, 3.0], [4.0, 2.0]],  # position 3 padded: ranks 0,2,1,3
        [[1.0, 5.0], [2.0, 1.0], [3.0, 1.0], [4.0, 0.5]],  # tie 1 = 2 -> 1 first; CLS forced: 0,1,2,3
    ])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    r = torch.tensor([1.0, 0.9, 0.5, 0.2, 0.7], requires_grad=True)  # N = 5 > n = 4
    y = soft_extract_layer(parts, x, mask, r, padded=True)
    scale = torch.tensor([[1.0, 0.2, 0.9, 0.5], [1.0, 0.5, 0.9, 0.2], [1.0, 0.9, 0.5, 0.2]])
    torch.testing.assert_close(y, x * scale[..., None])
    # Mask untouched, nothing removed; the gradient of r[p] is the sum over the vectors at rank p.
    w = torch.randn_like(y)
    (y * w).sum().backward()
    per_position = (x * w).sum(-1)  # d/d scale of each position
    ranks = torch.tensor([[0, 3, 1, 2], [0, 2, 1, 3], [0, 1, 2, 3]])
    expected = torch.zeros(5).index_add_(0, ranks.flatten(), per_position.flatten())
    torch.testing.assert_close(r.grad, expected)


# ----------------------------------------------------------------------------- model level


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_ones_equals_stock_and_detach_restores(attn):
    model = tiny(BertForSequenceClassification, attn)
    inputs = padded_batch()
    with torch.no_grad():
        stock = model(**inputs).logits
        soft = attach_soft_extract(model, 12)
        assert soft.retention.shape == (3, 12) and torch.all(soft.retention == 1)
        torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=1e-5)
        assert set(soft.state_dict()) == {"retention"}  # the model is not a submodule
        soft.detach()
        assert "forward" not in model.bert.encoder.__dict__
        torch.testing.assert_close(model(**inputs).logits, stock)
    with pytest.raises(RuntimeError):
        soft.detach()


def test_attach_rejects_patched_twice_and_too_long():
    model = tiny(BertForSequenceClassification)
    soft = attach_soft_extract(model, 8)
    with pytest.raises(RuntimeError, match="already"):
        attach_soft_extract(model, 8)
    with pytest.raises(ValueError, match="max_length"):
        model(**padded_batch(sizes=(12,), length=12))
    soft.detach()
    powerbert.patch(model, [4, 2, 1])
    with pytest.raises(RuntimeError, match="patched"):
        attach_soft_extract(model, 8)
    with pytest.raises(ValueError):
        attach_soft_extract(tiny(), 0)


def test_scaling_changes_output_and_gradients_reach_model_and_r():
    model = tiny(BertForSequenceClassification).train()
    soft = attach_soft_extract(model, 12)
    with torch.no_grad():
        soft.retention[:, 3:] = 0.25
    inputs = padded_batch(sizes=(8, 5, 3, 1))
    logits = model(**inputs).logits
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1, 0])) + soft.regularizer(1e-3)
    loss.backward()
    assert soft.retention.grad is not None and soft.retention.grad[:, :8].abs().sum() > 0
    for name, p in model.named_parameters():
        if "pooler" not in name and "classifier" not in name and "embeddings" not in name:
            assert p.grad is not None, name
    # Ranks 8.. hold only padding (the longest sequence has 8 tokens): only the regulariser reaches them.
    expected = 1e-3 * torch.arange(1, 4, dtype=torch.float32)[:, None].expand(3, 4)
    torch.testing.assert_close(soft.retention.grad[:, 8:], expected)


def test_project_keeps_r_in_unit_interval_after_steps():
    model = tiny(BertForSequenceClassification).train()
    soft = attach_soft_extract(model, 12)
    optimizer = torch.optim.SGD(soft.parameters(), lr=50.0)  # large steps leave [0, 1] without projection
    inputs = padded_batch()
    for _ in range(3):
        loss = -model(**inputs).logits[:, 0].sum() + soft.regularizer(0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        soft.project_()
        assert soft.retention.min() >= 0 and soft.retention.max() <= 1
    assert (soft.retention < 1).any()


def test_regularizer_value():
    soft = attach_soft_extract(tiny(), 4)
    with torch.no_grad():
        soft.retention.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.5, 0.0], [0.25, 0.25, 0.0, 0.0]]))
    torch.testing.assert_close(soft.masses(), torch.tensor([4.0, 2.5, 0.5]))
    # lambda * (1 * 4 + 2 * 2.5 + 3 * 0.5) = 0.01 * 10.5
    torch.testing.assert_close(soft.regularizer(0.01), torch.tensor(0.105))
    assert soft.configuration() == (4, 2, 1)


def test_configuration_read_out():
    assert configuration_from_masses([5.7, 6.2, 2.0, 0.3]) == (5, 5, 2, 1)  # floor, min with previous, >= 1
    assert configuration_from_masses([0.0, 0.0]) == (1, 1)
    assert configuration_from_masses([3.0, 2.9999999]) == (3, 3)  # float noise of an exact mass
    assert configuration_from_masses([12.0, 1.5, 7.9]) == (12, 1, 1)


# One tiny sequence-classification config per family (skipped where families.py lacks it).
FAMILY_MODELS = {
    "BERT": ("BertConfig", "BertForSequenceClassification", {}),
    "ALBERT": ("AlbertConfig", "AlbertForSequenceClassification", {"embedding_size": 16}),
    "RoBERTa": ("RobertaConfig", "RobertaForSequenceClassification", {"pad_token_id": 1}),
    "DistilBERT": ("DistilBertConfig", "DistilBertForSequenceClassification",
                   {"dim": 32, "n_layers": 3, "n_heads": 4, "hidden_dim": 64}),
    "ELECTRA": ("ElectraConfig", "ElectraForSequenceClassification", {"embedding_size": 16}),
}


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_every_family_all_ones_equals_stock_and_trains(family):
    import transformers

    from powerbert.elimination.families import FAMILIES

    if family not in {f.name for f in FAMILIES}:
        pytest.skip(f"{family} is not in powerbert.elimination.families yet")
    config_name, model_name, extra = FAMILY_MODELS[family]
    values = dict(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, num_labels=2, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(getattr(transformers, config_name)(**values)).eval()
    inputs = padded_batch(sizes=(12, 7, 3))
    inputs["input_ids"] = inputs["input_ids"].clamp(min=2) * inputs["attention_mask"] + (1 - inputs["attention_mask"])
    with torch.no_grad():
        stock = model(**inputs).logits
        soft = attach_soft_extract(model, 12)
        torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=1e-5)
    model.train()
    with torch.no_grad():
        soft.retention[:, 4:] = 0.5
    model(**inputs).logits.sum().backward()
    assert soft.retention.grad[:, :7].abs().sum() > 0
    soft.detach()
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(**inputs).logits, stock)


# ----------------------------------------------------------------------------- proportional mode (§8)


def test_relative_scale_hand_checked():
    # G = 4 bins of relative rank: r is 1 on [0, .25), .8 on [.25, .5), .4 on [.5, .75), 0 on [.75, 1).
    r = torch.tensor([1.0, 0.8, 0.4, 0.0], requires_grad=True)
    ranks = torch.tensor([[0, 1, 2, 3], [0, 2, 1, 3], [0, 1, 2, 3], [0, 1, 2, 3]])
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    scale = relative_scale(r, ranks, mask)
    expected = torch.tensor([
        # len 2: rank 0 covers [0, .5) -> (1 + .8) / 2; rank 1 covers [.5, 1) -> (.4 + 0) / 2; padding 1
        [0.9, 0.2, 1.0, 1.0],
        # len 3: rank 0 [0, 1/3) -> 3 * (.25 + .8 / 12) = .95; rank 1 [1/3, 2/3) -> 3 * (.8 / 6 + .4 / 6) = .6;
        # rank 2 [2/3, 1) -> 3 * (.4 / 12) = .1 (position 1 holds rank 2, position 2 rank 1)
        [0.95, 0.1, 0.6, 1.0],
        [1.0, 0.8, 0.4, 0.0],  # len = G: rank p is scaled by r[p], exactly as in fixed mode
        [0.55, 1.0, 1.0, 1.0],  # len 1: [CLS] covers [0, 1), the mean of r
    ], dtype=torch.float64)
    torch.testing.assert_close(scale, expected)
    # A sequence's scales sum to len * share: d(sum of its scales) / d r[g] = len / G, padding adds nothing.
    (scale * mask).sum().backward()
    torch.testing.assert_close(r.grad, torch.full((4,), (2 + 3 + 4 + 1) / 4))


@pytest.mark.parametrize("length", [1, 5, 12, 13, 64])
def test_relative_scale_all_ones_is_one_and_sums_to_len_times_share(length):
    g = torch.Generator().manual_seed(length)
    bins = 12
    mask = torch.ones(1, length, dtype=torch.bool)
    ranks = torch.randperm(length, generator=g)[None]
    ones = relative_scale(torch.ones(bins), ranks, mask)
    torch.testing.assert_close(ones, torch.ones(1, length, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(ones.float(), torch.ones(1, length))  # exact at the model's precision
    r = torch.rand(bins, generator=g)
    scale = relative_scale(r, ranks, mask)
    torch.testing.assert_close(scale.sum(), length * r.double().mean())
    assert scale.min() >= r.double().min() - 1e-9 and scale.max() <= r.double().max() + 1e-9  # averages of r


def test_proportional_layer_scales_by_relative_rank_hand_checked():
    parts = _hand_layer()
    x = torch.tensor([
        [[1.0, 0.0], [2.0, 1.0], [3.0, 3.0], [4.0, 2.0]],  # len 4, order 2 > 3 > 1: ranks 0(CLS),3,1,2
        [[1.0, 0.0], [2.0, 1.0], [3.0, 3.0], [4.0, 2.0]],  # len 3 (position 3 padded): ranks 0,2,1,(3)
    ])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    r = torch.tensor([1.0, 0.8, 0.4, 0.0])
    y = soft_extract_layer(parts, x, mask, r, padded=True, relative=True)
    scale = torch.tensor([[1.0, 0.0, 0.8, 0.4], [0.95, 0.1, 0.6, 1.0]])
    torch.testing.assert_close(y, x * scale[..., None])


def proportional(model, length=12, shares=None):
    soft = attach_soft_extract(model, length, mode="proportional")
    if shares is not None:
        with torch.no_grad():
            soft.retention.copy_(shares)
    return soft


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_proportional_all_ones_equals_stock(attn):
    model = tiny(BertForSequenceClassification, attn)
    inputs = padded_batch()
    with torch.no_grad():
        stock = model(**inputs).logits
        soft = proportional(model)
        assert soft.mode == "proportional" and soft.configuration() == (1.0, 1.0, 1.0)
        assert all(isinstance(f, float) for f in soft.configuration())
        torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=1e-5)
        soft.detach()
        torch.testing.assert_close(model(**inputs).logits, stock)


def test_proportional_full_length_rows_equal_fixed_mode():
    # With G = N, a sequence of N real tokens is scaled exactly as in fixed mode.
    model = tiny(BertModel)
    inputs = padded_batch(sizes=(12, 12), length=12)
    r = torch.rand(3, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        soft = attach_soft_extract(model, 12)
        soft.retention.copy_(r)
        fixed = model(**inputs).last_hidden_state
        soft.detach()
        proportional(model, shares=r)
        torch.testing.assert_close(model(**inputs).last_hidden_state, fixed, atol=1e-6, rtol=1e-6)


def test_proportional_padding_never_reaches_real_tokens():
    # Each row gives the same outputs alone (no padding, its own length) as in a padded batch,
    # and whatever the padding holds.
    model = tiny(BertModel)
    sizes = (12, 9, 4, 1)
    inputs = padded_batch(sizes=sizes)
    r = torch.rand(3, 12, generator=torch.Generator().manual_seed(5))
    proportional(model, shares=r)
    with torch.no_grad():
        together = model(**inputs).last_hidden_state
        noisy = dict(inputs, input_ids=inputs["input_ids"] + (1 - inputs["attention_mask"]) * 50)
        other = model(**noisy).last_hidden_state
        for row, size in enumerate(sizes):
            alone = model(**{name: t[row:row + 1, :size] for name, t in inputs.items()}).last_hidden_state
            torch.testing.assert_close(together[row, :size], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(other[row, :size], alone[0], atol=1e-5, rtol=1e-5)


def test_proportional_gradients_reach_every_bin_and_the_model():
    model = tiny(BertForSequenceClassification).train()
    soft = proportional(model, shares=torch.full((3, 12), 0.6))
    inputs = padded_batch(sizes=(8, 5, 3, 2))  # every row shorter than N: fixed mode leaves ranks 8.. alone
    logits = model(**inputs).logits
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 1, 0])).backward()
    # Every bin of relative rank overlaps every sequence's ranks, so every bin hears the task...
    assert (soft.retention.grad[:-1] != 0).all()
    # ... except in the last layer, where the head reads [CLS] alone: rank 0 covers [0, 1 / len),
    # at most [0, 1/2) here, bins 0-5 of 12.
    assert (soft.retention.grad[-1, :6] != 0).all() and (soft.retention.grad[-1, 6:] == 0).all()
    for name, p in model.named_parameters():
        if "pooler" not in name and "classifier" not in name and "embeddings" not in name:
            assert p.grad is not None, name


def test_proportional_regularizer_value_and_read_out():
    soft = attach_soft_extract(tiny(), 4, mode="proportional")
    with torch.no_grad():
        soft.retention.copy_(torch.tensor([[1.0, 1.0, 1.0, 0.6], [1.0, 1.0, 0.5, 0.0], [0.25, 0.25, 0.0, 0.0]]))
    torch.testing.assert_close(soft.shares(), torch.tensor([0.9, 0.625, 0.125]))
    # mass(l) = share(l) * the batch's mean real length (here 6): lambda * (1 * 5.4 + 2 * 3.75 + 3 * 0.75)
    lengths = torch.tensor([4, 8, 3, 9])
    torch.testing.assert_close(soft.masses(lengths), torch.tensor([5.4, 3.75, 0.75]))
    torch.testing.assert_close(soft.regularizer(0.01, lengths), torch.tensor(0.01 * 15.15))
    # without lengths: len = N = G, the fixed-mode formula sum_g r_l[g]
    torch.testing.assert_close(soft.regularizer(0.01), torch.tensor(0.01 * (3.6 + 2 * 2.5 + 3 * 0.5)))
    configuration = soft.configuration()
    assert configuration == (0.9, 0.625, 0.25) and all(isinstance(f, float) for f in configuration)
    # (0.125 is below one bin, 1 / G = 0.25: the read-out's floor)


def test_fractions_read_out():
    assert fractions_from_shares([0.73214, 0.80001, 0.5, 0.0], 64) == (0.7321, 0.7321, 0.5, 0.0156)
    assert fractions_from_shares([1.0, 0.99999994], 8) == (1.0, 1.0)  # float noise of a full share
    assert fractions_from_shares([0.0], 100_000) == (0.0001,)  # never 0 after rounding
    out = fractions_from_shares([1.0], 64)
    assert out == (1.0,) and isinstance(out[0], float)
    # What a read-out gives, powerbert.patch accepts.
    model = powerbert.patch(tiny(), list(fractions_from_shares([0.9, 0.95, 0.4], 12)))
    assert powerbert.patched_retention(model) == (0.9, 0.9, 0.4)


def test_proportional_mode_is_validated_and_projects():
    with pytest.raises(ValueError, match="mode must be one of fixed, proportional"):
        attach_soft_extract(tiny(), 8, mode="relative")
    model = tiny(BertForSequenceClassification).train()
    soft = proportional(model)
    optimizer = torch.optim.SGD(soft.parameters(), lr=50.0)
    inputs = padded_batch()
    loss = -model(**inputs).logits[:, 0].sum() + soft.regularizer(0.5, inputs["attention_mask"].sum(1))
    loss.backward()
    optimizer.step()
    soft.project_()
    assert soft.retention.min() >= 0 and soft.retention.max() <= 1 and (soft.retention < 1).any()
    assert list(soft.configuration()) == sorted(soft.configuration(), reverse=True)
