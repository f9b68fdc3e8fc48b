"""Registers and spills of the attention kernels (and the packed path's) as the JIT compiles them for sm_80 and sm_90.

``pytest -k spill``. No GPU needed: ``python -m kernels.aot`` (in a subprocess without
TRITON_INTERPRET, which this session sets) records the launcher's launches on BERT-base-shaped
inputs, specialises them as ``JITFunction.run`` does (i32 strides, ints equal to 1 as
constants, divisibility-by-16 hints, the launcher's tiles and warps, pass 2 narrowed for an
A100's / H100's SM count) and reads registers and spills from ``ptxas -v``. A spill in fp16 or
bf16 at head dims 64 and 128 fails: spilled registers go through local memory on every tile.
Compiles go through triton's on-disk cache, so test_aot_compile.py and this file share them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernels.aot import ARCHS, ATTENTION_LENGTHS, N, NO_SPILL_DTYPES, NO_SPILL_HEAD_DIMS

REPO = Path(__file__).resolve().parents[2]
NO_SPILL = (r"^((attn_\w+|varlen_attn|lse_colsum)\[(float16|bfloat16),d(64|128)(,n\d+)?\]"
            r"|(select_)?gather_norm\[(float16|bfloat16)\])$")
KERNELS = ([f"{kernel}[{dtype},d{d}{'' if n == N else f',n{n}'}]" for kernel in ("attn_fwd", "attn_colsum")
            for dtype in NO_SPILL_DTYPES for d in NO_SPILL_HEAD_DIMS for n in ATTENTION_LENGTHS]
           # the packed path's kernels (kernels/varlen_attention.py, lse_significance.py, select_gather_norm.py)
           + [f"{kernel}[{dtype},d{d}{suffix}]" for kernel, suffixes in (("varlen_attn", ("", ",n77", ",n512")),
                                                                        ("lse_colsum", ("", ",n77")))
              for dtype in NO_SPILL_DTYPES for d in NO_SPILL_HEAD_DIMS for suffix in suffixes]
           + [f"{kernel}[{dtype}]" for kernel in ("select_gather_norm", "gather_norm") for dtype in NO_SPILL_DTYPES])


def run_aot(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-m", "kernels.aot", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.fixture(scope="module")
def spill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("aot") / "records.json"
    proc = run_aot("--only", NO_SPILL, "--json", str(out))
    records = {(r["name"], r["arch"]): r for r in json.loads(out.read_text())} if out.exists() else {}
    return proc, records


@pytest.mark.parametrize("cap", ARCHS, ids=lambda c: f"sm_{c}")
@pytest.mark.parametrize("name", KERNELS)
def test_no_spill(spill_run, name, cap):
    proc, records = spill_run
    record = records.get((name, cap))
    assert record is not None, f"{name} sm_{cap} not compiled:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}"
    assert record["no_spill"]
    assert (record["spill_stores"], record["spill_loads"]) == (0, 0), record
    assert record["regs"] <= 255


def test_spill_check_exit_status(spill_run):
    proc, records = spill_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(records) == len(KERNELS) * len(ARCHS)


def test_compiled_as_the_jit_specialises(spill_run):
    """What the check compiled is the run-time variant, not a declared signature."""
    _, records = spill_run
    fwd = records[("attn_fwd[float16,d64]", 90)]["args"]
    assert fwd["q_ptr"] == "*fp16 div16" and fwd["mask_ptr"] == "*i8 div16"
    assert fwd["stride_qn"] == "i32 div16" and fwd["stride_qd"] == "=1"        # [B, n, H*d] views
    assert fwd["stride_on"] == "i32 div16" and fwd["stride_od"] == "=1"        # [B, n, H, d] context
    assert fwd["N"] == "i32 div16" and fwd["H"] == "i32"
    assert (fwd["BLOCK_M"], fwd["BLOCK_N"], fwd["HEAD_DIM"]) == ("=64", "=64", "=64")
    odd = records[("attn_fwd[float16,d64,n77]", 90)]["args"]
    assert odd["N"] == "i32" and odd["stride_mb"] == "i32"                     # 77: no hint
    for cap in ARCHS:  # 8 sequences of 128 tokens: pass 2 narrows its key tiles to fill the SMs
        colsum = records[("attn_colsum[bfloat16,d128]", cap)]
        assert colsum["args"]["BLOCK_N"] == "=16" and colsum["num_warps"] == 4


def test_spill_check_fails_on_a_spill():
    """The gate works: capped at 64 registers (triton's maxnreg), the d = 128 forward spills and
    kernels.aot exits 1 naming it."""
    proc = run_aot("--only", r"^attn_fwd\[float16,d128\]$", "--arch", "80", "--maxnreg", "64")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert "SPILL attn_fwd[float16,d128] sm_80" in proc.stderr
