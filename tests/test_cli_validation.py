"""Bad input through the ``powerbert`` CLI: one line on stderr, exit status 2, nothing trained.

Each case of the CLI-and-data issue is fed through ``cli.main``; the good neighbours of the
bad cases (a TSV with quotes, a 200 KB field, ``--task``, a rerun with the same settings,
``--overwrite``) must still work. Training runs use a 2-layer BERT with 32 positions, N = 16.
"""
import csv
import io
import json
import shutil
import tarfile

import pytest
import torch
from transformers import BertTokenizer, GPT2Config, GPT2Model

from powerbert import cli
from powerbert.inputs import examples as D
from powerbert.training import config as training_config
from powerbert.training import lambda_search
from powerbert.training import steps as training_steps
from powerbert.inputs import model_folder
from powerbert.training import trainer as training_trainer
from tiny_task import VOCAB, WORDS, make_model_folder, write_marker_csv

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = ("--max-length", 16, "--epochs", 1, "--batch-size", 16, "--lr-bert", "1e-3", "--no-progress")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("validation")


@pytest.fixture(scope="module")
def model_dir(root):
    return make_model_folder(root / "model", layers=2)


@pytest.fixture(scope="module")
def data(root):
    return write_marker_csv(root / "train.csv", 48)


def run_cli(*argv):
    return cli.main([str(a) for a in argv])


def expect_error(capsys, argv, *fragments):
    """``argv`` exits 2 with one line on stderr that holds every fragment, and no traceback."""
    capsys.readouterr()  # drop what the test's own set-up printed
    status = run_cli(*argv)
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line:\n{err}"
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def train_args(model_dir, data, out, *extra):
    return ("train", "--model", model_dir, "--data", data, "--output", out, *FAST, *extra)


def write_rows(path, rows, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter=delimiter).writerows(rows)
    return path


def marker_rows(count, label=lambda i: i % 2):
    rng = torch.Generator().manual_seed(count)
    rows = [("text", "label")]
    for i in range(count):
        words = [WORDS[j] for j in torch.randint(len(WORDS), (8,), generator=rng).tolist()]
        if i % 2:
            words[3] = "marker"
        rows.append((" ".join(words), label(i)))
    return rows


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-Infinity"])
def test_non_finite_label_is_an_error_naming_file_and_line(tmp_path, model_dir, capsys, bad):
    # a pandas export of a float label column with one missing value: 1.0, 0.0, ..., nan
    rows = marker_rows(20, label=lambda i: f"{i % 2}.0")
    rows[7] = (rows[7][0], bad)
    path = write_rows(tmp_path / "scores.csv", rows)
    out = tmp_path / "out"
    expect_error(capsys, train_args(model_dir, path, out), f"scores.csv:8: label '{bad}'", "not a finite number")
    expect_error(capsys, train_args(model_dir, path, out, "--task", "regression"), "scores.csv:8")
    assert not out.exists()


def test_non_finite_label_in_jsonl_and_dev_file(tmp_path, model_dir, data, capsys):
    path = tmp_path / "dev.jsonl"
    path.write_text('{"text": "w1 w2", "label": 1}\n\n{"text": "w3", "label": NaN}\n')
    expect_error(capsys, train_args(model_dir, data, tmp_path / "out", "--dev", path), "dev.jsonl:3", "label nan")


def test_numbers_mixed_with_text_is_an_error_unless_classification_is_asked(tmp_path, model_dir, capsys):
    rows = marker_rows(20)
    rows[5] = (rows[5][0], "NA")
    path = write_rows(tmp_path / "mixed.csv", rows)
    expect_error(capsys, train_args(model_dir, path, tmp_path / "out"), "mixes numbers", "mixed.csv:6",
                 "--task classification")
    labels = D.infer_label_space(D.load_examples(path), task="classification")
    assert labels.names == ("0", "1", "NA")


def test_label_space_is_decided_by_the_whole_column():
    assert D.infer_label_space(["1", "0", "1.0", 0.0]).names == ("0", "1")  # integer-valued floats are classes
    assert D.infer_label_space(["neg", "pos"]).names == ("neg", "pos")
    assert D.infer_label_space(["1", "0", "0.5"]).regression
    assert D.infer_label_space(["1", "0"], task="regression").regression
    assert D.infer_label_space(["0.5", "1.5", "0.5"], task="classification").names == ("0.5", "1.5")
    with pytest.raises(ValueError, match="not a number"):
        D.infer_label_space(["0.5", "pos"], task="regression")
    with pytest.raises(ValueError, match="not a finite number"):
        D.infer_label_space([1.0, float("nan"), 0.0])
    # train and dev together: the dev file's fraction makes the task regression
    train = D.Examples(["a", "b"], None, ["0", "1"], "train.csv", [2, 3])
    dev = D.Examples(["c"], None, ["0.5"], "dev.csv", [2])
    labels = D.infer_label_space([train, dev])
    assert labels.regression and "dev.csv:2" in labels.reason


