"""End-to-end: the patched model against what a GPU user runs instead.

    pytest benchmarks/test_bench_peers.py --benchmark-only -s            (GPU; ``gpu.sh model``)
    POWERBERT_BENCH_QUICK=1 pytest benchmarks/test_bench_peers.py ...     (``gpu.sh quick``)

BERT-base sequence classification (L 12, D 768, H 12), batch 1, 8, 64, N 128 and 512, fp16 and
bf16; the quick step (``POWERBERT_BENCH_QUICK=1``) fp16 only, batch 1, 8, 64 and 256. Each case
is saved to ``peers_e2e_<device>.json`` as soon as it finishes (``common.save_case``), and
``table.py`` gives every row its ratio to the strongest stock of its shape (the fastest of the
``STOCKS`` rows), naming it, beside the FLOPs ideal against that stock. Two scenarios, each with
the baseline of pytest-benchmark's own ratio column:

* ``equal``: every sequence N real tokens (the paper's setting). ``stock-sdpa`` (baseline): HF
  drops the all-ones mask, so SDPA runs FlashAttention-2. ``patched``: the paper's fixed
  configuration (77, 63, ..., 3 at N 128; four times that at N 512).
* ``ragged``: real lengths drawn in [N/4, N], the first row N long, right-padded to N.
  ``stock-sdpa`` (baseline): SDPA with the padding mask (the memory-efficient kernel).
  ``stock-unpadded``: the stock modules on the packed real tokens with variable-length attention
  (``benchmarks/unpadded.py``: FlashAttention varlen through ``torch.nn.attention.varlen`` where
  torch has it, nested tensors otherwise). ``patched``: the same configuration as shares of each
  sequence's own length (f_l = k_l / N, proportional retention).

``patched`` is what a user gets: on CUDA in fp16/bf16 the packed (varlen) forward
(``powerbert/elimination/packed.py``) replayed from the model's pool of CUDA graphs, one per shape
bucket (``powerbert/elimination/packed_graphs.py``); in the dry run forced with
``dispatch.use_packed(True)``, its Triton kernels interpreted, no graphs. ``patched-eager`` is the
same forward without graphs (``patch(..., cuda_graphs=False)``), ``patched-padded`` the padded GPU
layout it replaced (``dispatch.use_packed(False)``). The attention mask is given on the GPU, as
most callers do: the packed forward reads it on the host once (a mask on the CPU costs no read).

``stock-graph`` and ``patched-graph``: the same models captured once in a CUDA graph
(``powerbert.CudaGraphForward``, the patched one in its static layout) and replayed: at small
batches launch overhead, not the GPU, sets the eager times. Under capture transformers cannot
look at the mask to drop it, so ``stock-graph`` in the ``equal`` scenario is given no mask, and
even then transformers 5.17 builds an expanded ``[B, 1, N, N]`` mask under capture whose last
dimension has stride 0, which no fused SDPA kernel takes: the math backend ran, 69.8 ms against
15.6 ms eager at B64 N512 fp16 on an H200 (2026-12-04). ``CudaGraphForward`` captures a model
given no mask with ``powerbert.cuda_graph.no_mask_built_under_capture``, which fixes the baseline (FlashAttention-2, as eager). ``stock-unpadded-graph``: ``stock-unpadded``
captured with its packing fixed (computed once from the mask, outside the graph: packing reads the
longest length on the host), so a replay serves only batches of these lengths, a bound on stock
rather than a deployable baseline; skipped, with the reason, where capture fails. The patched
graph runs the padded static layout (capture skips the packed path). CUDA only: the dry run skips
the graphs.

Speed only: weights are random (the configuration's accuracy is ``make reproduce``'s business).
Every model runs once and warms up before timing (Triton compiles there), then one more timed call
sizes the rounds: at most ``ROUNDS``, fewer where a case's rounds would pass ``TIMED_S`` seconds,
``MIN_ROUNDS`` at least. Each row records the median, sequences/s, real tokens and the ideals:
vectors processed (stock token-layers over kept vector-layers) and FLOPs (§6 multiply-adds),
against stock padded to the batch's longest and against stock on real tokens only. The dry run (``gpu.sh --dry-run``) runs the same code on CPU with a 2-layer
BERT, the patched model through the interpreted Triton path.
"""
from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

