"""End-to-end per model family: stock (sdpa) vs patched, base-size shapes, batch 8, N = 128.

Run: ``pytest benchmarks/test_bench_families.py --benchmark-only -s``. For each family the
bare encoder model is timed stock and then patched (the same model object, same inputs, same
run); the patched test prints the speedup next to both ideals of powerbert/ALGORITHM.md §6 (vector ratio
L·N/Σk and the FLOPs ideal) and stores every row in ``families_e2e_<device>.json`` under
``$POWERBERT_RESULTS`` (``gpu.sh`` sets it to ``$OUT``), by default ``benchmarks/results/``.

Shapes are the families' base sizes (L 12, D 768, H 12, I 3072; DistilBERT L 6; ALBERT-base
runs its one shared layer 12 times, with embedding size 128). DistilBERT's 6 layers use every
other entry of the 12-layer configuration. On CUDA the same tests run in fp16; the dry run
(``gpu.sh --dry-run``) runs them on CPU in fp16 with 2-layer, 64-wide models, batch 2, N 16.

Three speedups are printed: ratio of the medians, ratio of the minima, and the median of
per-pair ratios from stock/patched rounds interleaved in the patched test. On a CPU shared
with other jobs the separate medians drift (minutes apart); the paired ratio is the steadier.
"""
from __future__ import annotations

import json
import platform
import statistics
import time

import pytest
import torch
import transformers
from transformers import AlbertConfig, AlbertModel, BertConfig, BertModel, DistilBertConfig, DistilBertModel
from transformers import ElectraConfig, ElectraModel, RobertaConfig, RobertaModel

import powerbert
from benchmarks import common

RETENTION_12 = (77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3)
BATCH, LENGTH = (2, 16) if common.DRY_RUN else (8, 128)
# Two layers, 64 wide (head dim 32), for the dry run; the base sizes otherwise.
TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2)
TINY_RETENTION = (10, 6)

# family -> (model class, config factory, retention)
FAMILIES = {
    "bert": (BertModel, BertConfig, RETENTION_12),
    "albert": (AlbertModel, lambda: AlbertConfig(  # albert-base-v2 shape
        embedding_size=128, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
        num_hidden_layers=12), RETENTION_12),
    "roberta": (RobertaModel, RobertaConfig, RETENTION_12),  # also the XLM-RoBERTa layer stack
    "distilbert": (DistilBertModel, DistilBertConfig, RETENTION_12[1::2]),
    "electra": (ElectraModel, lambda: ElectraConfig(  # electra-base-discriminator shape
        embedding_size=768, hidden_size=768, num_attention_heads=12, intermediate_size=3072), RETENTION_12),
}
if common.DRY_RUN:
    FAMILIES = {
        "bert": (BertModel, lambda: BertConfig(**TINY), TINY_RETENTION),
        "albert": (AlbertModel, lambda: AlbertConfig(embedding_size=32, **TINY), TINY_RETENTION),
        "roberta": (RobertaModel, lambda: RobertaConfig(**TINY), TINY_RETENTION),
        "distilbert": (DistilBertModel, lambda: DistilBertConfig(dim=64, n_heads=2, hidden_dim=128, n_layers=2),
                       TINY_RETENTION),
        "electra": (ElectraModel, lambda: ElectraConfig(embedding_size=64, **TINY), TINY_RETENTION),
    }
_models: dict[str, torch.nn.Module] = {}
# Median and min of the rounds: on a shared CPU the min (least disturbed round) is the steadier one.
_times: dict[tuple[str, str], tuple[float, float]] = {}
_paired: dict[str, float] = {}
_rows: list[dict] = []


def _device_dtype() -> tuple[str, torch.dtype]:
    dev = common.device()
    return dev, torch.float16 if dev == "cuda" or common.DRY_RUN else torch.float32


def _model(family: str) -> torch.nn.Module:
    if family not in _models:
        _models.clear()  # one base-size model alive at a time
        cls, config, _ = FAMILIES[family]
        torch.manual_seed(0)
        model = cls(config())
        model.set_attn_implementation("sdpa")
        _models[family] = model.to(*_device_dtype()).eval()
    return _models[family]


