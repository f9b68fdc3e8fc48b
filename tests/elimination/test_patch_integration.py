"""A patched model stays a normal model: copies, pickles, quantises, adapters, checkpointing,
outputs (hidden states, attentions, kept vectors), stacking and wrappers."""
import copy
import io
import pickle

import pytest
import torch
from torch import nn
from transformers import BertForSequenceClassification, BertModel

import powerbert
from tiny_bert import LAYERS, batch, build, spec_outputs

RETENTION = (9, 6, 3)
# torch.ao dynamic quantisation is deprecated in favour of torchao, but it is what users run today.
QUANT_WARNINGS = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]


def _own_forward(module: nn.Module):
    return module.__dict__.get("forward")


# ---------------------------------------------------------------- copies and pickles


def test_deepcopy_is_an_independent_patched_model():
    model = powerbert.patch(build(BertModel), RETENTION)
    inputs = batch()
    with torch.no_grad():
        before = model(**inputs).last_hidden_state
    twin = copy.deepcopy(model)
    assert powerbert.is_patched(twin)
    with torch.no_grad():
        twin.encoder.layer[1].intermediate.dense.weight.mul_(-1.0)
        changed = twin(**inputs).last_hidden_state
        torch.testing.assert_close(model(**inputs).last_hidden_state, before)  # the original is untouched
    expected, _ = spec_outputs(twin, inputs, RETENTION)
    for row, reference in enumerate(expected):
        torch.testing.assert_close(changed[row], reference, atol=2e-5, rtol=2e-5)
    # gradients land on the copy's parameters only
    twin(**inputs).last_hidden_state.sum().backward()
    assert twin.encoder.layer[0].attention.self.query.weight.grad is not None
    assert model.encoder.layer[0].attention.self.query.weight.grad is None
    # unpatching the copy restores the copy, and leaves the original patched
    powerbert.unpatch(twin)
    assert _own_forward(twin.encoder) is None and _own_forward(twin) is None
    assert not hasattr(twin.config, "powerbert_retention")
    assert powerbert.is_patched(model) and model.config.powerbert_retention == list(RETENTION)
    stock = build(BertModel)
    with torch.no_grad():
        stock.encoder.layer[1].intermediate.dense.weight.mul_(-1.0)
        torch.testing.assert_close(twin(**inputs).last_hidden_state, stock(**inputs).last_hidden_state)


def test_unpatched_copy_saves(tmp_path):
    twin = copy.deepcopy(powerbert.patch(build(BertForSequenceClassification), RETENTION))
    powerbert.unpatch(twin)
    twin.save_pretrained(tmp_path)
    assert "powerbert_retention" not in (tmp_path / "config.json").read_text()


@pytest.mark.parametrize("cls", [BertModel, BertForSequenceClassification])
def test_torch_save_round_trips_and_stays_patched(cls):
    model = powerbert.patch(build(cls), RETENTION)
    inputs = batch()
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert powerbert.is_patched(loaded) and powerbert.patched_retention(loaded) == RETENTION
    key = "last_hidden_state" if cls is BertModel else "logits"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs)[key], model(**inputs)[key])
    powerbert.unpatch(loaded)
    assert not powerbert.is_patched(loaded)
    assert pickle.loads(pickle.dumps(model)) is not None


# ---------------------------------------------------------------- modules swapped after patching


def _quantize(model):
    return torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)


@QUANT_WARNINGS[0]
@QUANT_WARNINGS[1]
def test_patch_then_quantize_equals_quantize_then_patch():
    inputs = batch()
    first = _quantize(powerbert.patch(build(BertForSequenceClassification), RETENTION))
    second = powerbert.patch(_quantize(build(BertForSequenceClassification)), RETENTION)
    float_model = powerbert.patch(build(BertForSequenceClassification), RETENTION)
    with torch.no_grad():
        a, b, f = (m(**inputs).logits for m in (first, second, float_model))
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, f)  # the quantised Linear layers really ran
    assert isinstance(first.bert.encoder.layer[0].intermediate.dense, torch.ao.nn.quantized.dynamic.Linear)


@QUANT_WARNINGS[0]
@QUANT_WARNINGS[1]
def test_quantize_copy_of_patched_model_stays_patched():
    model = powerbert.patch(build(BertModel), RETENTION)
    inputs = batch()
    with torch.no_grad():
        float_out = model(**inputs).last_hidden_state
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    reference = _quantize(powerbert.patch(build(BertModel), RETENTION))
    assert powerbert.is_patched(quantized)
    with torch.no_grad():
        torch.testing.assert_close(quantized(**inputs).last_hidden_state, reference(**inputs).last_hidden_state, atol=0, rtol=0)
        torch.testing.assert_close(model(**inputs).last_hidden_state, float_out, atol=0, rtol=0)  # original untouched
    assert not torch.equal(reference(**inputs).last_hidden_state, float_out)