import powerbert
from benchmarks import common, unpadded
from benchmarks.unpadded import bert_forward_unpadded, has_varlen_attn
from powerbert.cuda_graph import CudaGraphForward
from powerbert.elimination import dispatch
from powerbert.elimination.retention import (flops_ideal_vs_dynamic_padding, ideal_vs_dynamic_padding, layer_flops,
                                             sequence_flops)

RETENTION_128 = (77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3)
if common.DRY_RUN:
    CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BATCHES, LENGTHS, BASE_RETENTION, BASE_N = (1, 3), (16,), (10, 6), 16
else:
    CONFIG = {}  # BERT-base
    BATCHES, LENGTHS, BASE_RETENTION, BASE_N = (1, 8, 64), (128, 512), RETENTION_128, 128
    if common.QUICK:
        BATCHES = (1, 8, 64, 256)
DTYPES = (torch.float16,) if common.QUICK else (torch.float16, torch.bfloat16)
# The rows a patched row's ratio is taken against in table.py: the fastest of these in its shape.
STOCKS = ("stock-sdpa", "stock-graph", "stock-unpadded", "stock-unpadded-graph")
SCENARIOS = {"equal": ("stock-sdpa", "stock-graph", "patched", "patched-eager", "patched-padded", "patched-graph"),
             "ragged": ("stock-sdpa", "stock-graph", "stock-unpadded", "stock-unpadded-graph", "patched",
                        "patched-eager", "patched-padded", "patched-graph")}
CASES = [(s, impl) for s, impls in SCENARIOS.items() for impl in impls]
RECORD = "peers_e2e"  # common.save_case: <RECORD>_<device>.json, one entry per finished case
# Rounds: at most ROUNDS, MIN_ROUNDS at least, else as many as fit in TIMED_S seconds of calls,
# judged from one timed call after warm-up. On an H200 (benchmarks/results/gpu.log, 2026-12-04)
# every case below B64 N512 takes <= 20 ms a call (20 rounds); B64 N512 15-20 ms eager; B256 N512
# ~4x that, ~60-75 ms stock (and patched-padded), so ~14 rounds: ~25 calls a row with warm-up,
# capture and reference calls, ~16 s for its 12 rows. Quick step, 96 cases: ~35 s of calls.
ROUNDS, MIN_ROUNDS, TIMED_S = 20, 5, 1.0
# stock-unpadded must compute stock's logits: a bound far above rounding (fp16 ~1e-3, bf16 ~1e-2
# on a random 12-layer model) and far below a wrong computation (~1). The difference is recorded.
LOGITS_BOUND = {torch.float16: 0.1, torch.bfloat16: 0.3}
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
_model_cache: dict = {}


def _model(dtype, dev) -> BertForSequenceClassification:
    """One model per dtype (the grid alternates dtypes: both stay on the device, ~0.5 GB for
    BERT-base), patched and unpatched in place per case."""
    if dtype not in _model_cache:
        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2, **CONFIG))
        model.set_attn_implementation("sdpa")
        _model_cache[dtype] = model.to(dev, dtype).eval()
    return _model_cache[dtype]


