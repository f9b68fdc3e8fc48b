"""Property-based tests: the patched model against the independent spec implementation
(``spec_reference``) over random batches, padding, retention configurations and ties."""
import functools

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import BertForSequenceClassification

import powerbert
from tiny_bert import LAYERS, build, spec_outputs

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@functools.cache
def _model(attn: str, ties: bool):
    """One tiny model per variant. ``ties``: zero query weights in layers 1 and 3, so every query
    attends uniformly there and all real positions tie (selection must go to the lower index)."""
    model = build(BertForSequenceClassification, attn)
    if ties:
        with torch.no_grad():
            for index in (0, 2):
                query = model.bert.encoder.layer[index].attention.self.query
                query.weight.zero_()
                query.bias.zero_()
    return model


@st.composite
def cases(draw):
    sizes = draw(st.lists(st.integers(1, 12), min_size=1, max_size=4))
    length = max(sizes) + draw(st.integers(0, 3))
    first = draw(st.integers(1, length + 2))
    retention = [first]
    for _ in range(LAYERS - 1):
        retention.append(draw(st.integers(1, retention[-1])))
    seed = draw(st.integers(0, 2**16))
    return sizes, length, tuple(retention), draw(st.sampled_from(["sdpa", "eager"])), draw(st.booleans()), seed


def _inputs(sizes, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (len(sizes), length), generator=g)
    mask = torch.zeros(len(sizes), length, dtype=torch.long)
    for row, size in enumerate(sizes):
        mask[row, :size] = 1
    return dict(input_ids=ids * mask, attention_mask=mask, token_type_ids=torch.zeros_like(ids))


@SETTINGS
@given(cases())
def test_patched_model_equals_the_spec(case):
    sizes, length, retention, attn, ties, seed = case
    head = _model(attn, ties)
    bert = head.bert
    inputs = _inputs(sizes, length, seed)
    expected, positions = spec_outputs(bert, inputs, retention)
    reference_logits = head.classifier(bert.pooler(torch.stack(expected)))
    powerbert.patch(head, retention)
    try:
        with torch.no_grad():
            out = bert(**inputs)
            logits = head(**inputs).logits
    finally:
        powerbert.unpatch(head)
    assert out.kept_positions.tolist() == positions  # selection exact, ties to the lower index
    torch.testing.assert_close(out.last_hidden_state, torch.stack(expected), atol=3e-5, rtol=3e-5)
    torch.testing.assert_close(logits, reference_logits, atol=3e-5, rtol=3e-5)
    assert torch.equal(out.kept_mask, torch.gather(inputs["attention_mask"], 1, out.kept_positions).bool())