def test_task_flag_makes_integer_labels_regression(tmp_path, model_dir, data):
    out = tmp_path / "out"
    assert run_cli("finetune", "--model", model_dir, "--data", data, "--output", out, "--task", "regression",
                   *FAST) == 0
    record = json.loads((out / "finetune" / "done.json").read_text())
    assert record["best"]["metric"] == "pearson"
    assert json.loads((out / "finetune" / "config.json").read_text())["problem_type"] == "regression"


# ----------------------------------------------------------------------------- numeric options


@pytest.mark.parametrize("flag, value, fragment", [
    ("--lr-bert", "nan", "argument --lr-bert: must be a finite number"),
    ("--lr-bert", "0", "argument --lr-bert: must be in (0, inf)"),
    ("--lr-soft", "inf", "argument --lr-soft: must be a finite number"),
    ("--lambda", "nan", "argument --lambda: must be a finite number"),
    ("--lambda", "-1e-3", "argument --lambda: must be in [0, inf)"),
    ("--target-speedup", "nan", "argument --target-speedup"),
    ("--target-speedup", "0.5", "argument --target-speedup: must be in [1, inf)"),
    ("--dev-fraction", "1.5", "argument --dev-fraction: must be in (0, 1)"),
    ("--max-length", "1", "argument --max-length: must be >= 2"),
    ("--search-epochs", "-1", "argument --search-epochs: must be >= 0"),
    ("--batch-size", "x", "argument --batch-size: must be an integer >= 1"),
    ("--seed", "-3", "argument --seed: must be >= 0"),
], ids=lambda v: str(v))
def test_numeric_options_are_refused_at_parse_time(tmp_path, model_dir, data, capsys, flag, value, fragment):
    out = tmp_path / "out"
    argv = train_args(model_dir, data, out)
    if flag in argv:
        index = argv.index(flag)
        argv = argv[:index] + argv[index + 2:]
    expect_error(capsys, (*argv, f"{flag}={value}"), fragment)
    assert not out.exists()


def test_lambda_nan_never_reaches_fine_tuning(tmp_path, model_dir, data, monkeypatch, capsys):
    for module in (training_steps, lambda_search):  # every caller of the training loop
        monkeypatch.setattr(module, "train_model", lambda *a, **k: pytest.fail("training started"))
    expect_error(capsys, train_args(model_dir, data, tmp_path / "out", "--lambda", "nan"), "--lambda")


def test_python_api_checks_the_same_ranges(tmp_path):
    for bad in ({"lr_bert": float("nan")}, {"lam": float("inf")}, {"lr_soft": -1.0}, {"task": "ranking"},
                {"dev_fraction": 1.0}, {"max_length": 1}, {"seed": -1}):
        cfg = training_config.PipelineConfig(data="d.csv", output=str(tmp_path), **bad)
        with pytest.raises(ValueError, match=next(iter(bad)).replace("lam", "lambda")):
            cfg.check()


def test_diverging_training_ends_with_a_one_line_error(tmp_path, model_dir, data, capsys):
    argv = train_args(model_dir, data, tmp_path / "out")
    index = argv.index("--lr-bert")
    assert run_cli(*argv[:index], *argv[index + 2:], "--lr-bert", "1e30") == 2
    err = capsys.readouterr().err  # the log of the training that ran, then the error
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("powerbert train: error: finetune: the training loss became nan")


# ----------------------------------------------------------------------------- output and model folders


def test_output_equal_to_model_is_refused_and_the_model_untouched(tmp_path, capsys):
    model = make_model_folder(tmp_path / "model", layers=2)
    data = write_marker_csv(tmp_path / "d.csv", 20)
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    expect_error(capsys, train_args(model, data, model), "would overwrite the model folder")
    expect_error(capsys, train_args(model, data, tmp_path / "model" / ".."  / "model"), "would overwrite")
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    # a step folder of the output is the model: finetune would write into it
    shutil.copytree(model, tmp_path / "run" / "finetune")
    expect_error(capsys, train_args(tmp_path / "run" / "finetune", data, tmp_path / "run"),
                 "would overwrite the model folder")


