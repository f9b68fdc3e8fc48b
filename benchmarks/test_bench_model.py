"""End-to-end: patched vs stock BERT-base-shape model.

Run: ``pytest benchmarks/test_bench_model.py --benchmark-only -s``. Every model of a case is
timed in the same run on the same inputs; the last test of each case prints and stores the
speedups beside both ideals of ALGORITHM.md §6 (vector ratio L·N/Σk and the FLOPs ideal) in
``benchmarks/results/model_e2e_<device>.json``.

Cases: CPU fp32 batch 16, N 128 (issue 2); CUDA fp16 batch 64, N 128 and N 512 (issue 5).
"""
from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel

import powerbert

RETENTION_128 = (77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3)
RETENTION_512 = tuple(4 * k for k in RETENTION_128)  # the same fractions of N
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
CASES = [(16, 128, RETENTION_128)] if DEVICE == "cpu" else [(64, 128, RETENTION_128), (64, 512, RETENTION_512)]
MODELS = [  # name, class, attn_implementation, patched
    ("stock-sdpa", BertModel, "sdpa", False),
    ("stock-eager", BertModel, "eager", False),
    ("patched", BertModel, "sdpa", True),
    ("stock-cls-head", BertForSequenceClassification, "sdpa", False),
    ("patched-cls-head", BertForSequenceClassification, "sdpa", True),
]
PAIRS = [("patched", "stock-sdpa"), ("patched", "stock-eager"), ("patched-cls-head", "stock-cls-head")]
# Each patched model is also timed interleaved with its stock twin (one stock call before every
# patched round, in pytest-benchmark's untimed setup), so load changes on a shared machine hit
# both alike: the "paired" speedup is the median of the per-round ratios.
PAIRED_BASELINE = {"patched": ("stock-sdpa", BertModel), "patched-cls-head": ("stock-cls-head", BertForSequenceClassification)}
RESULTS = Path(__file__).parent / "results"
_medians: dict[tuple, float] = {}
_paired: dict[tuple, tuple[str, float]] = {}


def _inputs(batch: int, length: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (batch, length), generator=g)
    # Every position real: the paper's setting, inputs padded (here: filled) to N.
    return dict(input_ids=ids.to(DEVICE), attention_mask=torch.ones_like(ids).to(DEVICE))


def _model(cls, attn: str, patched: bool, retention):
    torch.manual_seed(0)
    model = cls(BertConfig())  # BERT-base shape: L 12, D 768, H 12, I 3072
    model.set_attn_implementation(attn)
    model = model.to(DEVICE, DTYPE).eval()
    return powerbert.patch(model, retention) if patched else model


@pytest.mark.parametrize("name, cls, attn, patched", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("batch, length, retention", CASES, ids=[f"B{b}-N{n}" for b, n, _ in CASES])
def test_e2e(benchmark, batch, length, retention, name, cls, attn, patched):
    model = _model(cls, attn, patched, retention)
    inputs = _inputs(batch, length)

    def step(m=model):
        with torch.inference_mode():
            out = m(**inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    twin_times, setup = [], None
    if name in PAIRED_BASELINE:
        twin_name, twin_cls = PAIRED_BASELINE[name]
        twin = _model(twin_cls, "sdpa", False, retention)

        def setup():
            start = time.perf_counter()
            step(twin)
            twin_times.append(time.perf_counter() - start)

    rounds = 7 if DEVICE == "cpu" else 30
    benchmark.group = f"bert-base e2e B{batch} N{length} {DEVICE} {str(DTYPE)[6:]}"
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=2 if setup is None else 0)
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=batch, length=length)
    _medians[(batch, length, name)] = benchmark.stats.stats.median
    if twin_times:
        ratios = sorted(t / p for t, p in zip(twin_times, benchmark.stats.stats.data))
        _paired[(batch, length, name)] = (twin_name, statistics.median(ratios))
        benchmark.extra_info["paired_speedup_vs_" + twin_name] = statistics.median(ratios)
    if name == MODELS[-1][0]:
        _report(benchmark, batch, length, retention)


def _report(benchmark, batch, length, retention):
    config = BertConfig()
    ideal_vectors = powerbert.vector_ratio(retention, length)
    ideal_flops = powerbert.flops_ideal(retention, length, config.hidden_size, config.intermediate_size)
    rows = []
    for patched, stock in PAIRS:
        if (batch, length, patched) in _medians and (batch, length, stock) in _medians:
            p, s = _medians[(batch, length, patched)], _medians[(batch, length, stock)]
            twin, paired = _paired.get((batch, length, patched), (None, None))
            rows.append(dict(
                patched=patched, baseline=stock, patched_ms=1e3 * p, baseline_ms=1e3 * s,
                speedup=s / p, paired_speedup=paired if twin == stock else None,
                ideal_vector_ratio=ideal_vectors, ideal_flops=ideal_flops,
                fraction_of_vector_ideal=s / p / ideal_vectors,
            ))
    print(f"\nBERT-base B={batch} N={length} retention={retention} on {DEVICE} {DTYPE}")
    print(f"{'patched':<18}{'baseline':<16}{'patched ms':>11}{'base ms':>10}{'speedup':>9}{'paired':>8}"
          f"{'vec ideal':>10}{'FLOP ideal':>11}{'of vec':>8}")
    for r in rows:
        paired = f"{r['paired_speedup']:>7.2f}x" if r["paired_speedup"] else f"{'-':>8}"
        print(f"{r['patched']:<18}{r['baseline']:<16}{r['patched_ms']:>11.1f}{r['baseline_ms']:>10.1f}"
              f"{r['speedup']:>8.2f}x{paired}{r['ideal_vector_ratio']:>9.2f}x{r['ideal_flops']:>10.2f}x"
              f"{r['fraction_of_vector_ideal']:>8.2f}")
    benchmark.extra_info["speedups"] = rows
    path = RESULTS / f"model_e2e_{DEVICE}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(
        device=DEVICE if DEVICE == "cpu" else torch.cuda.get_device_name(),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        dtype=str(DTYPE), torch=torch.__version__, transformers=transformers.__version__,
    )
    record.setdefault("cases", {})[f"B{batch}-N{length}"] = dict(retention=retention, rows=rows)
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
