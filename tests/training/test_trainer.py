"""PoWER-BERT on ``transformers.Trainer``: ``powerbert.training.trainer.SearchTrainer`` in a user's own
script, and the pipeline data-parallel under ``torchrun`` (2 processes, gloo on this CPU)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import powerbert
from powerbert.training import distributed
from powerbert.training import config as training_config
from powerbert.training import loop as training_loop
from powerbert.training import steps as training_steps
from powerbert.training.trainer import SOFT_MODULE, SearchTrainer, task_metrics
from tiny_task import N, VOCAB, interrupt_at_evaluation, make_model_folder, write_marker_csv

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def rows(count, seed=0):
    """Dict rows as a user's dataset holds them: ids padded to N, a mask, a label."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = int(torch.randint(4, N, (1,), generator=g))
        ids = torch.zeros(N, dtype=torch.long)
        ids[:length] = torch.randint(6, len(VOCAB), (length,), generator=g)
        ids[0] = VOCAB.index("[CLS]")
        out.append({"input_ids": ids, "attention_mask": (ids != 0).long(), "labels": torch.tensor(i % 2)})
    return out


def search(tmp_path, name, **overrides):
    model = tiny_model()
    settings = dict(output_dir=str(tmp_path / name), num_train_epochs=1, per_device_train_batch_size=16,
                    learning_rate=1e-3, warmup_steps=0.1, report_to="none", disable_tqdm=True, save_strategy="no",
                    use_cpu=True, seed=0)
    settings.update(overrides)
    trainer = SearchTrainer(model=model, args=TrainingArguments(**settings), train_dataset=rows(64),
                            eval_dataset=rows(16, seed=1), compute_metrics=task_metrics(False), max_length=N,
                            lam=3e-2, lr_soft=0.05)
    return model, trainer


def test_search_trainer_in_a_user_script(tmp_path):
    model, trainer = search(tmp_path, "search")
    stock_keys = set(model.state_dict())
    result = trainer.train()
    groups = trainer.optimizer.param_groups
    assert [g["lr"] for g in groups][-1] == 0.0 and len(groups) == 3  # linear decay to 0 over both rates
    assert groups[-1]["initial_lr"] == 0.05 and groups[0]["initial_lr"] == 1e-3
    retention = trainer.soft.retention.detach()
    assert retention.min() >= 0 and retention.max() <= 1 and retention.min() < 1  # trained and projected
    assert set(model.state_dict()) == stock_keys and SOFT_MODULE not in dict(model.named_children())
    assert trainer.evaluate()["eval_value"] >= 0 and result.training_loss > 0
    configuration = trainer.detach()
    assert len(configuration) == 3 and list(configuration) == sorted(configuration, reverse=True)
    assert not trainer.soft.attached
    powerbert.patch(model, configuration)  # step 3, re-training, starts from here


def test_gradient_accumulation_adds_the_regulariser_once_per_step(tmp_path):
    # batch 16 in one step == 2 micro-batches of 8 accumulated (no dropout): the same r afterwards
    _, whole = search(tmp_path, "whole")
    whole.train()
    _, accumulated = search(tmp_path, "accumulated", per_device_train_batch_size=8, gradient_accumulation_steps=2)
    accumulated.train()
    torch.testing.assert_close(accumulated.soft.retention, whole.soft.retention, atol=1e-5, rtol=0)
    assert accumulated.state.log_history[-1]["train_loss"] == pytest.approx(
        whole.state.log_history[-1]["train_loss"], rel=1e-4)