def _widths(config) -> tuple[int, int]:
    if isinstance(config, DistilBertConfig):
        return config.dim, config.hidden_dim
    return config.hidden_size, config.intermediate_size


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (BATCH, LENGTH), generator=g)
    # Every position real: the paper's setting, inputs padded (here: filled) to N.
    dev = common.device()
    return dict(input_ids=ids.to(dev), attention_mask=torch.ones_like(ids).to(dev))


CASES = [(family, variant) for family in FAMILIES for variant in ("stock", "patched")]


@pytest.mark.parametrize("family, variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_family(benchmark, inputs, family, variant):
    dev, dtype = _device_dtype()
    rounds = common.rounds(30, cpu=3)
    model = _model(family)
    retention = FAMILIES[family][2]
    if variant == "patched":
        powerbert.patch(model, retention)

    def step():
        with torch.inference_mode(), common.triton_path():
            out = model(**inputs)
        common.synchronize(dev)
        return out

    def paired_speedup() -> float:
        """Stock and patched rounds interleaved (ratio per pair, then the median): other load
        on a shared machine then hits both sides of each ratio alike."""
        ratios = []
        for _ in range(rounds):
            powerbert.unpatch(model)
            start = time.perf_counter()
            step()
            stock = time.perf_counter() - start
            powerbert.patch(model, retention)
            start = time.perf_counter()
            step()
            ratios.append(stock / (time.perf_counter() - start))
        return statistics.median(ratios)

    try:
        # ``timed`` runs the model once before the warm-up round: the patched model's Triton
        # kernels compile there, not in a timed round.
        common.timed(benchmark, step, dev=dev, group=f"families e2e B{BATCH} N{LENGTH} {dev} {str(dtype)[6:]}",
                     impl=f"{family}-{variant}", baseline=f"{family}-stock", sequences=BATCH, rounds=rounds, warmup_rounds=1)
        if variant == "patched":
            _paired[family] = paired_speedup()
    finally:
        if variant == "patched":
            powerbert.unpatch(model)
    _times[family, variant] = benchmark.stats.stats.median, benchmark.stats.stats.min
    benchmark.extra_info.update(dtype=str(dtype), batch=BATCH, length=LENGTH, family=family,
                                retention=list(retention))
    if variant == "patched" and (family, "stock") in _times:
        _report(benchmark, family, model.config, retention, dev, dtype, rounds)


def _report(benchmark, family, config, retention, dev, dtype, rounds):
    hidden, intermediate = _widths(config)
    (stock, stock_min), (patched, patched_min) = _times[family, "stock"], _times[family, "patched"]
    row = dict(
        family=family, layers=len(retention), retention=list(retention), stock_ms=1e3 * stock,
        patched_ms=1e3 * patched, speedup=stock / patched, speedup_of_min=stock_min / patched_min,
        speedup_paired=_paired[family],
        ideal_vector_ratio=powerbert.vector_ratio(retention, LENGTH),
        ideal_flops=powerbert.flops_ideal(retention, LENGTH, hidden, intermediate),
    )
    _rows.append(row)
    benchmark.extra_info["speedup"] = row
    print(f"\n{'family':<12}{'L':>3}{'stock ms':>10}{'patched ms':>11}{'speedup':>9}{'(of min)':>9}{'(paired)':>9}"
          f"{'vec ideal':>10}{'FLOP ideal':>11}   (medians of {rounds} rounds)")
    for r in _rows:
        print(f"{r['family']:<12}{r['layers']:>3}{r['stock_ms']:>10.1f}{r['patched_ms']:>11.1f}"
              f"{r['speedup']:>8.2f}x{r['speedup_of_min']:>8.2f}x{r['speedup_paired']:>8.2f}x"
              f"{r['ideal_vector_ratio']:>9.2f}x{r['ideal_flops']:>10.2f}x")
    record = dict(
        device=common.device_name(dev),
        cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
        dtype=str(dtype), torch=torch.__version__, transformers=transformers.__version__,
        batch=BATCH, length=LENGTH, attn="sdpa", rows=_rows, dry_run=common.DRY_RUN,
    )
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    (common.RESULTS / f"families_e2e_{dev}.json").write_text(json.dumps(record, indent=2) + "\n")
