"""How accurate can proportional retention be at a given speed against dynamic padding?

    python -m benchmarks.studies.reproduce.frontier --work work/reproduce --task movie_reviews \
        --seeds 0 --epochs 2 --out benchmarks/results

``make reproduce`` learns proportional configurations (powerbert/ALGORITHM.md §8) and finds none within 1
point of the baseline at >= 2.5x against dynamic padding. This asks whether *any* configuration
gets there, learned or not: it re-trains the fine-tuned model of a finished ``make reproduce``
work folder (``<work>/<task>/base/finetune``, ``seed_<s>/base/finetune`` for the other seeds)
with hard extraction under each configuration of a list, the way the pipeline's re-train step
does (same train/dev split, learning rate and batch, the untrained patched model as epoch 0, the
best dev epoch kept), and reports test accuracy beside the FLOPs ideal against dynamic padding on
the test set sorted by length in batches of the reproduce timing (powerbert/ALGORITHM.md §6 per sequence).

Writes ``proportional_frontier.json`` and ``.md`` into ``--out``; ``--append`` keeps an earlier
run's rows there that this run did not redo (more seeds or configurations). Training runs time
nothing; ``--time-rounds R`` is a separate pass, for a quiet machine, that times every configuration
of the results against stock with dynamic padding on the test set.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import powerbert
from benchmarks import common
from benchmarks.studies.reproduce.timing import Candidate, measure
from powerbert.inputs import examples as D
from powerbert.inputs.model_folder import label_space_from_config, load_model, load_tokenizer
from powerbert.training.loop import train_model
from powerbert.training.task import evaluate_model, prepare_task, real_lengths, seed_everything
from powerbert.training.config import PipelineConfig
from powerbert.elimination.retention import flops_ideal_vs_dynamic_padding, ideal_vs_dynamic_padding

# (fractions, per-layer minimums or None): shapes around an ideal of 2.2-3.0 on movie reviews,
# early layers kept whole or floored (short sentences keep more), late layers near [CLS] alone.
DEFAULT_CONFIGS = [
    ([0.868, 0.742, 0.532, 0.161, 0.089, 0.0184], None),  # what make reproduce learned (seed 0, target 3x)
    ([1.0, 0.7, 0.45, 0.1, 0.05, 0.02], None),
    ([0.5, 0.4, 0.3, 0.15, 0.08, 0.02], [24, 18, 12, 6, 3, 1]),
    ([0.5, 0.4, 0.25, 0.1, 0.05, 0.02], [24, 18, 12, 4, 2, 1]),
    ([0.6, 0.45, 0.3, 0.1, 0.05, 0.02], [24, 16, 10, 4, 2, 1]),
    ([1.0, 0.5, 0.3, 0.1, 0.05, 0.02], None),
    ([0.3, 0.2, 0.15, 0.05, 0.03, 0.02], [22, 16, 10, 3, 2, 1]),
]


def _key(fractions, minimum) -> tuple:
    """A configuration as a hashable (fractions, minimums or None), however JSON gave it."""
    return tuple(fractions), None if minimum is None else tuple(minimum)


def _minimums_text(minimum) -> str:
    return "–" if minimum is None else str(tuple(minimum))


def finetuned_folder(work: Path, task: str, seed: int, spec_seed: int) -> Path:
    """The fine-tuned model ``make reproduce`` trained at ``seed`` (its base run is the spec's seed)."""
    base = work / task / "base" / "finetune" if seed == spec_seed else work / task / f"seed_{seed}" / "base" / "finetune"
    if not (base / "config.json").is_file():
        raise SystemExit(f"no fine-tuned model at {base}: run make reproduce (or its --train-only pass) first")
    return base


def retrain_and_test(folder: Path, cfg: PipelineConfig, task, test, labels, fractions, minimum, epochs: int) -> dict:
    """Re-train a copy of ``folder``'s model patched with ``fractions`` (best dev epoch) and test it."""
    model = powerbert.patch(load_model(folder), list(fractions), retention_min=minimum)
    scratch = Path(tempfile.mkdtemp(prefix="powerbert-frontier-"))
    try:
        seed_everything(cfg.seed)
        result = train_model(model, task, cfg, step="frontier", step_dir=scratch, epochs=epochs,
                             tokenizer=task.tokenizer, initial_eval=True)
        best = powerbert.patch(load_model(scratch))  # the best dev epoch; its config.json holds the retention
        test_accuracy = evaluate_model(best, test, labels)["value"]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"dev_history": [round(100 * h["dev"]["value"], 2) for h in result["history"]],
            "best_dev_epoch": result["best"]["epoch"], "test_accuracy": 100 * test_accuracy,
            "wall_s": round(result["wall_s"], 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.reproduce.frontier", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/reproduce"), help="a finished make reproduce work folder")
    parser.add_argument("--task", default="movie_reviews")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=2, help="re-train epochs per configuration")
    parser.add_argument("--configs", type=Path, default=None,
                        help="JSON list of [fractions, minimums or null] (default: DEFAULT_CONFIGS)")
    parser.add_argument("--first", type=int, default=None, help="only the first N configurations (smoke runs)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--append", action="store_true",
                        help="keep the rows of an earlier run in --out (same task and epochs) that this run did not redo")
    parser.add_argument("--time-rounds", type=int, default=None,
                        help="train nothing: time every configuration of the results in --out against stock with "
                             "dynamic padding on the test set (alternated rounds, medians), on a quiet machine")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.time_rounds is not None:
        return time_configurations(args)
    configs = DEFAULT_CONFIGS if args.configs is None else json.loads(args.configs.read_text())
    configs = configs[:args.first]
    spec = json.loads((args.work / args.task / "spec.json").read_text())
    data = args.work / args.task / "data"
    start = time.perf_counter()
    rows = []
    for seed in args.seeds:
        folder = finetuned_folder(args.work, args.task, seed, spec["seed"])
        tokenizer = load_tokenizer(folder)
        stock = load_model(folder)
        labels = label_space_from_config(stock.config)
        hidden, intermediate = stock.config.hidden_size, stock.config.intermediate_size
        cfg = PipelineConfig(data=str(data / "train.csv"), dev=str(data / "dev.csv"), output=str(args.work / "frontier"),
                             max_length=spec["max_length"], batch_size=spec["batch_size"], lr_bert=spec["lr_bert"],
                             seed=seed, progress=False)
        task = prepare_task(cfg, tokenizer, labels)
        test = D.encode(D.load_examples(data / "test.csv"), tokenizer, labels, spec["max_length"])
        lengths = sorted(real_lengths(test).tolist())
        batches = [lengths[i:i + spec["eval_batch_size"]] for i in range(0, len(lengths), spec["eval_batch_size"])]
        baseline = 100 * evaluate_model(stock, test, labels)["value"]
        for fractions, minimum in configs:
            record = retrain_and_test(folder, cfg, task, test, labels, fractions, minimum, args.epochs)
            record.update(seed=seed, fractions=list(fractions), minimum=minimum, baseline_accuracy=baseline,
                          delta_points=record["test_accuracy"] - baseline,
                          flops_ideal_vs_dynamic=flops_ideal_vs_dynamic_padding(fractions, batches, hidden, intermediate,
                                                                                minimum),
                          vector_ideal_vs_dynamic=ideal_vs_dynamic_padding(fractions, batches, minimum, layout="padded"))
            rows.append(record)
            print(f"seed {seed} {fractions} min {minimum}: test {record['test_accuracy']:.2f} "
                  f"({record['delta_points']:+.2f}) FLOPs ideal {record['flops_ideal_vs_dynamic']:.2f}x", flush=True)
    run = {"command": shlex.join(["python", "-m", "benchmarks.studies.reproduce.frontier", *(sys.argv[1:] if argv is None else argv)]),
           "commit": common.commit(), "torch": torch.__version__, "machine": platform.machine(),
           "wall_s": round(time.perf_counter() - start, 1)}
    stored = {"task": args.task, "epochs": args.epochs, "spec": spec, "runs": [run], "rows": rows}
    previous = args.out / "proportional_frontier.json"
    if args.append and previous.is_file():
        stored = merge(json.loads(previous.read_text()), stored)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "proportional_frontier.json").write_text(json.dumps(stored, indent=2) + "\n")
    (args.out / "proportional_frontier.md").write_text(markdown(stored))
    return 0