def test_output_that_is_a_file_or_another_model_is_refused(tmp_path, model_dir, data, capsys):
    file = tmp_path / "out.txt"
    file.write_text("x")
    expect_error(capsys, train_args(model_dir, data, file), "is a file, not a folder")
    expect_error(capsys, train_args(model_dir, data, file / "sub"), "cannot be created", "is a file")
    other = make_model_folder(tmp_path / "other", layers=1)
    expect_error(capsys, train_args(model_dir, data, other), "powerbert did not write")


def test_model_folder_without_tokenizer_files(tmp_path, model_dir, data, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    out = tmp_path / "out"
    expect_error(capsys, train_args(bare, data, out), "holds no tokenizer files")
    assert not out.exists()


def test_tokenizer_that_maps_every_word_to_unk(tmp_path, model_dir, data, capsys):
    wrong = tmp_path / "wrong"
    shutil.copytree(model_dir, wrong)
    BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB[:5] + ["zzz"])}).save_pretrained(wrong)
    expect_error(capsys, train_args(wrong, data, tmp_path / "out"), "maps every word", "[UNK]")


def test_model_folder_without_weights(tmp_path, model_dir, data, capsys):
    empty = tmp_path / "noweights"
    shutil.copytree(model_dir, empty, ignore=shutil.ignore_patterns("*.safetensors"))
    expect_error(capsys, train_args(empty, data, tmp_path / "out"), "holds no model weights")
    expect_error(capsys, ("evaluate", "--model", empty, "--data", data), "holds no model weights")


def test_unsupported_architecture(tmp_path, model_dir, data, capsys):
    gpt2 = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=len(VOCAB), n_positions=32)).save_pretrained(gpt2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, gpt2 / name)
    expect_error(capsys, train_args(gpt2, data, tmp_path / "out"), "does not support model_type 'gpt2'",
                 "supported: bert")
    expect_error(capsys, ("evaluate", "--model", gpt2, "--data", data), "does not support model_type 'gpt2'")


def test_max_length_above_the_model_positions(tmp_path, model_dir, data, capsys):
    argv = train_args(model_dir, data, tmp_path / "out")
    expect_error(capsys, (*argv, "--max-length", 33), "33 exceeds the 32 positions", "use at most 32")
    expect_error(capsys, ("evaluate", "--model", model_dir, "--data", data, "--max-length", 64),
                 "64 exceeds the 32 positions")
    assert model_folder.max_positions({"model_type": "roberta", "max_position_embeddings": 514, "pad_token_id": 1}) == 512
    assert model_folder.max_positions({"model_type": "xlm-roberta", "max_position_embeddings": 514}) == 512
    assert model_folder.max_positions({"model_type": "bert", "max_position_embeddings": 512}) == 512


def test_evaluate_defaults_n_to_the_model_positions(tmp_path, model_dir, data, capsys):
    # a plain model folder has no powerbert_max_length: N = min(128, its 32 positions)
    status = run_cli("finetune", "--model", model_dir, "--data", data, "--output", tmp_path / "o", *FAST)
    assert status == 0
    capsys.readouterr()
    config = json.loads((tmp_path / "o" / "finetune" / "config.json").read_text())
    del config["powerbert_max_length"]
    (tmp_path / "o" / "finetune" / "config.json").write_text(json.dumps(config))
    assert run_cli("evaluate", "--model", tmp_path / "o" / "finetune", "--data", data) == 0
    assert json.loads(capsys.readouterr().out)["max_length"] == 32


# ----------------------------------------------------------------------------- data files


def test_tsv_keeps_quotes_as_text(tmp_path, model_dir, capsys):
    rows = marker_rows(20)
    rows[3] = ('"the film" is great', 1)
    rows[6] = ('"an opening quote that never closes', 0)
    path = tmp_path / "glue.tsv"
    path.write_text("\n".join(f"{t}\t{y}" for t, y in rows) + "\n", encoding="utf-8")
    examples = D.load_examples(path)
    assert len(examples) == 20
    assert examples.texts[2] == '"the film" is great' and examples.texts[5].startswith('"an opening')
    out = tmp_path / "out"
    assert run_cli("finetune", "--model", model_dir, "--data", path, "--output", out, *FAST,
                   "--finetune-epochs", 0) == 0
    record = json.loads((out / "finetune" / "done.json").read_text())
    assert record["train_examples"] + record["dev_examples"] == 20


def test_csv_row_with_the_wrong_number_of_fields(tmp_path, model_dir, capsys):
    path = tmp_path / "d.csv"
    path.write_text('text,label\nw1 w2,0\n"w3, w4,1\nw5,0\n')  # an unbalanced quote swallows the rest
    expect_error(capsys, train_args(model_dir, path, tmp_path / "out"), "d.csv:3", "fields where the header has 2")


