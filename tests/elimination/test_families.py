"""powerbert.patch across model families: ALBERT, RoBERTa, XLM-RoBERTa, DistilBERT, ELECTRA, MPNet.

Every family runs through the one eliminating layer (``powerbert/elimination/layer.py``) via its entry in
``powerbert/elimination/families.py``. Here each family gets a small *test-side* adapter that pulls the
same modules out of the model independently and feeds them to the spec implementation
(``spec_reference.spec_encoder``), so a wrong family description (a missed projection, a
norm in the wrong place, a wrong number of ALBERT applications) shows up as a mismatch.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from transformers import (
    AlbertConfig,
    AlbertForMultipleChoice,
    AlbertForSequenceClassification,
    AlbertForTokenClassification,
    AlbertModel,
    DistilBertConfig,
    DistilBertForMultipleChoice,
    DistilBertForTokenClassification,
    DistilBertForSequenceClassification,
    DistilBertModel,
    ElectraConfig,
    ElectraForMultipleChoice,
    ElectraForSequenceClassification,
    ElectraForTokenClassification,
    ElectraModel,
    MPNetConfig,
    MPNetForMaskedLM,
    MPNetForMultipleChoice,
    MPNetForQuestionAnswering,
    MPNetForSequenceClassification,
    MPNetForTokenClassification,
    MPNetModel,
    RobertaConfig,
    RobertaForMultipleChoice,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
    XLMRobertaConfig,
    XLMRobertaForMultipleChoice,
    XLMRobertaForSequenceClassification,
    XLMRobertaForTokenClassification,
    XLMRobertaModel,
)

import powerbert
from spec_reference import spec_encoder
from tiny_mpnet import mpnet_bias, mpnet_layers, relative_bucket

LAYERS, LENGTH, VOCAB = 3, 13, 101
COMMON = dict(vocab_size=VOCAB, max_position_embeddings=64, num_labels=3)
BERTLIKE = dict(COMMON, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, intermediate_size=64)


# ---------------------------------------------------------------- per-family test adapters


def _bertlike_layer(layer) -> dict:
    sa, out = layer.attention.self, layer.attention.output
    return dict(
        q=sa.query, k=sa.key, v=sa.value, heads=sa.num_attention_heads, o=out.dense, ln1=out.LayerNorm,
        ffn_in=layer.intermediate.dense, act=layer.intermediate.intermediate_act_fn,
        ffn_out=layer.output.dense, ln2=layer.output.LayerNorm,
    )


def _albert_layers(base) -> list[dict]:
    # Unrolled the way AlbertTransformer.forward runs it: L applications of a group, each
    # group running its inner layers in order.
    cfg, layers = base.config, []
    for i in range(cfg.num_hidden_layers):
        group = base.encoder.albert_layer_groups[i * cfg.num_hidden_groups // cfg.num_hidden_layers]
        for layer in group.albert_layers:
            att = layer.attention
            layers.append(dict(
                q=att.query, k=att.key, v=att.value, heads=att.num_attention_heads, o=att.dense,
                ln1=att.LayerNorm, ffn_in=layer.ffn, act=layer.activation, ffn_out=layer.ffn_output,
                ln2=layer.full_layer_layer_norm,
            ))
    return layers


def _distilbert_layers(base) -> list[dict]:
    return [
        dict(
            q=b.attention.q_lin, k=b.attention.k_lin, v=b.attention.v_lin, heads=b.attention.n_heads,
            o=b.attention.out_lin, ln1=b.sa_layer_norm, ffn_in=b.ffn.lin1, act=b.ffn.activation,
            ffn_out=b.ffn.lin2, ln2=b.output_layer_norm,
        )
        for b in base.transformer.layer
    ]


def _electra_embed(base, ids):
    hidden = base.embeddings(input_ids=ids)
    return base.embeddings_project(hidden) if hasattr(base, "embeddings_project") else hidden


@dataclass
class Case:
    """How the tests build, run and independently take apart one family."""

    config: Callable
    base: type
    head: type
    unsupported: tuple
    base_attr: str
    embed: Callable  # (base, ids [B, N]) -> vectors entering layer 1 [B, N, D]
    layers: Callable  # base -> list of spec_reference layer dicts, one per application
    cls_logits: Callable  # (head model, final vectors [B, k, D]) -> logits [B, labels]
    multiple_choice: type | None = None
    applications: int = LAYERS
    bias: Callable | None = None  # base -> (original positions -> [H, n, n]) for spec_encoder, or None
    loads_as: str = "sdpa"  # the attn_implementation from_pretrained accepts (MPNet: eager only)


CASES = {
    "albert": Case(
        config=lambda **kw: AlbertConfig(**{**BERTLIKE, "embedding_size": 16, **kw}),
        base=AlbertModel, head=AlbertForSequenceClassification,
        unsupported=(AlbertForTokenClassification,), base_attr="albert",
        # embedding_hidden_mapping_in lives in the encoder; the patched forward runs it via `enter`.
        embed=lambda base, ids: base.encoder.embedding_hidden_mapping_in(base.embeddings(input_ids=ids)),
        layers=_albert_layers,
        cls_logits=lambda m, h: m.classifier(m.albert.pooler_activation(m.albert.pooler(h[:, 0]))),
        multiple_choice=AlbertForMultipleChoice,
    ),
    "roberta": Case(
        config=lambda **kw: RobertaConfig(**{**BERTLIKE, **kw}),
        base=RobertaModel, head=RobertaForSequenceClassification,
        unsupported=(RobertaForTokenClassification,), base_attr="roberta",
        embed=lambda base, ids: base.embeddings(input_ids=ids),
        layers=lambda base: [_bertlike_layer(layer) for layer in base.encoder.layer],
        cls_logits=lambda m, h: m.classifier(h),  # RobertaClassificationHead reads features[:, 0, :]
        multiple_choice=RobertaForMultipleChoice,
    ),
    "xlm-roberta": Case(
        config=lambda **kw: XLMRobertaConfig(**{**BERTLIKE, **kw}),
        base=XLMRobertaModel, head=XLMRobertaForSequenceClassification,
        unsupported=(XLMRobertaForTokenClassification,), base_attr="roberta",
        embed=lambda base, ids: base.embeddings(input_ids=ids),
        layers=lambda base: [_bertlike_layer(layer) for layer in base.encoder.layer],
        cls_logits=lambda m, h: m.classifier(h),
        multiple_choice=XLMRobertaForMultipleChoice,
    ),
    "distilbert": Case(
        config=lambda **kw: DistilBertConfig(
            **{**COMMON, "dim": 32, "n_layers": LAYERS, "n_heads": 4, "hidden_dim": 64, **kw}
        ),
        base=DistilBertModel, head=DistilBertForSequenceClassification,
        unsupported=(DistilBertForTokenClassification,), base_attr="distilbert",
        embed=lambda base, ids: base.embeddings(ids),
        layers=_distilbert_layers,
        cls_logits=lambda m, h: m.classifier(torch.relu(m.pre_classifier(h[:, 0]))),
        multiple_choice=DistilBertForMultipleChoice,
    ),
    "electra": Case(
        # embedding_size != hidden_size: ElectraModel projects before the encoder.
        config=lambda **kw: ElectraConfig(**{**BERTLIKE, "embedding_size": 16, **kw}),
        base=ElectraModel, head=ElectraForSequenceClassification,
        # MultipleChoice reads position 0 only for summary_type "first": refused, not guessed.
        unsupported=(ElectraForTokenClassification, ElectraForMultipleChoice), base_attr="electra",
        embed=_electra_embed,
        layers=lambda base: [_bertlike_layer(layer) for layer in base.encoder.layer],
        cls_logits=lambda m, h: m.classifier(h),  # ElectraClassificationHead reads features[:, 0, :]
    ),
    "mpnet": Case(
        # Stock MPNet runs eager attention only (set_attn_implementation("sdpa") leaves it eager).
        config=lambda **kw: MPNetConfig(**{**BERTLIKE, **kw}),
        base=MPNetModel, head=MPNetForSequenceClassification,
        unsupported=(MPNetForTokenClassification, MPNetForQuestionAnswering, MPNetForMaskedLM), base_attr="mpnet",
        embed=lambda base, ids: base.embeddings(input_ids=ids),
        layers=mpnet_layers,
        cls_logits=lambda m, h: m.classifier(h),  # MPNetClassificationHead reads features[:, 0, :]
        multiple_choice=MPNetForMultipleChoice,
        bias=mpnet_bias,
        loads_as="eager",
    ),
}
FAMILIES = list(CASES)
MC_FAMILIES = [name for name, case in CASES.items() if case.multiple_choice is not None]


def build(name, cls=None, attn="sdpa", **overrides):
    case = CASES[name]
    torch.manual_seed(0)
    model = (cls or case.base)(case.config(**overrides))
    with torch.no_grad():
        # Fresh LayerNorms are all identical (1, 0): randomise them, so a description that
        # names the wrong norm (e.g. DistilBERT's sa_ vs output_layer_norm) cannot pass.
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    model.set_attn_implementation(attn)
    return model.eval()


def base_of(name, model):
    return model if type(model) is CASES[name].base else getattr(model, CASES[name].base_attr)


def encoder_of(base):
    """The module whose forward patch replaces (DistilBERT calls it ``transformer``)."""
    return base.transformer if hasattr(base, "transformer") else base.encoder


def batch(sizes=(13, 9, 4, 1), length=LENGTH, seed=1):
    """Random ids in [2, VOCAB) with right padding (id 1, RoBERTa's pad), one row per real length."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(sizes), length), generator=g)
    mask = torch.zeros(len(sizes), length, dtype=torch.long)
    for row, size in enumerate(sizes):
        mask[row, :size] = 1
    return dict(input_ids=ids * mask + (1 - mask), attention_mask=mask)


def spec_outputs(name, base, inputs, retention):
    case = CASES[name]
    with torch.no_grad():
        hidden = case.embed(base, inputs["input_ids"])
    bias = None if case.bias is None else case.bias(base)
    return spec_encoder(hidden, inputs["attention_mask"], case.layers(base), retention, position_bias=bias)


# ---------------------------------------------------------------- equivalence


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["base", "head"])
@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_equals_stock(name, which, attn):
    case = CASES[name]
    model = build(name, case.base if which == "base" else case.head, attn)
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs)
        powerbert.patch(model, [LENGTH] * case.applications)
        patched = model(**inputs)
    compared = [key for key in ("last_hidden_state", "pooler_output", "logits") if stock.get(key) is not None]
    assert compared
    for key in compared:
        torch.testing.assert_close(patched[key], stock[key], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("retention", [(9, 6, 3), (12, 12, 1), (1, 1, 1)])
@pytest.mark.parametrize("name", FAMILIES)
def test_elimination_equals_spec(name, retention, attn):
    model = build(name, attn=attn)
    inputs = batch()
    expected, positions = spec_outputs(name, model, inputs, retention)
    powerbert.patch(model, retention)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert out.shape == (4, retention[-1], 32)
    torch.testing.assert_close(out, torch.stack(expected), atol=2e-5, rtol=2e-5)
    assert all(p[0] == 0 for p in positions)


@pytest.mark.parametrize("name", FAMILIES)
def test_classification_head_equals_spec(name):
    retention = (9, 6, 3)
    model = build(name, CASES[name].head)
    inputs = batch()
    expected, _ = spec_outputs(name, base_of(name, model), inputs, retention)
    with torch.no_grad():
        reference = CASES[name].cls_logits(model, torch.stack(expected))
        powerbert.patch(model, retention)  # cls_only_last_layer: the last layer runs for [CLS] only
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", MC_FAMILIES)
def test_multiple_choice_equals_spec(name):
    retention = (7, 4, 2)
    case = CASES[name]
    model = build(name, case.multiple_choice)
    flat = batch(sizes=(11, 8, 11, 3, 6, 10), length=11)
    inputs = {key: t.view(2, 3, 11) for key, t in flat.items()}
    expected, _ = spec_outputs(name, base_of(name, model), flat, retention)
    with torch.no_grad():
        stock = model(**inputs).logits
        final = torch.stack(expected)
        if name == "distilbert":
            pooled = torch.relu(model.pre_classifier(final[:, 0]))
        else:
            base = base_of(name, model)
            pooled = base.pooler(final) if name != "albert" else base.pooler_activation(base.pooler(final[:, 0]))
        reference = model.classifier(pooled).view(2, 3)
        powerbert.patch(model, retention)
        logits = model(**inputs).logits
    assert not torch.allclose(stock, reference)  # elimination changed something: the test can fail
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name", FAMILIES)
def test_dropout_placement_matches_stock_in_training(name):
    """Hidden dropout on, attention dropout off, keep-all: with the same seed the patched
    forward must draw the same dropout masks at the same places (ALBERT has none on the FFN
    output, DistilBERT none on the attention output), so the outputs match."""
    if name == "distilbert":
        dropouts = dict(dropout=0.3, attention_dropout=0.0)
    else:
        dropouts = dict(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.0)
    model = build(name, **dropouts).train()
    inputs = batch()
    with torch.no_grad():
        torch.manual_seed(5)
        stock = model(**inputs).last_hidden_state
        powerbert.patch(model, [LENGTH] * CASES[name].applications)
        torch.manual_seed(5)
        patched = model(**inputs).last_hidden_state
    torch.testing.assert_close(patched, stock, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- ALBERT weight sharing


ALBERT_GROUPED = dict(num_hidden_layers=4, num_hidden_groups=2, inner_group_num=2)  # 4 x 2 = 8 applications


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_albert_groups_each_application_has_its_own_retention(attn):
    retention = (12, 10, 8, 7, 5, 4, 3, 2)
    model = build("albert", AlbertForSequenceClassification, attn, **ALBERT_GROUPED)
    assert len(CASES["albert"].layers(model.albert)) == 8
    inputs = batch()
    expected, _ = spec_outputs("albert", model.albert, inputs, retention)
    with torch.no_grad():
        stock = model(**inputs).logits
        reference = CASES["albert"].cls_logits(model, torch.stack(expected))
        powerbert.patch(model, [LENGTH] * 8)
        torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=1e-5)
        powerbert.unpatch(model)
        powerbert.patch(model, retention)
        logits = model(**inputs).logits
    torch.testing.assert_close(logits, reference, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("overrides, applications", [({}, LAYERS), (ALBERT_GROUPED, 8)])
def test_albert_retention_length_is_the_number_of_applications(overrides, applications):
    model = build("albert", **overrides)
    wrong = [1] * (applications + 1)
    with pytest.raises(ValueError, match=f"{applications + 1} entries but the model has {applications} layers"):
        powerbert.patch(model, wrong)
    assert not powerbert.is_patched(model)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", FAMILIES)
def test_patch_unpatch_round_trip(name):
    model = build(name, CASES[name].head)
    encoder = encoder_of(base_of(name, model))
    state = {key: t.clone() for key, t in model.state_dict().items()}
    encoder_dict = dict(encoder.__dict__)
    config = model.config.to_dict()
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs).logits
        powerbert.patch(model, (5, 3, 2))
        assert model.config.powerbert_retention == [5, 3, 2]
        assert not torch.allclose(model(**inputs).logits, stock)
        powerbert.unpatch(model)
        again = model(**inputs).logits
    assert not powerbert.is_patched(model)
    assert dict(encoder.__dict__) == encoder_dict
    assert model.config.to_dict() == config
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], t) for key, t in state.items())
    torch.testing.assert_close(again, stock, atol=0, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_save_pretrained_round_trip(name, tmp_path):
    head = CASES[name].head
    model = build(name, head)
    inputs = batch()
    powerbert.patch(model, (6, 4, 2))
    with torch.no_grad():
        logits = model(**inputs).logits
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["powerbert_retention"] == [6, 4, 2]
    loaded = head.from_pretrained(tmp_path, attn_implementation=CASES[name].loads_as).eval()
    powerbert.patch(loaded)
    assert powerbert.patched_retention(loaded) == (6, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, logits, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- refusals and listing


@pytest.mark.parametrize("cls", [cls for case in CASES.values() for cls in case.unsupported], ids=lambda c: c.__name__)
def test_unsupported_heads_are_refused(cls):
    name = next(n for n, case in CASES.items() if cls in case.unsupported)
    model = build(name, cls)
    with pytest.raises(TypeError, match=f"does not support {cls.__name__}.*Supported models: BertModel"):
        powerbert.patch(model, (3, 2, 1))
    assert not powerbert.is_patched(model)


def test_supported_models_lists_every_family():
    names = powerbert.supported_models()
    for case in CASES.values():
        assert case.base.__name__ in names and case.head.__name__ in names
        for cls in case.unsupported:
            assert cls.__name__ not in names


@pytest.mark.parametrize("name", FAMILIES)
def test_family_model_types_match_configs(name):
    from powerbert.elimination.families import resolve

    model = build(name)
    family, base, cls_only = resolve(model)
    assert base is model and not cls_only
    assert model.config.model_type in family.model_types


# ---------------------------------------------------------------- soft extract (configuration search)


@pytest.mark.parametrize("name", FAMILIES)
def test_soft_extract_one_optimiser_step(name):
    from powerbert.elimination.soft_extract import attach_soft_extract

    case = CASES[name]
    model = build(name, case.head)
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs).logits
    soft = attach_soft_extract(model, LENGTH)
    assert tuple(soft.retention.shape) == (case.applications, LENGTH)
    with torch.no_grad():  # r = 1 everywhere scales nothing: the stock model
        torch.testing.assert_close(model(**inputs).logits, stock, atol=1e-5, rtol=1e-5)

    model.train()
    before = {key: p.detach().clone() for key, p in model.named_parameters()}
    optimiser = torch.optim.Adam([
        {"params": list(model.parameters()), "lr": 1e-3},
        {"params": list(soft.parameters()), "lr": 1e-2},
    ])
    labels = torch.tensor([0, 1, 2, 1])
    loss = torch.nn.functional.cross_entropy(model(**inputs).logits, labels) + soft.regularizer(1e-3)
    loss.backward()
    grad = soft.retention.grad
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    optimiser.step()
    soft.project_()
    assert soft.retention.min() >= 0 and soft.retention.max() <= 1 and soft.retention.min() < 1
    changed = [key for key, p in model.named_parameters() if not torch.equal(p, before[key])]
    assert any(".attention." in key or "q_lin" in key for key in changed), changed  # encoder weights train
    assert len(soft.configuration()) == case.applications

    soft.detach()
    assert "forward" not in vars(encoder_of(base_of(name, model)))


# ---------------------------------------------------------------- outputs every family gives


@pytest.mark.parametrize("name", FAMILIES)
def test_hidden_states_attentions_and_kept_vectors(name):
    """Keep-all: hidden states and attentions equal the stock (eager) ones; with elimination,
    hidden states follow the survivors and ``kept_positions`` equals the spec's."""
    case = CASES[name]
    inputs = batch()
    model = build(name, case.base, "eager")
    with torch.no_grad():
        stock = model(**inputs, output_hidden_states=True, output_attentions=True)
        powerbert.patch(model, [LENGTH] * case.applications)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == len(stock.hidden_states) == case.applications + 1
    for ours, theirs in zip(out.hidden_states, stock.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    assert len(out.attentions) == len(stock.attentions)
    for ours, theirs in zip(out.attentions, stock.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)

    powerbert.unpatch(model)
    retention = (9, 6, 5) if case.applications == 3 else (9,) * (case.applications - 1) + (5,)
    expected, positions = spec_outputs(name, model, inputs, retention)
    powerbert.patch(model, retention)
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    assert [h.shape[1] for h in out.hidden_states] == [LENGTH, *retention]
    torch.testing.assert_close(out.hidden_states[-1], torch.stack(expected), atol=2e-5, rtol=2e-5)
    assert out.kept_positions.tolist() == positions
    assert torch.equal(out.kept_mask, torch.gather(inputs["attention_mask"], 1, out.kept_positions).bool())


def test_mpnet_bucket_reference_is_stock_bucket():
    """The test-side bucket (``relative_bucket``) equals MPNet's own for every offset up to
    beyond max_distance, so ``mpnet_bias`` checks the positions fed to it, not a second formula."""
    from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

    offsets = torch.arange(-300, 301)
    stock = MPNetEncoder.relative_position_bucket(offsets, num_buckets=32)
    assert stock.tolist() == [relative_bucket(int(o)) for o in offsets]


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_qkv_projection_gives_the_same_outputs(name):
    """``fuse_qkv`` (what ``export_onnx`` does to the copy it exports) changes no value: one
    stacked GEMM for the query, key and value projections of every layer, ALBERT's shared layer
    once."""
    from powerbert.deployment import fuse_qkv
    from powerbert.elimination.layer import FUSED_QKV
    model = build(name, CASES[name].head)
    powerbert.patch(model, (9, 5, 2))
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).logits
        assert fuse_qkv(model) == (1 if name == "albert" else 3)
        assert fuse_qkv(model) == 0  # already fused
        after = model(**inputs).logits
    assert sum(hasattr(m, FUSED_QKV) for m in model.modules()) == (1 if name == "albert" else 3)
    torch.testing.assert_close(after, before, atol=1e-6, rtol=1e-6)