def time_configurations(args) -> int:
    """Time each configuration of ``--out``'s results, patched into the spec seed's fine-tuned model,
    against that model unpatched, both on the test set sorted by length in the reproduce timing's
    batches (dynamic padding); ``measure`` alternates them round by round. Speed does not depend on
    the re-trained weights, only on how many vectors each layer keeps."""
    path = args.out / "proportional_frontier.json"
    stored = json.loads(path.read_text())
    spec, data = stored["spec"], args.work / stored["task"] / "data"
    folder = finetuned_folder(args.work, stored["task"], spec["seed"], spec["seed"])
    tokenizer = load_tokenizer(folder)
    stock = load_model(folder).eval()
    labels = label_space_from_config(stock.config)
    test = D.encode(D.load_examples(data / "test.csv"), tokenizer, labels, spec["max_length"])
    configs = {_key(r["fractions"], r["minimum"]) for r in stored["rows"]}
    candidates = [Candidate("stock", stock, "dynamic")]
    for fractions, minimum in sorted(configs):
        model = powerbert.patch(load_model(folder).eval(), list(fractions), retention_min=minimum)
        candidates.append(Candidate(json.dumps([list(fractions), minimum]), model, "dynamic"))
    measure(candidates, test, spec["eval_batch_size"], args.time_rounds)
    baseline = statistics.median(candidates[0].times)
    stored["timing"] = {"rounds": args.time_rounds, "threads": torch.get_num_threads(), "stock_median_s": baseline,
                        "commit": common.commit(), "configurations": [
                            {"configuration": json.loads(c.name), "median_s": statistics.median(c.times),
                             "speedup_vs_dynamic": baseline / statistics.median(c.times)} for c in candidates[1:]]}
    path.write_text(json.dumps(stored, indent=2) + "\n")
    (args.out / "proportional_frontier.md").write_text(markdown(stored))
    return 0


