"""Attention + significance scores (kernels/attention.py) against what a GPU user runs instead.

    pytest benchmarks/test_bench_attention.py --benchmark-only -s       (GPU; ``gpu.sh kernels``)

BERT-base heads (H 12, d 64), batch 1, 8, 64, N 128 and 512, fp16 and bf16. Two scenarios:

* ``equal``: every sequence N real tokens. Baseline ``sdpa-flash``: SDPA without a mask, forced
  to FlashAttention-2 (what HF BERT runs when no token is padding). ``triton``: our kernel
  (context + significance scores, the probabilities never written), all-True mask.
* ``ragged``: real lengths drawn in [N/4, N], the first row N long, padded to N. Baseline
  ``sdpa-mask``: SDPA with the [B, 1, 1, N] padding mask HF passes (it then runs the
  memory-efficient kernel, not FlashAttention-2). ``varlen``: ``torch.nn.attention.varlen``
  (FlashAttention varlen on the packed real tokens, where this torch has it). ``nested``: SDPA
  on nested (jagged) tensors. ``triton``: our kernel with the padding mask. ``eager``: the
  reference that materialises P and sums its columns (how scores were computed before).

Packing (varlen, nested) is done before timing: a packed pipeline keeps its tokens packed.
Each row records the median (pytest-benchmark, a synchronisation after every call), CUDA-event
time (``device_ms``, triton's do_bench), sequences/s, and the ratio against its scenario's
baseline is taken by ``table.py``. Every implementation is checked against the reference first.
In the dry run (``gpu.sh --dry-run``) the same code runs on CPU with tiny shapes.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import common
from benchmarks.unpadded import has_varlen_attn, pack, varlen_attention

if common.DRY_RUN:
    BATCHES, LENGTHS, H, D = (1, 3), (16,), 2, 32
else:
    BATCHES, LENGTHS, H, D = (1, 8, 64), (128, 512), 12, 64
DTYPES = (torch.float16, torch.bfloat16)
SCENARIOS = {"equal": ("sdpa-flash", "triton"), "ragged": ("sdpa-mask", "varlen", "nested", "triton", "eager")}
BASELINE = {"equal": "sdpa-flash", "ragged": "sdpa-mask"}
CASES = [(s, impl) for s, impls in SCENARIOS.items() for impl in impls]
pytestmark = pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
# Context against the fp32 reference on the same inputs, per dtype (SDPA kernels round P).
ATOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _inputs(scenario, batch, n, dtype, dev):
    # Views of one [B, n, 3, H, d] projection, as a BERT layer produces them.
    x = torch.randn(batch, n, 3, H, D, generator=torch.Generator(dev).manual_seed(0), device=dev, dtype=dtype)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    if scenario == "equal":
        lengths = torch.full((batch,), n)
    else:
        lengths = torch.randint(n // 4, n + 1, (batch,), generator=torch.Generator().manual_seed(0))
        lengths[0] = n
    mask = (torch.arange(n)[None, :] < lengths[:, None]).to(dev)  # [B, n] bool
    return q, k, v, mask


def _packed(t, indices):
    """[B, H, n, d] -> [T, H, d] real tokens."""
    return t.transpose(1, 2).flatten(0, 1)[indices]


def _impl(name, q, k, v, mask, dev):
    """(callable, its output as packed [T, H, d] context, notes for extra_info)."""
    from kernels.attention import attention_with_significance, attention_with_significance_ref

    indices, cu_seqlens, max_len = pack(mask)
    if name == "sdpa-flash":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def fn():
            if dev != "cuda":  # the dry run: the CPU's own choice
                return F.scaled_dot_product_attention(q, k, v)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # an error here beats timing another kernel
                return F.scaled_dot_product_attention(q, k, v)
        return fn, lambda out: _packed(out, indices), dict(sdpa_backend="flash" if dev == "cuda" else "cpu")
    if name == "sdpa-mask":
        sdpa_mask = mask[:, None, None, :]
        return (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
                lambda out: _packed(out, indices), dict(sdpa_backend="default (memory-efficient with a mask)"))
    if name in ("varlen", "nested"):
        if name == "varlen" and not has_varlen_attn(dev):
            pytest.skip("torch.nn.attention.varlen.varlen_attn: needs CUDA and torch >= 2.10")
        pq, pk, pv = (t.transpose(1, 2).flatten(0, 1)[indices].contiguous() for t in (q, k, v))
        backend = "varlen_attn" if name == "varlen" else "nested"
        return (lambda: varlen_attention(pq, pk, pv, cu_seqlens, max_len, backend), lambda out: out,
                dict(packed_tokens=int(indices.numel())))
    if name == "triton":
        return (lambda: attention_with_significance(q, k, v, mask, backend="triton"),
                lambda out: _packed(out[0], indices), {})
    if name == "eager":
        return (lambda: attention_with_significance_ref(q, k, v, mask),
                lambda out: _packed(out[0], indices), {})
    raise ValueError(name)


@pytest.mark.parametrize("scenario, impl", CASES, ids=[f"{s}-{i}" for s, i in CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("n", LENGTHS, ids=lambda n: f"N{n}")
@pytest.mark.parametrize("batch", BATCHES, ids=lambda b: f"B{b}")
def test_attention(benchmark, batch, n, dtype, scenario, impl):
    from kernels.attention import attention_with_significance_ref

    dev = common.require_gpu_case()
    q, k, v, mask = _inputs(scenario, batch, n, dtype, dev)
    fn, as_packed, notes = _impl(impl, q, k, v, mask, dev)
    indices = pack(mask)[0]
    expected = _packed(attention_with_significance_ref(q, k, v, mask)[0], indices).float()
    torch.testing.assert_close(as_packed(fn()).float(), expected, atol=ATOL[dtype], rtol=ATOL[dtype])

    name = str(dtype).replace("torch.", "")
    median = common.timed(
        benchmark, fn, dev=dev, group=f"attention {scenario} B{batch} N{n} {name} H{H} d{D}", impl=impl,
        baseline=BASELINE[scenario], sequences=batch, rounds=common.rounds(50), warmup_rounds=5,
        scenario=scenario, B=batch, H=H, d=D, n=n, dtype=name, real_tokens=int(mask.sum()), **notes,
    )
    if dev == "cuda":
        from triton.testing import do_bench

        benchmark.extra_info["device_ms"] = do_bench(fn, warmup=25, rep=100, return_mode="median")
    print(f"\n{impl:>10} {scenario} B{batch} N{n} {name}: {1e3 * median:.3f} ms, {batch / median:.0f} seq/s")