def test_swapped_module_takes_effect():
    """An adapter or a replaced Linear after patching is what runs (modules looked up per call)."""
    model = powerbert.patch(build(BertModel), RETENTION)
    torch.manual_seed(5)
    model.encoder.layer[0].intermediate.dense = nn.Linear(32, 64)
    model.encoder.layer[2].attention.self.query = nn.Linear(32, 32)
    inputs = batch()
    expected, _ = spec_outputs(model, inputs, RETENTION)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    for row, reference in enumerate(expected):
        torch.testing.assert_close(out[row], reference, atol=2e-5, rtol=2e-5)


# ---------------------------------------------------------------- stacking, subclasses, wrappers


def test_stacked_patches_are_refused():
    model = powerbert.patch(build(BertForSequenceClassification), RETENTION)
    with pytest.raises(RuntimeError, match="already patched"):
        powerbert.patch(model.bert, (5, 4, 3))
    with pytest.raises(RuntimeError, match="already patched"):
        powerbert.attach_soft_extract(model, 16)
    with pytest.raises(RuntimeError, match="patched through the BertForSequenceClassification"):
        powerbert.unpatch(model.bert)
    powerbert.unpatch(model)
    assert not powerbert.is_patched(model) and _own_forward(model.bert.encoder) is None
    assert _own_forward(model) is None and _own_forward(model.bert) is None

    inner = powerbert.patch(build(BertForSequenceClassification).bert, RETENTION)  # a bare model
    assert powerbert.is_patched(inner)
    holder = build(BertForSequenceClassification)
    holder.bert = inner
    with pytest.raises(RuntimeError, match="already patched"):
        powerbert.patch(holder, RETENTION)

    soft = powerbert.attach_soft_extract(build(BertForSequenceClassification), 16)
    with pytest.raises(RuntimeError, match="soft extract"):
        powerbert.patch(soft._model, RETENTION)
    with pytest.raises(RuntimeError, match="soft extract"):
        powerbert.attach_soft_extract(soft._model.bert, 16)
    soft.detach()


class MyClassifier(BertForSequenceClassification):
    """A user subclass that changes nothing about what the head reads."""


class MyPoolingClassifier(BertForSequenceClassification):
    """A user subclass whose forward could read more than [CLS]."""

    def forward(self, *args, **kwargs):
        return super().forward(*args, **kwargs)


def test_subclasses_of_supported_models_are_accepted():
    inputs = batch()
    plain = powerbert.patch(build(BertForSequenceClassification), RETENTION)
    mine = powerbert.patch(build(MyClassifier), RETENTION)
    assert powerbert.patch_state(mine).cls_only_last_layer
    overriding = powerbert.patch(build(MyPoolingClassifier), RETENTION)
    assert not powerbert.patch_state(overriding).cls_only_last_layer  # safe: full last layer
    with torch.no_grad():
        reference = plain(**inputs).logits
        torch.testing.assert_close(mine(**inputs).logits, reference)
        torch.testing.assert_close(overriding(**inputs).logits, reference, atol=1e-5, rtol=1e-5)


def test_wrappers_are_named():
    model = build(BertForSequenceClassification)
    with pytest.raises(TypeError, match=r"DataParallel wraps the model.*model\.module"):
        powerbert.patch(nn.DataParallel(model), RETENTION)
    assert not powerbert.is_patched(model)


# ---------------------------------------------------------------- dtypes, checkpointing


def test_float64_model_runs_and_matches_the_spec():
    model = build(BertModel).double()
    inputs = batch()
    with torch.no_grad():
        stock = model(**inputs).last_hidden_state
        powerbert.patch(model, (13, 13, 13))
        torch.testing.assert_close(model(**inputs).last_hidden_state, stock, atol=1e-12, rtol=1e-12)
    powerbert.unpatch(model)
    expected, _ = spec_outputs(model, inputs, RETENTION)
    powerbert.patch(model, RETENTION)
    with torch.no_grad():
        out = model(**inputs).last_hidden_state
    assert out.dtype == torch.float64
    for row, reference in enumerate(expected):
        torch.testing.assert_close(out[row], reference, atol=1e-10, rtol=1e-10)


def test_unsupported_parameter_dtype_is_refused_at_patch_time():
    model = build(BertModel)
    model.encoder.layer[0].output.dense.weight.data = model.encoder.layer[0].output.dense.weight.data.to(
        torch.float8_e4m3fn)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        powerbert.patch(model, RETENTION)
    assert not powerbert.is_patched(model)


