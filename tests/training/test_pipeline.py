"""The three-step pipeline on a tiny random BERT and a synthetic task; training with elimination."""
import dataclasses
import json
import random

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification, BertTokenizer

import powerbert
from powerbert.training import config as training_config
from powerbert.training import export as training_export
from powerbert.training import lambda_search
from powerbert.training import loop as training_loop
from powerbert.elimination import retention
from powerbert.training import steps as training_steps
from powerbert.training import task as training_task
from powerbert.training import trainer as training_trainer
from tiny_task import LAYERS, N, WORDS, interrupt_at_evaluation, make_model_folder, write_marker_csv


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipeline_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    model_dir = make_model_folder(root / "model")
    data = write_marker_csv(root / "train.csv", 480)
    cfg = training_config.PipelineConfig(
        model=str(model_dir), data=str(data), output=str(root / "out"), dev_fraction=0.2, max_length=N,
        finetune_epochs=4, search_epochs=2, retrain_epochs=1, batch_size=16, lr_bert=2e-3, lr_soft=0.05,
        lam=1e-2, seed=0, progress=False,
    )
    metrics = training_steps.run(cfg)
    return cfg, metrics


def test_search_learns_small_configuration_and_retrain_recovers(pipeline_run):
    cfg, metrics = pipeline_run
    steps = metrics["steps"]
    assert steps["finetune"]["best"]["value"] >= 0.95
    configuration = metrics["configuration"]
    assert len(configuration) == LAYERS and list(configuration) == sorted(configuration, reverse=True)
    assert configuration[-1] <= 2 and configuration[-2] <= 3  # late layers keep far fewer than N = 16
    assert steps["retrain"]["best"]["value"] >= 0.95
    assert metrics["vectors_total"] == LAYERS * N and metrics["vectors_kept"] == sum(configuration)
    assert metrics["vector_ratio"] == pytest.approx(powerbert.vector_ratio(configuration, N))
    assert metrics["flops_ideal"] > 1
    assert all(steps[s]["wall_s"] > 0 for s in training_config.STEPS)


def test_saved_result_loads_and_patches_with_learned_configuration(pipeline_run):
    cfg, metrics = pipeline_run
    out = cfg.output
    assert json.loads(open(f"{out}/metrics.json").read())["configuration"] == metrics["configuration"]
    assert json.loads(open(f"{out}/config.json").read())["powerbert_retention"] == metrics["configuration"]
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    powerbert.patch(model)
    assert powerbert.patched_retention(model) == tuple(metrics["configuration"])
    result = training_export.evaluate(out, cfg.data, max_examples=96)
    assert result["configuration"] == metrics["configuration"] and result["max_length"] == N
    assert result["value"] >= 0.9


def test_rerun_skips_finished_steps(pipeline_run, caplog):
    cfg, metrics = pipeline_run
    with caplog.at_level("INFO", logger="powerbert"):
        again = training_steps.run(cfg)
    assert again["configuration"] == metrics["configuration"]
    assert sum("already done" in r.message for r in caplog.records) == 3


def test_missing_previous_step_is_a_clear_error(tmp_path):
    cfg = training_config.PipelineConfig(data="x.csv", output=str(tmp_path))
    with pytest.raises(SystemExit, match="finetune"):
        training_steps.search(cfg)


# ----------------------------------------------------------------------------- training with elimination


def test_patched_model_trains_with_hard_extraction():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(config)
    powerbert.patch(model, [6, 3, 2])
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 101, (4, 12), generator=g)
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[2:, 9:] = 0
    labels = torch.tensor([0, 1, 1, 0])

    model.train()  # dropout on: two passes differ
    assert not torch.equal(model(input_ids=ids, attention_mask=mask).logits,
                           model(input_ids=ids, attention_mask=mask).logits)

    def eval_loss():
        model.eval()
        with torch.no_grad():
            return nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels).item()

    before = eval_loss()
    model.train()
    loss = nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, labels)
    loss.backward()
    for index, layer in enumerate(model.bert.encoder.layer):
        for name, p in layer.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"layer {index} {name}"
        assert layer.intermediate.dense.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert eval_loss() != pytest.approx(before, abs=1e-6)
    assert powerbert.patched_retention(model) == (6, 3, 2)


