"""Deploying a patched model: ``torch.export`` with dynamic batch and length, and ONNX on ONNX
Runtime (``powerbert.deployment``, ``powerbert export``). Tiny random models with MiniLM's real
tokenizer, on real sentences; outputs against the eager patched model, at batch sizes and lengths
other than the ones traced."""
import importlib
import json

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer, BertForSequenceClassification, BertModel

import powerbert
from powerbert import cli
from powerbert.deployment import export_onnx, export_program
from test_predict import minilm_path, tiny_folder
from tiny_bert import build as build_bert

ort = pytest.importorskip("onnxruntime", reason="make test installs onnxruntime (test extra)")
pytest.importorskip("onnxscript", reason="make test installs onnxscript (test extra)")
pytestmark = pytest.mark.usefixtures("one_thread")

SENTENCES = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "Great!",
    "A tedious, overlong mess that never finds its footing and wastes a fine cast on a script nobody finished.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "ok",
    "What a waste of two hours.",
    "Parliament will vote on the proposed changes to the education budget next week, officials said.",
]
# (rows, max tokens): shapes other than the exporter's example batch (2 rows)
SHAPES = [(1, None), (3, None), (7, None), (5, 6)]
FIXED = [20, 12, 3]
PROPORTIONAL = [0.7, 0.5, 0.3]


