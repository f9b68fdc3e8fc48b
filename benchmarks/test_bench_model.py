"""End-to-end: patched vs stock BERT-base-shape model.

Run: ``pytest benchmarks/test_bench_model.py --benchmark-only -s``. Every model of a case is
timed in the same run on the same inputs; the last test of each case prints and stores the
speedups beside both ideals of powerbert/ALGORITHM.md §6 (vector ratio L·N/Σk and the FLOPs ideal) in
``model_e2e_<device>.json`` under ``$POWERBERT_RESULTS`` (``gpu.sh`` sets it to ``$OUT``), by
default ``benchmarks/results/``.

Cases: CPU fp32 batch 16, N 128 (issue 2); CUDA fp16 batch 64, N 128 and N 512 (issue 5). Each
case runs only on its device; the dry run (``gpu.sh --dry-run``) runs the CUDA cases' code on
CPU with a tiny BERT (the patched model through the Triton path, interpreted).
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel

import powerbert
from benchmarks import common

RETENTION_128 = (77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3)
RETENTION_512 = tuple(4 * k for k in RETENTION_128)  # the same fractions of N
if common.DRY_RUN:
    CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=128)  # head dim 32: the attention kernel's smallest
    CASES = [("cuda", 2, 16, (10, 6))]
else:
    CONFIG = {}  # BERT-base shape: L 12, D 768, H 12, I 3072
    CASES = [("cpu", 16, 128, RETENTION_128), ("cuda", 64, 128, RETENTION_128), ("cuda", 64, 512, RETENTION_512)]
DTYPE = {"cpu": torch.float32, "cuda": torch.float16}  # by case; the dry run keeps the CUDA case's
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
# The row each model's ratio in table.py is taken against.
BASELINE = {"stock-sdpa": "stock-sdpa", "stock-eager": "stock-sdpa", "patched": "stock-sdpa",
            "stock-cls-head": "stock-cls-head", "patched-cls-head": "stock-cls-head"}
_medians: dict[tuple, float] = {}
_paired: dict[tuple, tuple[str, float]] = {}


def _inputs(batch: int, length: int, dev: str):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (batch, length), generator=g)
    # Every position real: the paper's setting, inputs padded (here: filled) to N.
    return dict(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))


def _model(cls, attn: str, patched: bool, retention, dev: str, dtype):
    torch.manual_seed(0)
    model = cls(BertConfig(**CONFIG))
    model.set_attn_implementation(attn)
    model = model.to(dev, dtype).eval()
    return powerbert.patch(model, retention) if patched else model


@pytest.mark.parametrize("name, cls, attn, patched", MODELS, ids=[m[0] for m in MODELS])
@pytest.mark.parametrize("case, batch, length, retention", CASES, ids=[f"{c}-B{b}-N{n}" for c, b, n, _ in CASES])
def test_e2e(benchmark, case, batch, length, retention, name, cls, attn, patched):
    if case == "cuda":
        dev = common.require_gpu_case()  # CPU in the dry run
    elif common.device() == "cuda":
        pytest.skip("the CPU case (make bench); this machine runs the CUDA cases")
    else:
        dev = "cpu"
    dtype = DTYPE[case]
    model = _model(cls, attn, patched, retention, dev, dtype)
    inputs = _inputs(batch, length, dev)

    def step(m=model):
        with torch.inference_mode(), common.triton_path():
            out = m(**inputs)
        common.synchronize(dev)
        return out

    twin_times, setup = [], None
    if name in PAIRED_BASELINE:
        twin_name, twin_cls = PAIRED_BASELINE[name]
        twin = _model(twin_cls, "sdpa", False, retention, dev, dtype)
        step(twin)  # warm the twin too: its first call may pick kernels / grow the allocator

        def setup():
            start = time.perf_counter()
            step(twin)
            twin_times.append(time.perf_counter() - start)

    # Warm-up before any timed round (``timed`` runs the model once first): the patched model
    # compiles its Triton kernels there, ~20 of them, never inside a timed round. The paired
    # models take no extra warm-up rounds, so the twin's times stay aligned with theirs.
    common.timed(benchmark, step, dev=dev, group=f"bert e2e B{batch} N{length} {dev} {str(dtype)[6:]}",
                 impl=name, baseline=BASELINE[name], sequences=batch, rounds=common.rounds(30, cpu=7),
                 warmup_rounds=2 if setup is None else 0, setup=setup, dtype=str(dtype), batch=batch,
                 length=length)
    _medians[(batch, length, name)] = benchmark.stats.stats.median
    if twin_times:
        ratios = sorted(t / p for t, p in zip(twin_times, benchmark.stats.stats.data))
        _paired[(batch, length, name)] = (twin_name, statistics.median(ratios))
        benchmark.extra_info["paired_speedup_vs_" + twin_name] = statistics.median(ratios)
    if name == MODELS[-1][0]:
        _report(benchmark, batch, length, retention, dev, dtype)


def _report(benchmark, batch, length, retention, dev, dtype):
    config = BertConfig(**CONFIG)
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
    print(f"\nBERT B={batch} N={length} retention={retention} on {dev} {dtype}")
    print(f"{'patched':<18}{'baseline':<16}{'patched ms':>11}{'base ms':>10}{'speedup':>9}{'paired':>8}"
          f"{'vec ideal':>10}{'FLOP ideal':>11}{'of vec':>8}")
    for r in rows:
        paired = f"{r['paired_speedup']:>7.2f}x" if r["paired_speedup"] else f"{'-':>8}"
        print(f"{r['patched']:<18}{r['baseline']:<16}{r['patched_ms']:>11.1f}{r['baseline_ms']:>10.1f}"
              f"{r['speedup']:>8.2f}x{paired}{r['ideal_vector_ratio']:>9.2f}x{r['ideal_flops']:>10.2f}x"
              f"{r['fraction_of_vector_ideal']:>8.2f}")
    benchmark.extra_info["speedups"] = rows
    path = common.RESULTS / f"model_e2e_{dev}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record.update(
        device=common.device_name(dev),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
        dry_run=common.DRY_RUN, config=CONFIG or "bert-base",
    )
    record.setdefault("cases", {})[f"B{batch}-N{length}"] = dict(retention=retention, rows=rows)
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