def test_interrupted_step_resumes_from_epoch_checkpoint(tmp_path, monkeypatch, caplog):
    model_dir = make_model_folder(tmp_path / "model", layers=2)
    data = write_marker_csv(tmp_path / "train.csv", 96)

    def config(out):
        return training_config.PipelineConfig(model=str(model_dir), data=str(data), output=str(tmp_path / out),
                                       max_length=N, epochs=3, batch_size=16, lr_bert=1e-3, progress=False)

    straight = training_steps.finetune(config("straight"))

    interrupt_at_evaluation(monkeypatch, 2)  # the evaluation that ends epoch 2, before its checkpoint
    with pytest.raises(KeyboardInterrupt):
        training_steps.finetune(config("resumed"))
    checkpoints = tmp_path / "resumed" / "finetune" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["checkpoint-6"]  # epoch 1 of 6 steps; Trainer's rotation
    assert (checkpoints / "checkpoint-6" / training_loop.HISTORY).is_file()
    assert not (tmp_path / "resumed" / "finetune" / "done.json").exists()
    with caplog.at_level("INFO", logger="powerbert"):
        resumed = training_steps.finetune(config("resumed"))
    assert any("resuming after epoch 1" in r.message for r in caplog.records)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    for a, b in zip(straight["history"], resumed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
    assert not checkpoints.exists()
    assert resumed["best"] == straight["best"] and resumed["world_size"] == 1


def test_regression_labels_finetune_with_mse(tmp_path):
    model_dir = make_model_folder(tmp_path / "model", layers=2)
    data = tmp_path / "scores.jsonl"
    rng = random.Random(0)
    data.write_text("\n".join(json.dumps({"sentence": " ".join(rng.choice(WORDS) for _ in range(5)),
                                          "score": rng.random() * 5}) for _ in range(64)))
    cfg = training_config.PipelineConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "out"),
                                  label_column="score", max_length=N, epochs=1, batch_size=16, progress=False)
    record = training_steps.finetune(cfg)
    assert record["best"]["metric"] == "pearson" and "mse" in record["best"]
    config = json.loads((tmp_path / "out" / "finetune" / "config.json").read_text())
    assert config["problem_type"] == "regression" and len(config["id2label"]) == 1


def _search_toward(cfg, tmp_path, speedup: float, trials: int):
    """A ``--target-speedup`` search in ``tmp_path`` from ``cfg``'s finished fine-tune:
    (the search record, the config it ran with)."""
    import shutil

    shutil.copytree(f"{cfg.output}/finetune", tmp_path / "finetune")
    target = dataclasses.replace(cfg, output=str(tmp_path), lam=None, target_speedup=speedup, target_trials=trials,
                                 target_subset=96, search_epochs=1)
    return training_steps.search(target), target


def test_target_speedup_bisects_lambda(pipeline_run, tmp_path):
    import math

    cfg, _ = pipeline_run
    record, _ = _search_toward(cfg, tmp_path, 4.0, 3)
    trials = record["lambda_trials"]
    assert [t["lambda"] for t in trials[:2]] == pytest.approx([1e-3, 1e-4 if trials[0]["vector_ratio"] >= 4 else 1e-2])
    closest = min(trials, key=lambda t: abs(math.log(t["vector_ratio"] / 4.0)))
    assert record["lambda"] == closest["lambda"]
    assert record["wall_s"] >= record["lambda_search_s"] > 0
    assert json.loads((tmp_path / "search" / "lambda.json").read_text())["lambda"] == record["lambda"]


def test_lambda_trials_travel_as_far_as_the_full_search():
    cfg = training_config.PipelineConfig(data="d.csv", output="o", batch_size=32, search_epochs=1)
    # the default lr_soft: 3 / trial steps, as the reproduce study's trials ran (4000 examples, subset 256)
    assert training_trainer.default_lr_soft(125) == pytest.approx(0.024)
    assert lambda_search.trial_lr_soft(cfg, 4000, 256) == pytest.approx(3 / 8)
    # a small data set: the full search is capped at 0.05, and so is a trial over the same examples
    assert lambda_search.trial_lr_soft(cfg, 43, 43) == pytest.approx(0.05)
    # a given lr_soft: the trial covers the full search's travel in fewer steps, at most 0.5
    given = dataclasses.replace(cfg, lr_soft=1e-3)
    assert lambda_search.trial_lr_soft(given, 3200, 320) == pytest.approx(1e-2)
    assert lambda_search.trial_lr_soft(dataclasses.replace(cfg, lr_soft=3e-3), 96_000, 32) == lambda_search.LR_SOFT_TRIAL_MAX


# ----------------------------------------------------------------------------- proportional retention (§8)


@pytest.fixture(scope="module")
def proportional_run(pipeline_run, tmp_path_factory):
    """The same run with --retention-mode proportional, from the same fine-tuned weights."""
    import shutil

    cfg, _ = pipeline_run
    out = tmp_path_factory.mktemp("proportional")
    shutil.copytree(f"{cfg.output}/finetune", out / "finetune")
    proportional = dataclasses.replace(cfg, output=str(out), retention_mode="proportional")
    return proportional, training_steps.run(proportional)