def _count_calls(module: nn.Module) -> list:
    calls = []
    module.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_is_honoured(reentrant):
    inputs, labels = batch(), torch.tensor([0, 1, 2, 1])
    grads = {}
    for checkpointing in (False, True):
        model = powerbert.patch(
            build(BertForSequenceClassification, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
            RETENTION)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        calls = _count_calls(model.bert.encoder.layer[1].intermediate.dense)
        model(**inputs, labels=labels).loss.backward()
        # checkpointed layers run their forward again during backward
        assert len(calls) == (2 if checkpointing else 1)
        grads[checkpointing] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------- outputs


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_hidden_states_and_attentions_keep_all_equal_stock(attn):
    inputs = batch()
    stock_model = build(BertModel, "eager")  # the stock model returns probabilities under eager only
    with torch.no_grad():
        stock = stock_model(**inputs, output_hidden_states=True, output_attentions=True)
        model = powerbert.patch(build(BertModel, attn), (13,) * LAYERS)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == LAYERS + 1 and len(out.attentions) == LAYERS
    for ours, theirs in zip(out.hidden_states, stock.hidden_states):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(out.attentions, stock.attentions):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)


def test_hidden_states_and_attentions_follow_the_survivors():
    inputs = batch()
    model = powerbert.patch(build(BertModel), RETENTION)
    with torch.no_grad():
        plain = model(**inputs)
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        embeddings = model.embeddings(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
    alive = (13,) + RETENTION
    assert [tuple(h.shape) for h in out.hidden_states] == [(4, n, 32) for n in alive]
    assert [tuple(a.shape) for a in out.attentions] == [(4, 4, n, n) for n in alive[:-1]]
    torch.testing.assert_close(out.hidden_states[0], embeddings)
    torch.testing.assert_close(out.hidden_states[-1], plain.last_hidden_state)
    torch.testing.assert_close(out.last_hidden_state, plain.last_hidden_state)
    for probs in out.attentions:
        torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    # tuple outputs carry them too
    as_tuple = model(**inputs, output_hidden_states=True, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple[2]) == LAYERS + 1


def test_head_with_hidden_states_runs_the_full_last_layer_and_same_logits():
    inputs = batch()
    model = powerbert.patch(build(BertForSequenceClassification), RETENTION)
    with torch.no_grad():
        plain = model(**inputs).logits
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == LAYERS + 1 and out.hidden_states[-1].shape == (4, RETENTION[-1], 32)
    assert len(out.attentions) == LAYERS
    torch.testing.assert_close(out.logits, plain, atol=1e-5, rtol=1e-5)


def test_kept_mask_and_positions_match_the_spec():
    retention = (9, 6, 5)  # k_L = 5 exceeds the real length of rows 3 (4 tokens) and 4 (1 token)
    inputs = batch()
    model = build(BertModel)
    _, positions = spec_outputs(model, inputs, retention)
    powerbert.patch(model, retention)
    with torch.no_grad():
        out = model(**inputs)
    assert out.kept_positions.shape == out.kept_mask.shape == (4, 5)
    assert out.kept_positions.tolist() == positions
    expected_mask = torch.gather(inputs["attention_mask"], 1, out.kept_positions).bool()
    assert torch.equal(out.kept_mask, expected_mask)
    assert out.kept_mask.sum(1).tolist() == [5, 5, 4, 1]


def test_mean_pooling_with_kept_mask():
    inputs = batch()
    stock_model = build(BertModel)
    with torch.no_grad():
        stock = stock_model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    stock_mean = (stock * mask).sum(1) / mask.sum(1)
    model = powerbert.patch(build(BertModel), (13,) * LAYERS)
    with torch.no_grad():
        out = model(**inputs)
    kept = out.kept_mask.unsqueeze(-1).float()
    torch.testing.assert_close((out.last_hidden_state * kept).sum(1) / kept.sum(1), stock_mean, atol=1e-5, rtol=1e-5)
    powerbert.unpatch(model)
    powerbert.patch(model, RETENTION)
    with torch.no_grad():
        out = model(**inputs)
    kept = out.kept_mask.unsqueeze(-1).float()
    assert torch.isfinite((out.last_hidden_state * kept).sum(1) / kept.sum(1)).all()


def test_bare_model_traces_in_one_graph_with_its_extra_outputs():
    """Dynamo traces the installed forwards (no graph break); the eager backend keeps it quick."""
    model = powerbert.patch(build(BertModel), RETENTION)
    inputs = batch()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        expected = model(**inputs, output_hidden_states=True)
        out = compiled(**inputs, output_hidden_states=True)
    torch.testing.assert_close(out.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(out.kept_positions, expected.kept_positions)
    assert torch.equal(out.kept_mask, expected.kept_mask)
    assert len(out.hidden_states) == LAYERS + 1


def test_float64_model_runs_when_the_triton_backend_is_forced():
    from powerbert.elimination import dispatch as ops

    model = powerbert.patch(build(BertModel).double(), RETENTION)
    inputs = batch()
    with torch.no_grad():
        expected = model(**inputs).last_hidden_state
        with ops.use_backend("triton"):
            torch.testing.assert_close(model(**inputs).last_hidden_state, expected, atol=0, rtol=0)