def test_csv_field_over_128_kb(tmp_path, model_dir, capsys):
    rows = marker_rows(20)
    rows[4] = (" ".join(WORDS[i % len(WORDS)] for i in range(40_000)), 1)  # ~200 KB
    path = write_rows(tmp_path / "long.csv", rows)
    assert len(D.load_examples(path).texts[3]) > 128 * 1024
    out = tmp_path / "out"
    assert run_cli("finetune", "--model", model_dir, "--data", path, "--output", out, *FAST,
                   "--finetune-epochs", 0) == 0


def test_non_utf8_input_names_file_and_line(tmp_path, model_dir, capsys):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\nw1 w2,0\nw3 caf\u00e9,1\n".encode("latin-1"))
    expect_error(capsys, train_args(model_dir, path, tmp_path / "out"), "latin1.csv:3", "not UTF-8")
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_bytes(b'{"text": "a", "label": 0}\n{"text": "\xff", "label": 1}\n')
    expect_error(capsys, ("evaluate", "--model", model_dir, "--data", jsonl, "--max-length", 16), "d.jsonl:2")


# ----------------------------------------------------------------------------- movie-review sdist


def test_bad_sdist_is_a_one_line_error(tmp_path, capsys):
    garbage = tmp_path / "vaderSentiment-3.3.2.tar.gz"
    garbage.write_bytes(b"not a gzip archive" * 10)
    out = tmp_path / "mr.csv"
    expect_error(capsys, ("fetch-movie-reviews", "--output", out, "--sdist", garbage), "not a readable", "sdist")
    truncated = tmp_path / "truncated.tar.gz"
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/README.md")
        payload = b"readme " * 5000
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    truncated.write_bytes(buffer.getvalue()[:200])
    expect_error(capsys, ("fetch-movie-reviews", "--output", out, "--sdist", truncated), "truncated.tar.gz")
    wrong = tmp_path / "wrong.tar.gz"
    wrong.write_bytes(buffer.getvalue())
    expect_error(capsys, ("fetch-movie-reviews", "--output", out, "--sdist", wrong), "not found in",
                 "not the vaderSentiment")
    expect_error(capsys, ("fetch-movie-reviews", "--output", out, "--sdist", tmp_path / "nope.tar.gz"),
                 "sdist not found")
    expect_error(capsys, ("fetch-movie-reviews", "--output", tmp_path, "--sdist", wrong), "is a folder")
    assert not out.exists()


# ----------------------------------------------------------------------------- the step cache


@pytest.fixture(scope="module")
def trained(root, model_dir, data):
    out = root / "trained"
    assert run_cli(*train_args(model_dir, data, out, "--lambda", "1e-2", "--seed", 1)) == 0
    return out


def snapshot(out):
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != "powerbert.log"}


def test_rerun_with_the_same_settings_skips_every_step(trained, model_dir, data, capsys):
    before = snapshot(trained)
    assert run_cli(*train_args(model_dir, data, trained, "--lambda", "1e-2", "--seed", 1)) == 0
    err = capsys.readouterr().err
    assert err.count("already done with these settings") == 3
    after = snapshot(trained)
    assert {k: v for k, v in after.items() if k != "metrics.json"} == {k: v for k, v in before.items()
                                                                        if k != "metrics.json"}
    assert json.loads(after["metrics.json"])["settings"] == json.loads(before["metrics.json"])["settings"]


def test_rerun_with_other_settings_stops_before_anything_changes(trained, root, model_dir, data, capsys):
    before = snapshot(trained)
    other_data = write_marker_csv(root / "other.csv", 48, seed=5)
    other_model = make_model_folder(root / "other_model", layers=2)
    (other_model / "config.json").write_text((other_model / "config.json").read_text().replace('"gelu"', '"relu"'))
    base = train_args(model_dir, data, trained, "--lambda", "1e-2", "--seed", 1)
    cases = [
        (train_args(model_dir, other_data, trained, "--lambda", "1e-2", "--seed", 1), ["finetune", "data content"]),
        ((*base, "--max-length", 12), ["finetune", "max_length 16 -> 12"]),
        (train_args(model_dir, data, trained, "--lambda", "1e-3", "--seed", 1), ["search", "lambda 0.01 -> 0.001"]),
        (train_args(other_model, data, trained, "--lambda", "1e-2", "--seed", 1), ["finetune", "model weights"]),
        ((*base, "--retrain-epochs", 2), ["retrain", "retrain_epochs 1 -> 2"]),
        ((*base, "--task", "regression"), ["finetune", "task 'auto' -> 'regression'"]),
        ((*base, "--retention-mode", "proportional"), ["search", "retention_mode 'fixed' -> 'proportional'"]),
    ]
    for argv, fragments in cases:
        err = expect_error(capsys, argv, "was made with other settings", "--overwrite", *fragments)
        assert f"{trained / fragments[0]}" in err
    # the step commands check their own step's key
    expect_error(capsys, ("search", "--data", data, "--output", trained, *FAST, "--lambda", "5e-2", "--seed", 1),
                 "search was made with other settings", "lambda 0.01 -> 0.05")
    # retrain runs what the search learned: asked for the other mode, it says so before anything runs
    expect_error(capsys, ("retrain", "--data", data, "--output", trained, *FAST, "--seed", 1,
                          "--retention-mode", "proportional"),
                 "learned a fixed configuration", "retrain with --retention-mode fixed")
    assert snapshot(trained) == before
    metrics = json.loads(before["metrics.json"])
    assert metrics["settings"]["lambda"] == 1e-2 and metrics["settings"]["max_length"] == 16