def test_proportional_search_learns_fractions_and_exports_them(proportional_run):
    from powerbert.elimination.retention import keep_counts

    cfg, metrics = proportional_run
    configuration = metrics["configuration"]
    assert metrics["retention_mode"] == "proportional"
    assert len(configuration) == LAYERS and all(isinstance(f, float) and 0 < f <= 1 for f in configuration)
    assert configuration == sorted(configuration, reverse=True) and configuration[-1] < 0.5
    assert metrics["steps"]["retrain"]["best"]["value"] >= 0.9
    # at N, and over the dev set's real lengths
    assert metrics["vector_ratio"] == pytest.approx(powerbert.vector_ratio(configuration, N))
    assert metrics["vectors_kept"] == sum(keep_counts(configuration, N))
    assert metrics["mean_kept_share"] == pytest.approx(sum(configuration) / LAYERS, abs=1e-4)
    tokenizer = BertTokenizer.from_pretrained(f"{cfg.output}/finetune")
    lengths = training_task.real_lengths(training_task.prepare_task(cfg, tokenizer).dev)
    real = metrics["dev_real_lengths"]
    assert real["examples"] == len(lengths) and real["mean"] == pytest.approx(lengths.double().mean().item(), abs=1e-3)
    assert real["vector_ratio"] == pytest.approx(retention.real_length_ratio(configuration, lengths)) and real[
        "vector_ratio"] > 1
    search = json.loads(open(f"{cfg.output}/search/done.json").read())
    assert search["retention_mode"] == "proportional" and search["configuration"] == configuration
    assert all("shares" in h for h in search["history"])
    # config.json holds floats, and the exported model patches itself from them
    assert json.loads(open(f"{cfg.output}/config.json").read())["powerbert_retention"] == configuration
    model = AutoModelForSequenceClassification.from_pretrained(cfg.output).eval()
    powerbert.patch(model)
    assert powerbert.patched_retention(model) == tuple(configuration)
    result = training_export.evaluate(cfg.output, cfg.data, max_examples=96)
    assert result["configuration"] == configuration and result["value"] >= 0.9


def test_real_length_ratio_either_kind():
    lengths = torch.tensor([4, 10, 16])
    # fixed: min(k_l, len_i) -> (4 + 4) + (8 + 4) + (8 + 4) = 32 of 2 * 30 token-layers
    assert retention.real_length_ratio([8, 4], lengths) == pytest.approx(60 / 32)
    # proportional: ceil(f * len): (2 + 1) + (5 + 3) + (8 + 4) = 23
    assert retention.real_length_ratio([0.5, 0.25], lengths) == pytest.approx(60 / 23)


def test_changing_the_retention_mode_stops_or_recomputes(proportional_run, pipeline_run, tmp_path, caplog):
    import shutil

    cfg, metrics = proportional_run
    fixed = dataclasses.replace(cfg, retention_mode="fixed")
    with pytest.raises(ValueError, match="search was made with other settings.*retention_mode 'proportional' -> "
                                         "'fixed'"):
        training_steps.run(fixed)
    # retrain alone runs what the search learned: another mode is refused, naming both ways out
    with pytest.raises(ValueError, match="learned a proportional configuration.*--retention-mode proportional"):
        training_steps.retrain(fixed)
    assert json.loads(open(f"{cfg.output}/metrics.json").read())["configuration"] == metrics["configuration"]
    # step folders written before the setting existed are fixed-mode folders, reused as such
    fixed_cfg, fixed_metrics = pipeline_run
    legacy = dataclasses.replace(fixed_cfg, output=str(tmp_path / "legacy"))
    shutil.copytree(fixed_cfg.output, legacy.output)
    for step in ("search", "retrain"):
        path = tmp_path / "legacy" / step / "settings.json"
        key = json.loads(path.read_text())
        del key["settings"]["retention_mode"]
        path.write_text(json.dumps(key))
    with caplog.at_level("INFO", logger="powerbert"):
        assert training_steps.run(legacy)["configuration"] == fixed_metrics["configuration"]
    assert sum("already done" in r.message for r in caplog.records) == 3
    with pytest.raises(ValueError, match="retention_mode 'fixed' -> 'proportional'"):
        training_steps.run(dataclasses.replace(legacy, retention_mode="proportional"))


def test_target_speedup_in_proportional_mode_aims_at_real_lengths(proportional_run, tmp_path):
    cfg, _ = proportional_run
    record, target = _search_toward(cfg, tmp_path, 2.0, 2)
    assert record["target_ratio_basis"] == "over the dev set's real lengths"
    tokenizer = BertTokenizer.from_pretrained(f"{cfg.output}/finetune")
    lengths = training_task.real_lengths(training_task.prepare_task(target, tokenizer).dev)
    for trial in record["lambda_trials"]:
        assert all(isinstance(f, float) for f in trial["configuration"])
        assert trial["vector_ratio"] == pytest.approx(retention.real_length_ratio(trial["configuration"], lengths))
    assert record["lambda"] in [t["lambda"] for t in record["lambda_trials"]]