def test_non_finite_loss_stops_the_search(tmp_path):
    _, trainer = search(tmp_path, "nan", learning_rate=1e30)
    with pytest.raises(ValueError, match="the training loss became nan in epoch 1.*lr_soft 0.05"):
        trainer.train()


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun (torch's launcher) is not beside this Python")
def test_torchrun_two_processes_train_like_one(tmp_path, monkeypatch):
    """2 processes (gloo) split each batch of 16 in two and average gradients: with no dropout the
    training matches the single-process run's; rank 0 alone writes and logs."""
    model_dir = make_model_folder(tmp_path / "model", layers=2)
    data = write_marker_csv(tmp_path / "train.csv", 107)  # 96 train rows: whole batches of 16
    flags = ["--model", model_dir, "--data", data, "--max-length", N, "--epochs", 2, "--batch-size", 16,
             "--lambda", "1e-2", "--lr-bert", "1e-3", "--lr-soft", "0.05", "--seed", 3, "--no-progress"]
    # gloo on CPUs: the GPU run of the suite hides its one GPU (two ranks cannot share it)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    torchrun = Path(sys.executable).parent / "torchrun"
    run = subprocess.run([str(torchrun), "--nproc_per_node", "2", "-m", "powerbert.cli", "train",
                          *map(str, flags), "--output", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(run.stdout.splitlines()) == 1 and json.loads(run.stdout)["configuration"]
    monkeypatch.setattr(training_loop, "use_cpu", lambda: True)  # the one process on the CPU too, like the two
    cfg = training_config.PipelineConfig(model=str(model_dir), data=str(data), output=str(tmp_path / "one"), max_length=N,
                                  epochs=2, batch_size=16, lam=1e-2, lr_bert=1e-3, lr_soft=0.05, seed=3,
                                  progress=False)
    one, two = training_steps.run(cfg), json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["configuration"] == one["configuration"]
    for step in training_config.STEPS:
        a = json.loads((tmp_path / "one" / step / "done.json").read_text())["history"]
        b = json.loads((tmp_path / "two" / step / "done.json").read_text())["history"]
        assert [h["epoch"] for h in a] == [h["epoch"] for h in b]
        for x, y in zip(a, b):
            assert (x["train_loss"] is None) == (y["train_loss"] is None)
            if x["train_loss"] is not None:
                assert y["train_loss"] == pytest.approx(x["train_loss"], rel=1e-5)
            assert y["dev"]["value"] == x["dev"]["value"] and x.get("masses") == y.get("masses")
    # the files one process writes (and the CLI's log), and one process's log lines
    listing = lambda root: sorted(str(p.relative_to(root)) for p in root.rglob("*"))  # noqa: E731
    assert listing(tmp_path / "two") == sorted(listing(tmp_path / "one") + ["powerbert.log"])
    log = (tmp_path / "two" / "powerbert.log").read_text()
    assert log.count("powerbert train:") == 1 and log.count("retrain epoch 2") == 1


def test_more_processes_than_gpus_is_refused_in_one_line(monkeypatch):
    """Two ranks on one GPU would fail deep inside NCCL's first collective: refused up front."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"2 processes but sees 1 CUDA device.*--nproc_per_node 1"):
        distributed.check_devices()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CPUs (gloo): any number
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    distributed.check_devices()


def test_interrupted_search_resumes_with_its_retention_vectors(tmp_path, monkeypatch):
    """The Trainer checkpoint holds r (a submodule while training): a search stopped after epoch 1
    and resumed learns what an uninterrupted one does."""
    model_dir = make_model_folder(tmp_path / "model", layers=2)
    data = write_marker_csv(tmp_path / "train.csv", 96)

    def config(out):
        return training_config.PipelineConfig(model=str(model_dir), data=str(data), output=str(tmp_path / out), max_length=N,
                                       epochs=2, batch_size=16, lr_bert=1e-3, lr_soft=0.05, lam=1e-2, progress=False)

    training_steps.finetune(config("straight"))
    shutil.copytree(tmp_path / "straight" / "finetune", tmp_path / "resumed" / "finetune")
    straight = training_steps.search(config("straight"))
    interrupt_at_evaluation(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        training_steps.search(config("resumed"))
    resumed = training_steps.search(config("resumed"))
    assert [h["masses"] for h in resumed["history"]] == [h["masses"] for h in straight["history"]]
    assert resumed["configuration"] == straight["configuration"]
