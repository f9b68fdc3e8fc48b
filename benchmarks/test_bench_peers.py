"""End-to-end: the patched model against what a GPU user runs instead.

    pytest benchmarks/test_bench_peers.py --benchmark-only -s            (GPU; ``gpu.sh model``)

BERT-base sequence classification (L 12, D 768, H 12), batch 1, 8, 64, N 128 and 512, fp16 and
bf16. Two scenarios, each with its baseline (the row ``table.py`` takes ratios against):

* ``equal``: every sequence N real tokens (the paper's setting). ``stock-sdpa`` (baseline): HF
  drops the all-ones mask, so SDPA runs FlashAttention-2. ``patched``: the paper's fixed
  configuration (77, 63, ..., 3 at N 128; four times that at N 512).
* ``ragged``: real lengths drawn in [N/4, N], the first row N long, right-padded to N.
  ``stock-sdpa`` (baseline): SDPA with the padding mask (the memory-efficient kernel).
  ``stock-unpadded``: the stock modules on the packed real tokens with variable-length attention
  (``benchmarks/unpadded.py``: FlashAttention varlen through ``torch.nn.attention.varlen`` where
  torch has it, nested tensors otherwise). ``patched``: the same configuration as shares of each
  sequence's own length (f_l = k_l / N, proportional retention).

``stock-graph`` and ``patched-graph``: the same models captured once in a CUDA graph
(``powerbert.CudaGraphForward``, the patched one in its static layout) and replayed: at small
batches launch overhead, not the GPU, sets the eager times. Under capture transformers cannot
look at the mask to drop it, so ``stock-graph`` in the ``equal`` scenario is given no mask, and
even then transformers 5.17 builds an expanded ``[B, 1, N, N]`` mask under capture whose last
dimension has stride 0, which no fused SDPA kernel takes: the math backend ran, 69.8 ms against
15.6 ms eager at B64 N512 fp16 on an H200 (2026-12-04). :func:`_no_mask_built_under_capture`
fixes the baseline (FlashAttention-2, as eager). CUDA only: the dry run skips them.

Speed only: weights are random (the configuration's accuracy is ``make reproduce``'s business).
Every model runs once and warms up before timing (Triton compiles there). Each row records the
median, sequences/s, real tokens and the ideal (vectors processed: stock token-layers over kept
vector-layers). The dry run (``gpu.sh --dry-run``) runs the same code on CPU with a 2-layer
BERT, the patched model through the interpreted Triton path.
"""
from __future__ import annotations

import contextlib
import math

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

import powerbert
from benchmarks import common
from benchmarks.unpadded import bert_forward_unpadded, has_varlen_attn
from powerbert.cuda_graph import CudaGraphForward
from powerbert.elimination.retention import ideal_vs_dynamic_padding

RETENTION_128 = (77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3)
if common.DRY_RUN:
    CONFIG = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    BATCHES, LENGTHS, BASE_RETENTION, BASE_N = (1, 3), (16,), (10, 6), 16
else:
    CONFIG = {}  # BERT-base
    BATCHES, LENGTHS, BASE_RETENTION, BASE_N = (1, 8, 64), (128, 512), RETENTION_128, 128
DTYPES = (torch.float16, torch.bfloat16)
SCENARIOS = {"equal": ("stock-sdpa", "stock-graph", "patched", "patched-graph"),
             "ragged": ("stock-sdpa", "stock-graph", "stock-unpadded", "patched", "patched-graph")}
CASES = [(s, impl) for s, impls in SCENARIOS.items() for impl in impls]
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


@contextlib.contextmanager
def _no_mask_built_under_capture():
    """While a stock model given no mask is captured: no mask built, as in eager.

    transformers' ``_ignore_bidirectional_mask_sdpa`` declines to skip the mask whenever a CUDA
    stream is capturing (it could not read a real mask's values there), even when there is no
    mask to read, and the mask it builds instead sends SDPA to its math backend. With no padding
    mask there is nothing to read: skip, as eager does.
    """
    from transformers import masking_utils

    original = masking_utils._ignore_bidirectional_mask_sdpa

    def skip_when_absent(padding_mask, *args, **kwargs):
        return padding_mask is None or original(padding_mask, *args, **kwargs)

    masking_utils._ignore_bidirectional_mask_sdpa = skip_when_absent
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original


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
            return graph(**graph_inputs).logits
        with torch.inference_mode(), common.triton_path():
            if impl == "stock-unpadded":
                return _classify_unpadded(model, inputs)
            return model(**inputs).logits

    if impl.startswith("patched"):
        powerbert.patch(model, retention)
        notes.update(retention=list(retention), ideal_vectors=_ideal(scenario, retention, lengths))
    try:
        if impl.endswith("-graph"):
            graph_inputs = dict(inputs)
            no_mask = impl == "stock-graph" and scenario == "equal"
            if no_mask:
                del graph_inputs["attention_mask"]  # no padding: FlashAttention-2, as eager stock-sdpa runs
            with torch.inference_mode():
                eager = model(**inputs).logits
            with _no_mask_built_under_capture() if no_mask else contextlib.nullcontext():
                graph = CudaGraphForward(model, **graph_inputs)
            notes["max_abs_diff_vs_eager"] = diff = (run().float() - eager.float()).abs().max().item()
            assert diff < LOGITS_BOUND[dtype], f"{impl} logits differ from the eager model's by {diff}"
        logits = run()
        if impl == "stock-unpadded":  # the baseline must compute what stock computes
            with torch.inference_mode():
                stock = model(**inputs).logits
            notes["max_abs_diff_vs_stock"] = diff = (logits.float() - stock.float()).abs().max().item()
            assert diff < LOGITS_BOUND[dtype], f"stock-unpadded logits differ from stock by {diff}"
        median = common.timed(
            benchmark, run, dev=dev, group=f"bert e2e {scenario} B{batch} N{n} {name}", impl=impl,
            baseline="stock-sdpa", sequences=batch, rounds=common.rounds(20), warmup_rounds=3,
            scenario=scenario, B=batch, n=n, dtype=name, real_tokens=int(sum(lengths)),
            config=CONFIG or "bert-base", **notes,
        )
    finally:
        graph = None  # free the graph's memory pool before the next case
        if impl.startswith("patched"):
            powerbert.unpatch(model)
    assert math.isfinite(median)
    print(f"\n{impl:>15} {scenario} B{batch} N{n} {name}: {1e3 * median:.2f} ms, {batch / median:.1f} seq/s")