def batches(tokenizer):
    for rows, length in SHAPES:
        kwargs = {"truncation": True, "max_length": length} if length else {}
        yield tokenizer(SENTENCES[:rows], padding=True, return_tensors="pt", **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.mark.parametrize("retention", [FIXED, PROPORTIONAL], ids=["fixed", "proportional"])
@pytest.mark.parametrize("head", [BertForSequenceClassification, BertModel])
def test_torch_export_takes_any_batch_and_length(tmp_path, tokenizer, head, retention):
    folder = tiny_folder(tmp_path / "m", head=head, retention=retention)
    model = (AutoModelForSequenceClassification if head is BertForSequenceClassification else AutoModel).from_pretrained(folder)
    powerbert.patch(model)
    model.eval()
    loader = "sequence-classification" if head is BertForSequenceClassification else "bare"
    example = tokenizer(SENTENCES[2:4], padding=True, return_tensors="pt")
    program = export_program(model, dict(example), loader).module()
    for batch in batches(tokenizer):
        with torch.no_grad():
            expected = model(**batch)
            got = program(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
        if loader == "bare":
            hidden, kept, positions = got
            assert torch.equal(positions, expected.kept_positions) and torch.equal(kept, expected.kept_mask)
            torch.testing.assert_close(hidden, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(got, expected.logits, atol=1e-5, rtol=1e-5)


def run_onnx(path, batch, names):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {name: batch[name].numpy() for name in names})


@pytest.mark.parametrize("retention", [FIXED, PROPORTIONAL], ids=["fixed", "proportional"])
def test_onnx_classifier_equals_the_eager_patched_model(tmp_path, tokenizer, retention):
    folder = tiny_folder(tmp_path / "clf", retention=retention)
    summary = export_onnx(folder, tmp_path / "clf.onnx")
    assert summary["outputs"] == ["logits"] and summary["configuration"] == retention and summary["optimized"]
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    powerbert.patch(model)
    for batch in batches(tokenizer):
        with torch.no_grad():
            expected = model(**batch).logits.numpy()
        np.testing.assert_allclose(run_onnx(tmp_path / "clf.onnx", batch, summary["inputs"])[0], expected, atol=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clf", "clf.onnx"]  # no temporary file left


@pytest.mark.parametrize("retention", [FIXED, PROPORTIONAL], ids=["fixed", "proportional"])
def test_onnx_bare_encoder_keeps_the_same_positions(tmp_path, tokenizer, retention):
    folder = tiny_folder(tmp_path / "bare", head=BertModel, retention=retention)
    summary = export_onnx(folder, tmp_path / "bare.onnx")
    assert summary["outputs"] == ["last_hidden_state", "kept_mask", "kept_positions"]
    model = AutoModel.from_pretrained(folder).eval()
    powerbert.patch(model)
    for batch in batches(tokenizer):
        with torch.no_grad():
            expected = model(**batch)
        hidden, kept, positions = run_onnx(tmp_path / "bare.onnx", batch, summary["inputs"])
        assert np.array_equal(positions, expected.kept_positions.numpy())
        assert np.array_equal(kept, expected.kept_mask.numpy())
        np.testing.assert_allclose(hidden, expected.last_hidden_state.numpy(), atol=1e-4)


def test_onnx_sentence_transformer_gives_its_embeddings(tmp_path, tokenizer):
    st = pytest.importorskip("sentence_transformers")
    bare = tiny_folder(tmp_path / "bare", head=BertModel, retention=None)
    transformer = st.base.modules.Transformer(str(bare), max_seq_length=48)
    modules = st.sentence_transformer.modules
    model = st.SentenceTransformer(modules=[transformer, modules.Pooling(32, pooling_mode="mean"), modules.Normalize()],
                                   device="cpu")
    powerbert.patch(model, PROPORTIONAL)
    model.save(str(tmp_path / "st"))
    summary = export_onnx(tmp_path / "st", tmp_path / "st.onnx")
    assert summary["loader"] == "sentence-transformers" and summary["outputs"] == ["sentence_embedding"]
    loaded = powerbert.patch(st.SentenceTransformer(str(tmp_path / "st"), device="cpu"))
    for rows, _ in SHAPES[:3]:
        expected = loaded.encode(SENTENCES[:rows], batch_size=rows, convert_to_numpy=True)
        batch = tokenizer(SENTENCES[:rows], padding=True, truncation=True, max_length=48, return_tensors="pt")
        np.testing.assert_allclose(run_onnx(tmp_path / "st.onnx", batch, summary["inputs"])[0], expected, atol=1e-4)


def test_int8_export_runs_close_to_fp32(tmp_path, tokenizer):
    folder = tiny_folder(tmp_path / "clf", retention=FIXED)
    summary = export_onnx(folder, tmp_path / "clf.int8.onnx", quantize="int8")
    export_onnx(folder, tmp_path / "clf.onnx")
    assert summary["quantize"] == "int8"
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    int8 = run_onnx(tmp_path / "clf.int8.onnx", batch, summary["inputs"])[0]
    fp32 = run_onnx(tmp_path / "clf.onnx", batch, summary["inputs"])[0]
    assert int8.shape == fp32.shape and np.isfinite(int8).all() and np.abs(int8 - fp32).max() < 0.1


@pytest.mark.parametrize("extra, message", [
    (["--opset", "9"], "opset must be an int >= 18 and <= 23"),
    (["--overwrite", "--output", "{model}"], "is a folder; give the file to write"),
    (["--quantize", "int4"], "invalid choice: 'int4'"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, extra, message):
    folder = tiny_folder(tmp_path / "clf", retention=FIXED)
    capsys.readouterr()  # the folder's own saving messages
    output = tmp_path / "out.onnx"
    argv = ["export", "--model", str(folder), "--output", str(output)] + [a.format(model=folder) for a in extra]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not output.exists()


def test_existing_output_and_folder_without_config_are_refused(tmp_path, capsys):
    output = tmp_path / "out.onnx"
    output.write_text("keep me")
    folder = tiny_folder(tmp_path / "clf", retention=FIXED)
    capsys.readouterr()
    assert cli.main(["export", "--model", str(folder), "--output", str(output)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and output.read_text() == "keep me"
    (tmp_path / "empty").mkdir()
    assert cli.main(["export", "--model", str(tmp_path / "empty"), "--output", str(tmp_path / "x.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert "config.json" in err and len(err.splitlines()) == 1 and not (tmp_path / "x.onnx").exists()


def test_the_cli_writes_the_file_and_prints_its_summary(tmp_path, capsys):
    folder = tiny_folder(tmp_path / "clf", retention=PROPORTIONAL)
    capsys.readouterr()
    assert cli.main(["export", "--model", str(folder), "--output", str(tmp_path / "m.onnx"), "--no-optimize"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["output"] == str(tmp_path / "m.onnx") and not summary["optimized"]
    assert summary["configuration"] == PROPORTIONAL and (tmp_path / "m.onnx").stat().st_size == summary["bytes"]



def _quantized_weights(path):
    """(MatMul nodes fed by int8 weights, fp32 MatMul nodes with a constant weight) of an ONNX file."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer}
    fp32 = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and constants & set(n.input)]
    int8 = [n.name for n in graph.node if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")]
    return int8, fp32


def plant_outliers(model, planted):
    """Make input channels ``planted[layer]`` of those layers' FFN output projections outliers (weight
    column x 40, the FFN input row x 4), as trained BERT-family FFNs have them; returns ``model``."""
    from powerbert.elimination.families import resolve

    family, base, _ = resolve(model)
    layers = family.layers(family.encoder(base))
    with torch.no_grad():
        for layer, channels in planted.items():
            for channel in channels:
                layers[layer].ffn_out.weight[:, channel] *= 40
                layers[layer].ffn_in.weight[channel] *= 4
    return model


PLANTED = {0: [5], 2: [7, 40]}


def family_model(name, head):
    """A tiny random model of family ``name`` (``bert`` or a ``test_families`` case), in eval mode."""
    from elimination.test_families import CASES, build as build_family
    if name == "bert":
        return build_bert(BertForSequenceClassification if head else BertModel)
    return build_family(name, CASES[name].head if head else None).eval()


@pytest.mark.parametrize("head", [False, True], ids=["base", "classifier"])
@pytest.mark.parametrize("name", ["bert", "albert", "roberta", "distilbert", "electra", "mpnet"])
def test_splitting_outlier_channels_keeps_the_function(name, head):
    """``split_outlier_channels`` finds the planted channels from the weights alone, and the split
    model (FFN input permuted, output projection split) computes what it computed, stock and
    patched (same survivors)."""
    from elimination.test_families import batch as family_batch
    from powerbert.deployment import OutlierSplitLinear, fp32_outlier_linears, split_outlier_channels

    planted = {0: [5]} if name == "albert" else PLANTED  # ALBERT: one layer, shared by every application
    inputs = family_batch()
    key = "logits" if head else "last_hidden_state"
    model, reference = (plant_outliers(family_model(name, head), planted) for _ in range(2))
    with torch.no_grad():
        before = model(**inputs)[key]
    assert split_outlier_channels(model) == planted
    assert len(fp32_outlier_linears(model)) == len(planted)
    assert sum(isinstance(m, OutlierSplitLinear) for m in model.modules()) == len(planted)
    powerbert.patch(model, [0.8, 0.5, 0.3])
    powerbert.patch(reference, [0.8, 0.5, 0.3])
    with torch.no_grad():
        patched, expected = model(**inputs), reference(**inputs)
        powerbert.unpatch(model)
        torch.testing.assert_close(model(**inputs)[key], before, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(patched[key], expected[key], atol=1e-4, rtol=1e-4)
    if not head:
        assert torch.equal(patched.kept_positions, expected.kept_positions)


def test_no_outlier_no_split():
    """A random model has no outlier channel (the next largest column of a trained MiniLM FFN is 9x
    the median, the threshold 16x): nothing is split, int8 quantises every projection whole."""
    from powerbert.deployment import OUTLIER_RATIO, outlier_channels, split_outlier_channels

    model = build_bert(BertModel)
    assert split_outlier_channels(model) == {}
    assert all(type(layer.output.dense) is torch.nn.Linear for layer in model.encoder.layer)
    ffn_out = torch.nn.Linear(8, 4)
    with torch.no_grad():
        ffn_out.weight.fill_(0.1)
        ffn_out.weight[:, 3] = 0.1 * OUTLIER_RATIO
        ffn_out.weight[:, 6] = 0.1 * OUTLIER_RATIO * 0.99
    assert outlier_channels(ffn_out) == [3]
    assert outlier_channels(ffn_out, most=0) == []


def test_int8_keeps_the_outlier_channels_fp32(tmp_path, tokenizer):
    """The int8 recipe: every projection in int8, the outlier channels of the FFN output projections
    split off in fp32 (found again in the exported graph by their weights), in ONNX and in torch
    alike; ``int8_all`` quantises everything (what the split buys: the test below)."""
    from powerbert.deployment import matmuls_of, quantize_torch_int8

    folder = tiny_folder(tmp_path / "clf", retention=FIXED)
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    plant_outliers(model, PLANTED).save_pretrained(folder)
    summary = export_onnx(folder, tmp_path / "kept.onnx", quantize="int8")
    everything = export_onnx(folder, tmp_path / "all.onnx", quantize="int8", int8_all=True)
    export_onnx(folder, tmp_path / "fp32.onnx")
    int8_kept, fp32_kept = _quantized_weights(tmp_path / "kept.onnx")
    int8_all, fp32_all = _quantized_weights(tmp_path / "all.onnx")
    assert summary["fp32_channels"] == {str(k): v for k, v in PLANTED.items()}
    assert sorted(summary["fp32_matmuls"]) == sorted(fp32_kept) and len(fp32_kept) == len(PLANTED)
    assert everything["fp32_matmuls"] == [] and everything["fp32_channels"] == {} and fp32_all == []
    assert len(int8_kept) == len(int8_all)  # the bulk of a split projection is int8 too
    import onnx
    # MatMuls only: the embedding tables stay fp32 (no per-run DequantizeLinear of the vocabulary)
    assert not [n for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node if n.op_type == "DequantizeLinear"]
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    fp32 = run_onnx(tmp_path / "fp32.onnx", batch, summary["inputs"])[0]
    assert np.abs(run_onnx(tmp_path / "kept.onnx", batch, summary["inputs"])[0] - fp32).max() < 0.1

    powerbert.patch(model.eval())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    kept = quantize_torch_int8(model)
    linears = [m for m in kept.modules() if type(m) is torch.nn.Linear]
    assert len(linears) == len(PLANTED) and all(m.in_features in (1, 2) and m.bias is None for m in linears)
    assert not any(type(m) is torch.nn.Linear for m in quantize_torch_int8(model, int8_all=True).modules())
    assert powerbert.is_patched(kept) and type(model.bert.encoder.layer[0].output.dense) is torch.nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model untouched
    with torch.no_grad():
        torch.testing.assert_close(kept(**batch).logits, model(**batch).logits, atol=0.1, rtol=0)


def test_split_int8_projection_is_closer_to_fp32_than_whole():
    """What the split buys: on an FFN activation whose outlier channel sets the int8 scales, the
    split projection (bulk int8, outlier fp32) errs far less than the projection in int8 whole."""
    from powerbert.deployment import quantize_torch_int8

    model = plant_outliers(build_bert(BertModel), PLANTED)
    layer = model.encoder.layer[0]
    hidden = torch.randn(4, 13, layer.intermediate.dense.in_features, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x = layer.intermediate(hidden)  # the GELU output: the projection's input, the outlier channel 5 in it
        reference = layer.output.dense(x)
        whole = quantize_torch_int8(model, int8_all=True).encoder.layer[0].output.dense(x)
        order = [c for c in range(x.shape[-1]) if c not in PLANTED[0]] + PLANTED[0]
        split = quantize_torch_int8(model).encoder.layer[0].output.dense(x[..., order])
    split_error, whole_error = (split - reference).abs().max(), (whole - reference).abs().max()
    assert split_error < whole_error / 4, (split_error, whole_error)


class _Selection(torch.nn.Module):
    """The torch path of ``kernels.select`` as a graph: int k, or per-row k with a width."""

    def __init__(self, k: int, per_row: bool):
        super().__init__()
        self.k, self.per_row = k, per_row

    def forward(self, scores, k_rows):
        from kernels.select import select_torch, select_torch_rows

        if self.per_row:
            return select_torch_rows(scores, k_rows, self.k)[0]
        return select_torch(scores, self.k)


@pytest.mark.parametrize("per_row", [False, True], ids=["int-k", "per-row-k"])
def test_onnx_selection_breaks_ties_to_the_lower_index(tmp_path, per_row):
    """Exported for ONNX (``kernels.onnx_tie_order``), selection is two TopK nodes relying on ONNX's
    tie order; on rows of heavy ties, -inf padding and NaN it must equal the reference exactly."""
    import kernels
    from torch.export import Dim

    k, n = 5, 12
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, 3, (2, n), generator=generator).float(), torch.tensor([2, 5])
    with torch.no_grad(), kernels.onnx_tie_order():
        program = torch.onnx.export(_Selection(k, per_row), example, dynamo=True, input_names=["scores", "k_rows"],
                                    dynamic_shapes=({0: Dim("batch"), 1: Dim("length", min=k + 1)}, {0: Dim("batch")}))
    program.save(str(tmp_path / "select.onnx"))
    assert not importlib.import_module("kernels.select")._onnx_tie_order  # the block restores the flag
    assert sum(node.op_type == "TopK" for node in program.model_proto.graph.node) == 2
    session = ort.InferenceSession(str(tmp_path / "select.onnx"), providers=["CPUExecutionProvider"])
    for rows, length in ((1, 7), (6, 12), (9, 30)):
        scores = torch.randint(0, 3, (rows, length), generator=generator).float()
        scores[:, length - 2:] = float("-inf")
        scores[0, 1] = float("nan")
        k_rows = torch.randint(0, k + 2, (rows,), generator=generator)
        got = session.run(None, {"scores": scores.numpy(), "k_rows": k_rows.numpy()})[0]
        expected = kernels.select_ref(scores, k_rows, width=k) if per_row else kernels.select_ref(scores, k)
        assert np.array_equal(got, expected.numpy()), (rows, length)
