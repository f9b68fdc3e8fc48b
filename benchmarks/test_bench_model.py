"""End-to-end: patched vs stock BERT-base-shape model (batch 16, N = 128).

Run: ``pytest benchmarks/test_bench_model.py --benchmark-only -s``. Every model is timed in
the same run on the same inputs; the last test prints and stores the speedups next to both
ideals of ALGORITHM.md §6 (vector ratio L·N/Σk and the FLOPs ideal). On a CUDA machine the
same tests run on the GPU in fp16 (see benchmarks/gpu.sh).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch
import transformers
from transformers import BertConfig, BertForSequenceClassification, BertModel

import powerbert

RETENTION = (77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3)
BATCH, LENGTH = 16, 128
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
RESULTS = Path(__file__).parent / "results"
_medians: dict[str, float] = {}


def _model(cls, attn: str):
    torch.manual_seed(0)
    model = cls(BertConfig())  # BERT-base shape: L 12, D 768, H 12, I 3072
    model.set_attn_implementation(attn)
    return model.to(DEVICE, DTYPE).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (BATCH, LENGTH), generator=g)
    # Every position real: the paper's setting, inputs padded (here: filled) to N.
    return dict(input_ids=ids.to(DEVICE), attention_mask=torch.ones_like(ids).to(DEVICE))


def _run(benchmark, model, inputs, name):
    def step():
        with torch.inference_mode():
            out = model(**inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.group = f"bert-base e2e B{BATCH} N{LENGTH} {DEVICE} {str(DTYPE)[6:]}"
    benchmark.pedantic(step, rounds=7 if DEVICE == "cpu" else 30, warmup_rounds=2)
    _medians[name] = benchmark.stats.stats.median
    benchmark.extra_info.update(device=DEVICE, dtype=str(DTYPE), batch=BATCH, length=LENGTH)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_stock(benchmark, inputs, attn):
    _run(benchmark, _model(BertModel, attn), inputs, f"stock-{attn}")


def test_patched_base_model(benchmark, inputs):
    _run(benchmark, powerbert.patch(_model(BertModel, "sdpa"), RETENTION), inputs, "patched")


def test_patched_classifier_cls_only(benchmark, inputs):
    """Sequence classification head: the last layer runs for [CLS] only."""
    model = powerbert.patch(_model(BertForSequenceClassification, "sdpa"), RETENTION)
    _run(benchmark, model, inputs, "patched-cls-head")


def test_stock_classifier(benchmark, inputs):
    _run(benchmark, _model(BertForSequenceClassification, "sdpa"), inputs, "stock-cls-head")
    _report(benchmark)


def _report(benchmark):
    config = BertConfig()
    ideal_vectors = powerbert.vector_ratio(RETENTION, LENGTH)
    ideal_flops = powerbert.flops_ideal(RETENTION, LENGTH, config.hidden_size, config.intermediate_size)
    rows = []
    pairs = [
        ("patched", "stock-sdpa"), ("patched", "stock-eager"), ("patched-cls-head", "stock-cls-head"),
    ]
    for patched, stock in pairs:
        if patched in _medians and stock in _medians:
            speedup = _medians[stock] / _medians[patched]
            rows.append(dict(
                patched=patched, baseline=stock, patched_ms=1e3 * _medians[patched],
                baseline_ms=1e3 * _medians[stock], speedup=speedup,
                ideal_vector_ratio=ideal_vectors, ideal_flops=ideal_flops,
                fraction_of_vector_ideal=speedup / ideal_vectors,
            ))
    if not rows:
        return
    print(f"\nBERT-base B={BATCH} N={LENGTH} retention={RETENTION} on {DEVICE} {DTYPE}")
    print(f"{'patched':<18}{'baseline':<16}{'patched ms':>11}{'base ms':>10}{'speedup':>9}"
          f"{'vec ideal':>10}{'FLOP ideal':>11}{'of vec':>8}")
    for r in rows:
        print(f"{r['patched']:<18}{r['baseline']:<16}{r['patched_ms']:>11.1f}{r['baseline_ms']:>10.1f}"
              f"{r['speedup']:>8.2f}x{r['ideal_vector_ratio']:>9.2f}x{r['ideal_flops']:>10.2f}x"
              f"{r['fraction_of_vector_ideal']:>8.2f}")
    benchmark.extra_info["speedups"] = rows
    record = dict(
        device=DEVICE if DEVICE == "cpu" else torch.cuda.get_device_name(),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        dtype=str(DTYPE), torch=torch.__version__, transformers=transformers.__version__,
        batch=BATCH, length=LENGTH, retention=RETENTION, rows=rows,
    )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"model_e2e_{DEVICE}.json").write_text(json.dumps(record, indent=2) + "\n")
