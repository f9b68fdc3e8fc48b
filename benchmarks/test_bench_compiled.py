"""End-to-end: ``torch.compile(stock, mode="reduce-overhead")``, one more stock row for the table.

    pytest benchmarks/test_bench_compiled.py --benchmark-only -s          (GPU; ``gpu.sh model``, last)

Inductor's kernels replayed in CUDA graphs: what a user who compiles stock BERT-base gets. Its
compile costs about a minute per shape for BERT-base, so this file measures two shapes in fp16,
equal and ragged lengths, with the inputs, model and records of ``test_bench_peers.py`` (its rows
join their shape's stock rows there, and the strongest stock of a shape may be this one). It runs
last in the model step: a time-out loses only its rows. Not in the quick step, not in the dry run.
"""
from __future__ import annotations

import contextlib
import time

import pytest
import torch

from benchmarks import common
from benchmarks.test_bench_peers import CONFIG, LOGITS_BOUND, RECORD, SCENARIOS, _inputs, _model, _rounds
from powerbert.cuda_graph import no_mask_built_under_capture
# A shape whose compile passes COMPILE_BUDGET_S is skipped, saying so.
COMPILED_SHAPES = ((1, 128), (64, 512))
COMPILE_BUDGET_S = 150.0


@pytest.mark.skipif(common.QUICK or common.DRY_RUN, reason="torch.compile rows: the full model step on a GPU only")
@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("batch, n", COMPILED_SHAPES, ids=[f"B{b}-N{n}" for b, n in COMPILED_SHAPES])
def test_compiled_stock(benchmark, batch, n, scenario):
    dev = common.require_gpu_case()
    dtype, name, impl = torch.float16, "float16", "stock-compiled"
    model = _model(dtype, dev)
    inputs = _inputs(scenario, batch, n, dev)
    if scenario == "equal":
        del inputs["attention_mask"]  # no padding: no mask, FlashAttention-2, as stock-sdpa runs
    lengths = [n] * batch if scenario == "equal" else _inputs(scenario, batch, n, "cpu")["attention_mask"].sum(1).tolist()
    torch._dynamo.reset()
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    # Traced, transformers builds a mask even when given none (as under capture): not here, for
    # every call of the case (Dynamo guards on the function it traced).
    unmasked = contextlib.ExitStack()
    if scenario == "equal":
        unmasked.enter_context(no_mask_built_under_capture())

    def run():
        with torch.inference_mode():
            return compiled(**inputs).logits

    try:
        start = time.perf_counter()
        for _ in range(3):  # compile, then the warm-up runs the reduce-overhead graphs record
            logits = run()
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - start
        if compile_s > COMPILE_BUDGET_S:
            pytest.skip(f"torch.compile took {compile_s:.0f} s here, over the {COMPILE_BUDGET_S:.0f} s budget")
        with torch.inference_mode():
            eager = model(**inputs).logits
        diff = (logits.float() - eager.float()).abs().max().item()
        assert diff < LOGITS_BOUND[dtype], f"compiled stock logits differ from eager stock by {diff}"
        median = common.timed(
            benchmark, run, dev=dev, group=f"bert e2e {scenario} B{batch} N{n} {name}", impl=impl,
            baseline="stock-sdpa", sequences=batch, rounds=_rounds(run, dev), warmup_rounds=3,
            scenario=scenario, B=batch, n=n, dtype=name, real_tokens=int(sum(lengths)),
            config=CONFIG or "bert-base", stock=True, compile_s=round(compile_s, 1), max_abs_diff_vs_eager=diff,
        )
        common.save_case(benchmark, RECORD, dev, device=common.device_name(dev), config=CONFIG or "bert-base")
    finally:
        compiled = None
        unmasked.close()
        torch._dynamo.reset()  # its graphs and their memory go before the next case
    print(f"\n{impl:>20} {scenario} B{batch} N{n} {name}: {1e3 * median:.2f} ms (compile {compile_s:.0f} s)")
