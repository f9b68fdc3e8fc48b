"""Attention + significance scores (kernels/attention.py) against SDPA and eager attention.

GPU only: ``pytest benchmarks/test_bench_attention.py --benchmark-only -s``. fp16, B 64, H 12,
d 64 (BERT-base heads), n 128 and 512, every position real except a ragged tail of padding.

* ``triton``: ``attention_with_significance`` (context + scores, P never written);
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the same mask, context only;
* ``eager``: the reference (``softmax(q kᵀ) v`` plus the column sum over the materialised P).

Each test also times SDPA itself with the same timer, so ``ratio_vs_sdpa`` in extra_info is a
same-run ratio (goal: <= 1.25). ``ideal_ratio`` is what an implementation bound by the bytes it
must move would reach: pass 2 re-reads q and k, so 6 tensor passes against SDPA's 4.
"""
from __future__ import annotations

import os
import platform

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels compiled)"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
                       reason="TRITON_INTERPRET is set: never benchmark the interpreter"),
]

B, H, D = 64, 12, 64
DTYPE = torch.float16
LENGTHS = (128, 512)


def _inputs(n):
    g = torch.Generator(device="cuda").manual_seed(0)
    # Views of one [B, n, 3, H, D] projection, as a BERT layer produces them.
    x = torch.randn(B, n, 3, H, D, device="cuda", dtype=DTYPE, generator=g)
    q, k, v = (t.transpose(1, 2) for t in x.unbind(2))
    lengths = torch.randint(n // 2, n + 1, (B,), device="cuda", generator=g)
    lengths[0] = n
    mask = torch.arange(n, device="cuda")[None, :] < lengths[:, None]  # [B, n] bool
    return q, k, v, mask


def _impls(q, k, v, mask):
    from kernels.attention import attention_with_significance, attention_with_significance_ref

    sdpa_mask = mask[:, None, None, :]
    return {
        "triton": lambda: attention_with_significance(q, k, v, mask, backend="triton"),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask),
        "eager": lambda: attention_with_significance_ref(q, k, v, mask),
    }


def _median_ms(fn):
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("impl", ["triton", "sdpa", "eager"])
def test_attention(benchmark, impl, n):
    import triton

    q, k, v, mask = _inputs(n)
    impls = _impls(q, k, v, mask)
    fn = impls[impl]
    fn()  # compile / warm up outside the timed rounds

    def step():
        out = fn()
        torch.cuda.synchronize()
        return out

    benchmark.group = f"attention+scores fp16 B{B} H{H} d{D} n{n}"
    benchmark.pedantic(step, rounds=30, warmup_rounds=3)

    # Same-run ratio against SDPA, both measured with CUDA events by the same timer.
    impl_ms = _median_ms(fn)
    sdpa_ms = _median_ms(impls["sdpa"])
    benchmark.extra_info.update(
        impl=impl, device=torch.cuda.get_device_name(), dtype=str(DTYPE), B=B, H=H, d=D, n=n,
        real_tokens=int(mask.sum()), median_ms=impl_ms, sdpa_median_ms=sdpa_ms,
        ratio_vs_sdpa=impl_ms / sdpa_ms, ideal_ratio=1.5 if impl == "triton" else None,
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
    )
    print(f"\n{impl:>6} n={n}: {impl_ms:.3f} ms, SDPA {sdpa_ms:.3f} ms, ratio {impl_ms / sdpa_ms:.2f}x")
