"""The ``powerbert`` command line: a small end-to-end run, clear errors on bad input, data fetch."""
import csv
import io
import json
import tarfile

import pytest

from powerbert import cli
from powerbert.inputs.movie_reviews import parse_movie_reviews
from tiny_task import make_model_folder, write_marker_csv


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("cli") / "model", layers=2)


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def test_train_writes_model_metrics_and_log(tmp_path, model_dir):
    data = write_marker_csv(tmp_path / "train.csv", 96)
    out = tmp_path / "out"
    status = run_cli("train", "--model", model_dir, "--data", data, "--output", out, "--max-length", 16,
                     "--epochs", 1, "--batch-size", 16, "--lambda", "1e-2", "--lr-bert", "1e-3", "--seed", 3,
                     "--no-progress")
    assert status == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("configuration", "vectors_kept", "vectors_total", "vector_ratio", "flops_ideal", "steps"):
        assert key in metrics
    assert set(metrics["steps"]) == {"finetune", "search", "retrain"}
    config = json.loads((out / "config.json").read_text())
    assert config["powerbert_retention"] == metrics["configuration"]
    assert (out / "model.safetensors").is_file() and (out / "tokenizer_config.json").is_file()
    assert "search: learned configuration" in (out / "powerbert.log").read_text()
    for step in ("finetune", "search", "retrain"):
        assert (out / step / "done.json").is_file() and not (out / step / "checkpoints").exists()
    assert metrics["world_size"] == 1
    assert run_cli("evaluate", "--model", out, "--data", data) == 0


@pytest.mark.parametrize(
    "rows, flags, message",
    [
        ([("sentence", "y"), ("a b", "0"), ("b c", "1")], [], "available columns: sentence, y"),
        ([("text", "label"), ("a b", "0"), ("b c", "1")], ["--label-column", "gold"], "'gold' not found"),
        ([("text", "label")], [], "empty"),
        ([("text", "label"), ("a b", "1"), ("b c", "1")], [], "single class"),
        ([("text", "label"), ("a b", "0"), ("b c", "1")], ["--max-length", "1"], "--max-length: must be >= 2"),
    ],
    ids=["no-text-column", "missing-label-column", "empty", "one-class", "max-length"],
)
def test_bad_input_is_a_clear_error(tmp_path, model_dir, capsys, rows, flags, message):
    data = tmp_path / "data.csv"
    with open(data, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    status = run_cli("train", "--model", model_dir, "--data", data, "--output", tmp_path / "out",
                     "--no-progress", "--dev-fraction", "0.5", "--max-length", 16, *flags)
    assert status == 2
    assert message in capsys.readouterr().err


def test_missing_model_and_data_are_clear_errors(tmp_path, model_dir, capsys):
    data = write_marker_csv(tmp_path / "d.csv", 10)
    assert run_cli("train", "--model", tmp_path / "nope", "--data", data, "--output", tmp_path / "o") == 2
    assert "model folder not found" in capsys.readouterr().err
    assert run_cli("train", "--model", model_dir, "--data", tmp_path / "nope.csv", "--output", tmp_path / "o",
                   "--max-length", 16) == 2
    assert "data file not found" in capsys.readouterr().err


def test_jsonl_pairs_and_regression_labels(tmp_path):
    from powerbert.inputs.examples import infer_label_space, load_examples

    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"sentence1": f"a{i}", "sentence2": f"b{i}", "score": i / 3}) for i in range(4)))
    examples = load_examples(path, label_column="score")
    assert examples.pairs == ["b0", "b1", "b2", "b3"]
    assert infer_label_space(examples.labels).regression
    assert infer_label_space(["1", "0", "1.0"]).names == ("0", "1")


def _fake_sdist(path, lines):
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as tar:
        raw = "\r\n".join(lines).encode("utf-8")
        info = tarfile.TarInfo("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt")
        info.size = len(raw)
        tar.addfile(info, io.BytesIO(raw))
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        tar.addfile(info, io.BytesIO(inner.getvalue()))
    return path


def test_fetch_movie_reviews_from_local_sdist(tmp_path):
    sdist = _fake_sdist(tmp_path / "vaderSentiment-3.3.2.tar.gz",
                        ["1_1\t2.27\tgood film, café", "2_1\t-1.5\tbad, \"dull\"", "3_1\t0\tneutral", "4_1\t0.1\tok"])
    out = tmp_path / "data" / "mr.csv"
    assert run_cli("fetch-movie-reviews", "--output", out, "--sdist", sdist) == 0
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [["text", "label"], ["good film, café", "1"], ["bad, \"dull\"", "0"], ["ok", "1"]]
    assert parse_movie_reviews(b"x\t-0.5\tno\r\n") == [("no", 0)]


def test_retention_mode_flag(capsys):
    from powerbert.training.config import DEFAULT_RETENTION_MODE

    parser = cli.build_parser()
    for command in ("train", "search", "retrain"):
        args = parser.parse_args([command, "--data", "d.csv", "--output", "o"])
        assert args.retention_mode == DEFAULT_RETENTION_MODE and cli._config(args).retention_mode == DEFAULT_RETENTION_MODE
        args = parser.parse_args([command, "--data", "d.csv", "--output", "o", "--retention-mode", "proportional"])
        assert cli._config(args).retention_mode == "proportional"
    assert run_cli("train", "--data", "d.csv", "--output", "o", "--retention-mode", "relative") == 2
    err = capsys.readouterr().err
    assert "--retention-mode: invalid choice: 'relative'" in err and err.count("\n") == 1
    assert "--retention-mode" not in parser.parse_args(["evaluate", "--model", "m", "--data", "d"]).__dict__


def test_train_proportional_writes_fractions(tmp_path, model_dir, capsys):
    data = write_marker_csv(tmp_path / "train.csv", 96)
    out = tmp_path / "out"
    status = run_cli("train", "--model", model_dir, "--data", data, "--output", out, "--max-length", 16,
                     "--epochs", 1, "--batch-size", 16, "--lambda", "1e-3", "--lr-bert", "1e-3",
                     "--retention-mode", "proportional", "--no-progress")
    assert status == 0
    printed = json.loads(capsys.readouterr().out)
    metrics = json.loads((out / "metrics.json").read_text())
    assert printed["retention_mode"] == metrics["retention_mode"] == metrics["settings"]["retention_mode"] == "proportional"
    assert printed["dev_real_lengths"] == metrics["dev_real_lengths"]
    configuration = json.loads((out / "config.json").read_text())["powerbert_retention"]
    assert configuration == metrics["configuration"] and all(isinstance(f, float) for f in configuration)
    assert "search: learned configuration [" in (out / "powerbert.log").read_text()
    assert "(proportional; vector ratio" in (out / "powerbert.log").read_text()
    assert run_cli("evaluate", "--model", out, "--data", data) == 0