def merge(earlier: dict, latest: dict) -> dict:
    """``latest`` plus the rows of ``earlier`` (same task, epochs and spec) for the (seed,
    fractions, minimums) it did not recompute; both runs' commands are listed."""
    for key in ("task", "epochs", "spec"):
        if earlier.get(key) != latest[key]:
            raise SystemExit(f"--append: the earlier results differ in {key} ({earlier.get(key)!r}); "
                             "write to another --out")
    done = {(r["seed"], *_key(r["fractions"], r["minimum"])) for r in latest["rows"]}
    kept = [r for r in earlier["rows"] if (r["seed"], *_key(r["fractions"], r["minimum"])) not in done]
    return {**latest, "runs": earlier["runs"] + latest["runs"], "rows": kept + latest["rows"]}


def markdown(stored: dict) -> str:
    spec = stored["spec"]
    lines = ["# Proportional retention: accuracy against the FLOPs ideal vs dynamic padding", "",
             "; ".join(f"`{r['command']}` at commit `{r['commit']}` ({r['wall_s'] / 60:.1f} min)" for r in stored["runs"])
             + f", torch {stored['runs'][-1]['torch']}. "
             f"Task {stored['task']} (N {spec['max_length']}, train {spec['train']}, "
             f"dev {spec['dev']}, test {spec['test']}); each configuration re-trained for {stored['epochs']} "
             f"epoch(s) (lr {spec['lr_bert']}, batch {spec['batch_size']}) from the fine-tuned model of "
             "`make reproduce`, the best dev epoch kept, as the pipeline's re-train step does. Δ pts: test accuracy "
             "minus the fine-tuned model's. Ideals against dynamic padding over the test set sorted by length in "
             f"batches of {spec['eval_batch_size']} (the reproduce timing): FLOPs per sequence (powerbert/ALGORITHM.md §6, "
             "the reachable bound; the reproduce proportional models ran at 0.96-0.97 of it), vectors with each "
             "batch as wide as its widest row (§8, the layout `patch` runs)."]
    if "timing" in stored:
        t = stored["timing"]
        lines += ["", f"Measured against stock with dynamic padding (`--time-rounds {t['rounds']}`, {t['threads']} "
                  f"threads, commit `{t['commit']}`, medians of alternated rounds; stock {t['stock_median_s']:.2f} s "
                  "per test pass):", "", "| fractions | minimums | × vs dynamic padding | FLOPs ideal × | of it |",
                  "|---|---|---:|---:|---:|"]
        ideals = {_key(r["fractions"], r["minimum"]): r["flops_ideal_vs_dynamic"] for r in stored["rows"]}
        for c in sorted(t["configurations"], key=lambda c: c["speedup_vs_dynamic"]):
            fractions, minimum = c["configuration"]
            ideal = ideals[_key(fractions, minimum)]
            lines.append(f"| {tuple(fractions)} | {_minimums_text(minimum)} | "
                         f"{c['speedup_vs_dynamic']:.2f}x | {ideal:.2f} | {c['speedup_vs_dynamic'] / ideal:.2f} |")
    lines += ["", "Per seed:", "", "| seed | fractions | minimums | FLOPs ideal × | vector ideal × | dev by epoch % | "
              "test % | Δ pts |", "|---:|---|---|---:|---:|---|---:|---:|"]
    for r in sorted(stored["rows"], key=lambda r: (r["seed"], r["flops_ideal_vs_dynamic"])):
        lines.append(f"| {r['seed']} | {tuple(r['fractions'])} | {_minimums_text(r['minimum'])} | "
                     f"{r['flops_ideal_vs_dynamic']:.2f} | {r['vector_ideal_vs_dynamic']:.2f} | "
                     f"{', '.join(f'{v:.1f}' for v in r['dev_history'])} | {r['test_accuracy']:.2f} | "
                     f"{r['delta_points']:+.2f} |")
    groups: dict = {}
    for r in stored["rows"]:
        groups.setdefault(_key(r["fractions"], r["minimum"]), []).append(r)
    several = {key: rows for key, rows in groups.items() if len(rows) > 1}
    if several:
        lines += ["", "Over seeds (each seed its own fine-tuned model and baseline), mean ± std:", "",
                  "| fractions | minimums | seeds | FLOPs ideal × | Δ pts |", "|---|---|---|---:|---:|"]
        for (fractions, minimum), rows in sorted(several.items(), key=lambda kv: kv[1][0]["flops_ideal_vs_dynamic"]):
            deltas = [r["delta_points"] for r in rows]
            ideal = statistics.mean(r["flops_ideal_vs_dynamic"] for r in rows)
            lines.append(f"| {fractions} | {_minimums_text(minimum)} | "
                         f"{', '.join(str(r['seed']) for r in sorted(rows, key=lambda r: r['seed']))} | {ideal:.2f} | "
                         f"{statistics.mean(deltas):+.2f} ± {statistics.stdev(deltas):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
