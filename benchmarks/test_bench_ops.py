"""Elimination op (significance + top-k + gather) against the eager reference, BERT-base shape.

    .venv/bin/python -m pytest benchmarks/test_bench_ops.py --benchmark-only -s

B 16, H 12, n 128, D 768, k 77 (the first layer of the spec's BERT-base example configuration),
real lengths drawn in [n/2, n].

* CPU, fp32: ``extract(..., backend="torch")`` (vectorised) vs ``extract_ref`` (eager reference).
* CUDA, fp16 (skipped without a GPU, and whenever TRITON_INTERPRET is set: never benchmark the
  interpreter): ``extract(..., backend="triton")`` (two launches) vs the torch path and the reference.
  In the dry run (``gpu.sh --dry-run``) these cases run on CPU, tiny shapes, Triton interpreted.

Every test also times, with the same timer in the same run (interleaved on CPU), the baseline (``extract_ref``) and a
bytes-bound floor: one read of probs plus one copy of the kept hidden rows, which is what the op
must move (powerbert/ALGORITHM.md §6: no more than one pass over the probabilities and the hidden states).
extra_info records the ratios, the bytes, device, dtype, shapes and versions.
"""
from __future__ import annotations

import platform
import statistics
import time

import pytest
import torch

from benchmarks import common

B, H, N, D, K = (2, 2, 16, 32, 9) if common.DRY_RUN else (16, 12, 128, 768, 77)


def _inputs(device, dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    probs = (torch.randn(B, H, N, N, generator=g) * 2).softmax(-1).to(dtype).to(device)
    hidden = torch.randn(B, N, D, generator=g).to(dtype).to(device)
    lengths = torch.randint(N // 2, N + 1, (B,), generator=g)
    lengths[0] = N
    mask = (torch.arange(N)[None, :] < lengths[:, None]).long().to(device)
    return probs, hidden, mask


def _bytes_moved(probs, hidden, mask):
    """probs read once + kept hidden rows read and written + mask read, kept mask and indices written."""
    e_p, e_h = probs.element_size(), hidden.element_size()
    return (probs.numel() * e_p + 2 * B * K * D * e_h + mask.numel() * mask.element_size()
            + B * K * (mask.element_size() + 8))


def _same_run_ms(fns, device, reps=1 if common.DRY_RUN else 30):
    """Median ms of each callable, same timer. On CPU the callables are timed interleaved, round
    by round, so a load change on a shared machine hits all of them alike and the ratios hold."""
    if device == "cuda":
        from triton.testing import do_bench

        return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") for name, fn in fns.items()}
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _floor(probs, hidden):
    """A bytes-bound stand-in: read probs once, copy k rows of hidden."""
    def run():
        probs.sum(dtype=torch.float32)
        hidden[:, :K].clone()
    return run


CASES = [
    pytest.param("cpu", torch.float32, "torch", id="cpu-fp32-torch"),
    pytest.param("cpu", torch.float32, "eager_ref", id="cpu-fp32-eager_ref"),
    pytest.param("cuda", torch.float16, "triton", id="cuda-fp16-triton", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, "torch", id="cuda-fp16-torch", marks=pytest.mark.gpu),
    pytest.param("cuda", torch.float16, "eager_ref", id="cuda-fp16-eager_ref", marks=pytest.mark.gpu),
]


@pytest.mark.parametrize("device,dtype,impl", CASES)
def test_extract(benchmark, device, dtype, impl):
    if device == "cuda":
        device = common.require_gpu_case()  # CPU in the dry run
    elif common.device() == "cuda":
        pytest.skip("a CPU case (make bench); this machine runs the CUDA cases")
    from kernels.extract import extract, extract_ref

    probs, hidden, mask = _inputs(device, dtype)
    impls = {
        "triton": lambda: extract(probs, hidden, mask, K, backend="triton"),
        "torch": lambda: extract(probs, hidden, mask, K, backend="torch"),
        "eager_ref": lambda: extract_ref(probs, hidden, mask, K),
    }
    fn = impls[impl]
    out = fn()  # compile / warm up outside the timed rounds
    ref = impls["eager_ref"]()
    assert torch.equal(out[2], ref[2]), "benchmarked path selects differently from the reference"

    common.timed(benchmark, fn, dev=device, group=f"extract {str(dtype).replace('torch.', '')} {device} B{B} H{H} n{N} D{D} k{K}",
                 impl=impl, baseline="eager_ref", sequences=B, rounds=common.rounds(50, cpu=20), warmup_rounds=2)

    # Same-run ratios, every number from the same timer.
    ms = _same_run_ms({"impl": fn, "base": impls["eager_ref"], "floor": _floor(probs, hidden)}, device)
    impl_ms, base_ms, floor_ms = ms["impl"], ms["base"], ms["floor"]
    nbytes = _bytes_moved(probs, hidden, mask)
    import triton

    benchmark.extra_info.update(
        cpu_threads=torch.get_num_threads(), dtype=str(dtype), B=B, H=H, n=N, D=D, k=K,
        real_tokens=int(mask.sum()), bytes_moved=nbytes, median_ms=impl_ms, eager_ref_median_ms=base_ms,
        speedup_vs_eager_ref=base_ms / impl_ms, bytes_floor_ms=floor_ms, ratio_vs_bytes_floor=impl_ms / floor_ms,
        effective_GBps=nbytes / impl_ms / 1e6,
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
    )
    print(f"\n{impl:>9} {device} {dtype}: {impl_ms:.3f} ms | eager_ref {base_ms:.3f} ms "
          f"(speedup {base_ms / impl_ms:.2f}x) | bytes floor {floor_ms:.3f} ms "
          f"(ratio {impl_ms / floor_ms:.2f}x) | {nbytes / 1e6:.1f} MB, {nbytes / impl_ms / 1e6:.2f} GB/s")