def _inputs(scenario, batch, n, dev):
    g = torch.Generator().manual_seed(0)
    if scenario == "equal":
        lengths = torch.full((batch,), n)
    else:
        lengths = torch.randint(n // 4, n + 1, (batch,), generator=g)
        lengths[0] = n  # the batch is as wide as dynamic padding would make it
    mask = (torch.arange(n)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1000, 29000, (batch, n), generator=g) * mask
    return dict(input_ids=ids.to(dev), attention_mask=mask.to(dev), token_type_ids=torch.zeros_like(ids).to(dev))


def _retention(scenario, n):
    if scenario == "equal":
        return tuple(k * n // BASE_N for k in BASE_RETENTION)
    return tuple(round(k / BASE_N, 4) for k in BASE_RETENTION)


def _classify_unpadded(model, inputs):
    """Stock weights, padding removed: encoder on the packed tokens, then pooler and classifier
    on each sequence's [CLS] (its first packed token)."""
    hidden, _, cu_seqlens = bert_forward_unpadded(model.bert, inputs["input_ids"], inputs["attention_mask"],
                                                  inputs["token_type_ids"])
    pooled = model.bert.pooler.activation(model.bert.pooler.dense(hidden[cu_seqlens[:-1].long()]))
    return model.classifier(pooled)


def _ideal(scenario, retention, lengths) -> float:
    """Vectors processed: stock token-layers (padded to N, as stock-sdpa runs) over the kept
    vector-layers of every sequence on its own (the patched model's counts, §6/§8)."""
    return ideal_vs_dynamic_padding(retention, [lengths])  # one batch, padded to its longest


def _ideal_flops(retention, lengths, config) -> dict:
    """The §6 FLOPs ideal (multiply-adds: stock over patched, every sequence on its own real
    tokens) against stock padded to the batch's longest (stock-sdpa, stock-graph) and against
    stock on the real tokens alone (stock-unpadded[-graph])."""
    hidden, inner = config.hidden_size, config.intermediate_size
    patched = sum(sequence_flops(retention, n, hidden, inner) for n in lengths)
    real = sum(len(retention) * layer_flops(n, n, hidden, inner) for n in lengths)
    return dict(ideal_flops=flops_ideal_vs_dynamic_padding(retention, [lengths], hidden, inner),
                ideal_flops_vs_unpadded=real / patched)


def _path(impl):
    """The patched forward a row runs: ``patched`` the default (packed on CUDA fp16/bf16; forced in
    the dry run, on CPU, so its code runs there too), ``patched-padded`` the padded GPU layout."""
    if impl == "patched-padded":
        return dispatch.use_packed(False)
    if impl in ("patched", "patched-eager") and common.DRY_RUN:
        return dispatch.use_packed(True)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fixed_packing(packing):
    """``unpadded.pack`` returning ``packing`` (computed before capture) instead of reading the mask."""
    original = unpadded.pack
    unpadded.pack = lambda mask: packing
    try:
        yield
    finally:
        unpadded.pack = original


class UnpaddedFixedLengths(nn.Module):
    """``stock-unpadded`` for one mask, capturable: the packing (real-token indices, offsets,
    longest length, which takes a host read) computed once here; ``forward`` takes the ids."""

    def __init__(self, model, attention_mask):
        super().__init__()
        self.model = model
        self.attention_mask = attention_mask
        self.packing = unpadded.pack(attention_mask)

    def forward(self, input_ids, token_type_ids):
        with _fixed_packing(self.packing):
            return _classify_unpadded(self.model, dict(input_ids=input_ids, attention_mask=self.attention_mask,
                                                       token_type_ids=token_type_ids))


def _forward_path(run) -> str | None:
    """Which forward one call of a patched model took: ``"packed-graph"`` (the packed forward
    replayed from the graph pool), ``"packed"`` (eager) or ``"padded"`` (spies on
    ``GraphPool.run`` and ``forwards.packed_encoder``; None where this library has no packed path)."""
    from powerbert.elimination import forwards, packed_graphs

    original = getattr(forwards, "packed_encoder", None)
    if original is None:
        return None
    pool_run = packed_graphs.GraphPool.run
    calls = []

    def spy(*args, **kwargs):
        calls.append("packed")
        return original(*args, **kwargs)

    def pool_spy(self, *args, **kwargs):
        out = pool_run(self, *args, **kwargs)
        calls.append("packed-graph" if out is not None else "capture failed")
        return out

    forwards.packed_encoder = spy
    packed_graphs.GraphPool.run = pool_spy
    try:
        run()
    finally:
        forwards.packed_encoder = original
        packed_graphs.GraphPool.run = pool_run
    return "+".join(calls) if calls else "padded"


def _rounds(run, dev) -> int:
    """Timed rounds for this case, from one timed call (after warm-up): see ROUNDS."""
    if common.DRY_RUN:
        return common.rounds(ROUNDS)
    common.synchronize(dev)
    start = time.perf_counter()
    run()
    common.synchronize(dev)
    return max(MIN_ROUNDS, min(ROUNDS, int(TIMED_S / max(time.perf_counter() - start, 1e-6))))


@pytest.mark.parametrize("scenario, impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
def test_peers(benchmark, batch, n, dtype, scenario, impl):
    dev = common.require_gpu_case()
    if impl.endswith("-graph") and dev != "cuda":
        pytest.skip("CUDA graphs need CUDA (the dry run runs on CPU)")
    model = _model(dtype, dev)
    inputs = _inputs(scenario, batch, n, dev)
    retention = _retention(scenario, n)
    lengths = inputs["attention_mask"].sum(1).tolist()
    name = str(dtype).replace("torch.", "")
    notes = {}
    if impl == "stock-unpadded":
        notes["attention"] = "varlen_attn" if has_varlen_attn(dev) else "nested"

    graph = None

    def run():
        if graph is not None:
            out = graph(**graph_inputs)
            return out if isinstance(out, torch.Tensor) else out.logits
        with torch.inference_mode(), common.triton_path(), _path(impl):
            if impl == "stock-unpadded":
                return _classify_unpadded(model, inputs)
            return model(**inputs).logits

    if impl.startswith("patched"):
        # patched: the default (on CUDA the packed forward replayed from the graph pool);
        # patched-eager: the same forward without graphs.
        powerbert.patch(model, retention, cuda_graphs=impl != "patched-eager")
        notes.update(retention=list(retention), ideal_vectors=_ideal(scenario, retention, lengths),
                     **_ideal_flops(retention, lengths, model.config))
    try:
        if impl.endswith("-graph"):
            graph_inputs = dict(inputs)
            no_mask = impl == "stock-graph" and scenario == "equal"
            if no_mask:
                del graph_inputs["attention_mask"]  # no padding: FlashAttention-2, as eager stock-sdpa runs
            # The patched graph captures the padded static layout: its reference is the padded
            # forward (near-ties in fp16 may select differently on the packed one).
            with torch.inference_mode(), _path("patched-padded" if impl == "patched-graph" else impl):
                eager = model(**inputs).logits
            if impl == "stock-unpadded-graph":
                if not has_varlen_attn(dev):
                    pytest.skip("stock-unpadded-graph needs torch.nn.attention.varlen (nested tensors do not capture)")
                del graph_inputs["attention_mask"]  # fixed at capture, with the packing
                notes["attention"] = "varlen_attn"
                try:
                    graph = CudaGraphForward(UnpaddedFixedLengths(model, inputs["attention_mask"]).eval(),
                                             **graph_inputs)
                except Exception as err:  # noqa: BLE001 - optional row: say why, go on
                    with contextlib.suppress(Exception):
                        torch.cuda.synchronize()
                    pytest.skip(f"stock-unpadded cannot be captured in a CUDA graph here: {type(err).__name__}: "
                                f"{str(err)[:200]}")
            else:
                graph = CudaGraphForward(model, **graph_inputs)  # no mask: none built under capture
            notes["max_abs_diff_vs_eager"] = diff = (run().float() - eager.float()).abs().max().item()
            assert diff < LOGITS_BOUND[dtype], f"{impl} logits differ from the eager model's by {diff}"
        logits = run()
        if impl in ("patched", "patched-eager", "patched-padded"):
            notes["path"] = _forward_path(run)
        if impl == "stock-unpadded":  # the baseline must compute what stock computes
            with torch.inference_mode():
                stock = model(**inputs).logits
            notes["max_abs_diff_vs_stock"] = diff = (logits.float() - stock.float()).abs().max().item()
            assert diff < LOGITS_BOUND[dtype], f"stock-unpadded logits differ from stock by {diff}"
        median = common.timed(
            benchmark, run, dev=dev, group=f"bert e2e {scenario} B{batch} N{n} {name}", impl=impl,
            baseline="stock-sdpa", sequences=batch, rounds=_rounds(run, dev), warmup_rounds=3,
            scenario=scenario, B=batch, n=n, dtype=name, real_tokens=int(sum(lengths)),
            config=CONFIG or "bert-base", stock=impl in STOCKS, **notes,
        )
        common.save_case(benchmark, RECORD, dev, device=common.device_name(dev), config=CONFIG or "bert-base")
    finally:
        graph = None  # free the graph's memory pool before the next case
        if impl.startswith("patched"):
            powerbert.unpatch(model)
    assert math.isfinite(median)
    print(f"\n{impl:>20} {scenario} B{batch} N{n} {name}: {1e3 * median:.2f} ms, {batch / median:.1f} seq/s")

