"""The patched model's other code paths: the GPU (Triton) path run under the interpreter,
torch.compile of the CPU path, and training through hard extraction."""
import pytest
import torch
from transformers import BertForSequenceClassification, BertModel

import powerbert
from powerbert.elimination import dispatch as ops
from tiny_bert import batch, build, spec_outputs

# head dim 32: a size the attention kernel supports
WIDE = dict(hidden_size=64, num_attention_heads=2, intermediate_size=96)


@pytest.mark.parametrize("retention", [(9, 6, 3), (13, 4, 1)])
def test_triton_path_matches_spec(retention, device):
    """Attention kernel scores + extract_from_scores, i.e. what runs on CUDA."""
    model = build(BertModel, **WIDE).to(device)
    inputs = {name: t.to(device) for name, t in batch(sizes=(13, 7, 1)).items()}
    expected, _ = spec_outputs(model.cpu(), {n: t.cpu() for n, t in inputs.items()}, retention)
    model.to(device)
    powerbert.patch(model, retention)
    with torch.no_grad(), ops.use_backend("triton"):
        out = model(**inputs).last_hidden_state.cpu()
    for row, reference in enumerate(expected):
        torch.testing.assert_close(out[row], reference, atol=5e-5, rtol=5e-5)


def test_use_backend_rejects_unknown():
    with pytest.raises(ValueError, match="backend must be"):
        with ops.use_backend("cuda"):
            pass


def test_torch_compile_fullgraph_cpu():
    """No graph break, data-dependent shape or host sync on the CPU path (inductor, ~40 s)."""
    retention = (9, 6, 3)
    model = powerbert.patch(build(BertForSequenceClassification), retention)
    inputs = batch()
    with torch.no_grad():
        eager = model(**inputs).logits
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(**inputs).logits, eager, atol=1e-5, rtol=1e-5)


def test_patched_model_trains():
    """Hard extraction in train() mode: dropout on, gradients reach every layer."""
    model = powerbert.patch(build(BertForSequenceClassification, hidden_dropout_prob=0.1), (9, 6, 3))
    inputs = batch()
    labels = torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        before = model(**inputs, labels=labels).loss.item()
    model.train()
    torch.manual_seed(0)
    train_loss = model(**inputs, labels=labels).loss
    torch.manual_seed(1)
    with torch.no_grad():  # dropout is on: another draw gives another loss
        assert model(**inputs, labels=labels).loss.item() != train_loss.item()
    train_loss.backward()
    for name, parameter in model.named_parameters():
        if "pooler" in name or "classifier" in name or ".layer." in name:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    model.eval()
    with torch.no_grad():
        after = model(**inputs, labels=labels).loss.item()
    assert after < before


@pytest.mark.parametrize("selection", ["attention", "first"])
def test_gradients_flow_through_the_triton_gather(selection, device):
    """Under autograd the kernels pick the rows and torch gathers them, on every selection path."""
    model = powerbert.patch(build(BertForSequenceClassification, **WIDE).to(device), (9, 6, 3), selection=selection)
    model.train()
    inputs = {name: t.to(device) for name, t in batch().items()}
    with ops.use_backend("triton"):
        model(**inputs, labels=torch.tensor([0, 1, 2, 1], device=device)).loss.backward()
    first_layer = model.bert.encoder.layer[0]
    for parameter in (first_layer.attention.self.query.weight, first_layer.intermediate.dense.weight):
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0
