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


def test_int8_keeps_the_first_ffn_output_projection_fp32(tmp_path, tokenizer):
    """The int8 recipe: every projection in int8 but the first layer's FFN output (found again in
    the exported graph by its weight), in ONNX and in torch alike; ``int8_all`` quantises it too."""
    from powerbert.deployment import first_ffn_out, matmuls_of, quantize_torch_int8

    folder = tiny_folder(tmp_path / "clf", retention=FIXED)
    summary = export_onnx(folder, tmp_path / "kept.onnx", quantize="int8")
    everything = export_onnx(folder, tmp_path / "all.onnx", quantize="int8", int8_all=True)
    export_onnx(folder, tmp_path / "fp32.onnx")
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    assert len(matmuls_of(tmp_path / "fp32.onnx", first_ffn_out(model).weight)) == 1
    int8_kept, fp32_kept = _quantized_weights(tmp_path / "kept.onnx")
    int8_all, fp32_all = _quantized_weights(tmp_path / "all.onnx")
    assert summary["fp32_matmuls"] == fp32_kept and len(fp32_kept) == 1 and everything["fp32_matmuls"] == []
    assert fp32_all == [] and len(int8_kept) == len(int8_all) - 1
    import onnx
    # MatMuls only: the embedding tables stay fp32 (no per-run DequantizeLinear of the vocabulary)
    assert not [n for n in onnx.load(str(tmp_path / "kept.onnx")).graph.node if n.op_type == "DequantizeLinear"]
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    fp32 = run_onnx(tmp_path / "fp32.onnx", batch, summary["inputs"])[0]
    assert np.abs(run_onnx(tmp_path / "kept.onnx", batch, summary["inputs"])[0] - fp32).max() < 0.1

    powerbert.patch(model.eval())
    kept = quantize_torch_int8(model)
    linears = [name for name, m in kept.named_modules() if type(m) is torch.nn.Linear]
    assert linears == ["bert.encoder.layer.0.output.dense"]
    assert not any(type(m) is torch.nn.Linear for m in quantize_torch_int8(model, int8_all=True).modules())
    assert powerbert.is_patched(kept) and type(first_ffn_out(model)) is torch.nn.Linear  # the user's model untouched
    with torch.no_grad():
        torch.testing.assert_close(kept(**batch).logits, model(**batch).logits, atol=0.1, rtol=0)


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