def test_overwrite_recomputes_the_changed_step_and_the_later_ones(trained, root, model_dir, data, capsys):
    out = root / "overwritten"
    shutil.copytree(trained, out)
    finetuned = (out / "finetune" / "model.safetensors").read_bytes()
    assert run_cli(*train_args(model_dir, data, out, "--lambda", "1e-3", "--seed", 1, "--overwrite")) == 0
    err = capsys.readouterr().err
    assert "overwrite: removed" in err and "finetune: already done" in err
    assert (out / "finetune" / "model.safetensors").read_bytes() == finetuned
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["lambda"] == 1e-3 and metrics["lambda"] == 1e-3
    search = json.loads((out / "search" / "settings.json").read_text())
    assert search["settings"]["lambda"] == 1e-3
    config = json.loads((out / "config.json").read_text())
    assert config["powerbert_retention"] == json.loads((out / "search" / "done.json").read_text())["configuration"]


def test_step_folders_without_settings_are_reused_with_a_warning(trained, root, model_dir, data, capsys):
    out = root / "legacy"
    shutil.copytree(trained, out)
    for step in training_config.STEPS:
        (out / step / "settings.json").unlink()
    assert run_cli(*train_args(model_dir, data, out, "--lambda", "1e-2", "--seed", 1)) == 0
    err = capsys.readouterr().err
    assert err.count("reusing it unverified") == 3
    assert json.loads((out / "metrics.json").read_text())["settings"]["unverified"] == list(training_config.STEPS)


# ----------------------------------------------------------------------------- lr_soft


def test_default_lr_soft_is_bounded_on_small_data(trained):
    assert training_trainer.default_lr_soft(2) == training_trainer.LR_SOFT_MAX == 0.05
    assert training_trainer.default_lr_soft(100) == pytest.approx(0.03)
    assert training_trainer.default_lr_soft(10**6) == training_trainer.LR_SOFT_MIN
    metrics = json.loads((trained / "metrics.json").read_text())
    assert metrics["lr_soft"] == 0.05  # 3 search steps: 3 / 3 = 1.0 before the bound
    assert any("only 3 optimiser steps" in w for w in metrics["warnings"])


def test_search_ending_with_every_layer_at_its_minimum_warns(trained, tmp_path, data, capsys):
    shutil.copytree(trained / "finetune", tmp_path / "finetune")
    argv = ("search", "--data", data, "--output", tmp_path, *FAST, "--seed", 1, "--lambda", "1", "--lr-soft", "0.5")
    assert run_cli(*argv) == 0
    err = capsys.readouterr().err
    assert "lr_soft 0.5 is above 0.1" in err
    assert "every layer at its minimum" in err
    record = json.loads((tmp_path / "search" / "done.json").read_text())
    assert record["configuration"] == [1, 1]
    assert any("every layer at its minimum" in w for w in record["warnings"])


def test_step_commands_record_their_own_settings_in_metrics(tmp_path, model_dir, data):
    out = tmp_path / "out"
    common = ("--data", data, "--output", out, "--max-length", 16, "--epochs", 1, "--lr-bert", "1e-3", "--no-progress")
    assert run_cli("finetune", "--model", model_dir, *common, "--batch-size", 16) == 0
    assert run_cli("search", *common, "--batch-size", 8, "--lambda", "1e-2") == 0
    assert run_cli("retrain", *common, "--batch-size", 8) == 0
    settings = json.loads((out / "metrics.json").read_text())["settings"]
    assert settings["batch_size"] == {"finetune": 16, "search": 8, "retrain": 8}
    assert settings["lambda"] == 1e-2 and settings["max_length"] == 16 and settings["model"] == str(model_dir)
