"""Ahead-of-time compile of every Triton kernel for sm_80 and sm_90, without a GPU.

Runs ``python -m kernels.aot`` in a subprocess with TRITON_INTERPRET removed: under the
interpreter (which this test session sets) ``@triton.jit`` yields functions that cannot be
compiled. kernels.aot compiles each kernel as the JIT specialises it at run time (recorded from
the launchers); tests/kernels/test_spill.py holds the register and spill limits.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot import ARCHS, ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, ATTENTION_LENGTHS, N

REPO = Path(__file__).resolve().parents[2]
# The elimination kernels, each in fp32/fp16/bf16, and the attention's two passes per dtype
# (fp16/bf16: fp32 takes the torch path on CUDA), head dim and length.
ELIMINATION = ["significance", "select", "gather", "score_select"]
DTYPES = ["float32", "float16", "bfloat16"]
# The per-row k variants (proportional retention): their code does not depend on the score dtype.
PER_ROW = ["select_rows[bfloat16]", "score_select_rows[bfloat16]", "gather_rows[bfloat16]"]
ATTENTION = [f"{kernel}[{dtype},d{d}{suffix}]" for kernel in ("attn_fwd", "attn_colsum")
             for dtype in ATTENTION_DTYPES for d in ATTENTION_HEAD_DIMS
             for suffix in ("" if n == N else f",n{n}" for n in ATTENTION_LENGTHS)]
# The packed (varlen) path's kernels: attention with its lse, the lse column sums (per dtype, head
# dim and length), and the selection + gather + LayerNorm (per dtype, with and without selection).
PACKED = ([f"varlen_attn[{dtype},d{d}{suffix}]" for dtype in ATTENTION_DTYPES for d in ATTENTION_HEAD_DIMS
           for suffix in ("", ",n77", ",n512")]
          + [f"lse_colsum[{dtype},d{d}{suffix}]" for dtype in ATTENTION_DTYPES for d in ATTENTION_HEAD_DIMS
             for suffix in ("", ",n77")]
          + [f"{kernel}[{dtype}]" for kernel in ("select_gather_norm", "gather_norm") for dtype in DTYPES])


def run_aot(*args, timeout=900):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "kernels.aot", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def aot_run():
    return run_aot()


def test_aot_compiles_every_kernel(aot_run):
    assert aot_run.returncode == 0, aot_run.stdout[-3000:] + aot_run.stderr[-5000:]
    lines = aot_run.stdout.splitlines()
    expected = {f"{k}[{d}]" for k in ELIMINATION for d in DTYPES} | set(PER_ROW) | set(ATTENTION) | set(PACKED)
    for name in sorted(expected):
        for cap in ARCHS:
            hits = [line for line in lines if line.startswith(f"OK {name} sm_{cap} regs=")]
            assert hits, f"no successful compile line for {name} sm_{cap}"
            assert int(hits[0].split("ptx_bytes=")[1].split()[0]) > 0


def test_aot_refuses_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "kernels.aot"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "TRITON_INTERPRET" in proc.stderr
