"""The GPU steps' plumbing, checked on CPU: ``benchmarks/gpu.sh --dry-run``, ``benchmarks/table.py``,
the unpadded stock baseline, and the GPU run of this suite skipping what it cannot run.

``make gpu-dry-run`` (CI) runs every dry-run case; here a few cases per step keep it short.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest
import torch
from transformers import BertConfig, BertModel

from benchmarks import table
from benchmarks.unpadded import bert_forward_unpadded, pack, varlen_attention

ROOT = Path(__file__).resolve().parents[1]
GPU_SH = ROOT / "benchmarks" / "gpu.sh"


def _clean_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "POWERBERT_TEST_GPU", "POWERBERT_BENCH_DRY_RUN", "OUT")}
    env.update(PYTHON=sys.executable, **extra)
    return env


# ----------------------------------------------------------------------------- gpu.sh


# triton 3.6's interpreter turns a runtime int into a 1-element array and calls int() on it, which
# numpy >= 2.4 refuses (triton-lang/triton#9171): every kernel with a loop over a runtime bound
# fails. pyproject pins numpy < 2.4; a GPU image brings its own numpy (2.5 on the lent H200).
INTERPRETER_NUMPY = pytest.mark.skipif(
    numpy.lib.NumpyVersion(numpy.__version__) >= "2.4.0",
    reason=f"the dry run interprets Triton, which breaks on numpy {numpy.__version__} >= 2.4 "
           "(triton-lang/triton#9171); CI pins numpy < 2.4")


@INTERPRETER_NUMPY
def test_dry_run_writes_the_table_in_at_most_eight_files(tmp_path):
    """The benchmark steps and the table, the cheapest cases of each benchmark file that writes a
    file (the tests step only collects, in the full dry run): the files, the DRY RUN marker, a
    ratio and sequences/s."""
    out = tmp_path / "out"
    cases = "B1-N16-float16-equal-sdpa-flash or B1-N16-float16-equal-triton or cuda-fp16-torch or cls-head or bert-"
    proc = subprocess.run(["bash", str(GPU_SH), "--dry-run", "kernels", "model", "table", "--", "-k", cases],
                          cwd=ROOT, env=_clean_env(OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["families_e2e_cpu.json", "gpu.log", "gpu_kernels.json", "gpu_model.json", "gpu_results.md",
                     "gpu_run.json", "model_e2e_cpu.json"]
    text = (out / "gpu_results.md").read_text()
    assert text.startswith("# GPU benchmark results (DRY RUN)") and "not measurements" in text
    assert "Missing" not in text
    run = json.loads((out / "gpu_run.json").read_text())
    assert run["dry_run"] and list(run["steps"]) == ["kernels", "model", "table"]
    assert all(step["rc"] == 0 for step in run["steps"].values())
    for key in ("torch", "triton", "transformers", "python", "device"):
        assert run["environment"][key]
    # The attention rows: the baseline at 1.00x, the kernel with its sequences/s beside its ratio.
    rows = [line.split(" | ") for line in text.splitlines() if "| sdpa-flash |" in line or "| triton |" in line]
    assert any(r[1] == "sdpa-flash" and r[4] == "1.00x" for r in rows)
    assert all(float(r[3].replace(",", "")) > 0 and r[4].endswith("x") for r in rows)


def test_dry_run_refuses_the_committed_results_folder():
    proc = subprocess.run(["bash", str(GPU_SH), "--dry-run", "table"], cwd=ROOT, capture_output=True, text=True,
                          env=_clean_env(OUT=str(ROOT / "benchmarks" / "results")), timeout=60)
    assert proc.returncode == 2 and "never writes into benchmarks/results" in proc.stderr


def test_unknown_step_is_refused():
    proc = subprocess.run(["bash", str(GPU_SH), "--dry-run", "kernel"], cwd=ROOT, capture_output=True, text=True,
                          env=_clean_env(), timeout=60)
    assert proc.returncode == 2 and "unknown step 'kernel'" in proc.stderr


# ----------------------------------------------------------------------------- table.py


def _bench(name, impl, median, baseline, group="g", sequences=8, **extra):
    return dict(name=name, fullname=f"benchmarks/test_x.py::test_x[{name}]", group=group,
                stats=dict(median=median), extra_info=dict(impl=impl, baseline=baseline, sequences=sequences, **extra))


def test_table_names_missing_and_unreadable_files(tmp_path):
    text, missing = table.render(tmp_path)  # nothing there: no crash, everything listed
    assert "**Missing:**" in text
    for name in ("gpu_run.json", "gpu_kernels.json", "gpu_model.json", "model_e2e_<device>.json"):
        assert any(m.startswith(name) for m in missing), (name, missing)
    (tmp_path / "gpu_model.json").write_text('{"benchmarks": [')  # cut short by a killed run
    text, missing = table.render(tmp_path)
    assert any(m.startswith("gpu_model.json (gpu.sh model, unreadable") for m in missing)


def test_table_ratio_against_the_named_baseline_with_sequences_per_second(tmp_path):
    benches = [_bench("a", "stock", 0.010, "stock"), _bench("b", "patched", 0.004, "stock"),
               _bench("c", "other", 0.005, "absent")]
    (tmp_path / "gpu_kernels.json").write_text(json.dumps({"benchmarks": benches}))
    (tmp_path / "gpu_run.json").write_text(json.dumps(
        {"dry_run": False, "environment": {"device": "test device", "torch": "x"},
         "steps": {"kernels": {"rc": 0, "seconds": 1.0, "summary": "3 passed"}}}))
    text, missing = table.render(tmp_path)
    assert text.startswith("# GPU benchmark results: test device") and "DRY RUN" not in text
    lines = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert lines["stock"][2:6] == ["10.000", "800", "1.00x", "stock"]
    assert lines["patched"][2:6] == ["4.000", "2,000", "2.50x", "stock"]
    assert lines["other"][4] == "(baseline missing)"
    assert "gpu_model.json (gpu.sh model)" in missing and "gpu_kernels.json" not in " ".join(missing)


# ----------------------------------------------------------------------------- unpadded baseline


def test_unpadded_bert_matches_stock_on_real_tokens(one_thread):
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=96)).eval()
    ids = torch.randint(1, 101, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 2:] = 0
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).last_hidden_state
        packed, indices, cu_seqlens = bert_forward_unpadded(model, ids, mask)
    assert cu_seqlens.tolist() == [0, 11, 18, 20] and packed.shape == (20, 64)
    torch.testing.assert_close(packed, stock.flatten(0, 1)[indices], atol=1e-5, rtol=1e-5)


def test_varlen_attention_is_attention_within_each_sequence():
    lengths = [5, 1, 9]
    q, k, v = (torch.randn(sum(lengths), 2, 32, dtype=torch.float64) for _ in range(3))
    mask = torch.arange(9)[None, :] < torch.tensor(lengths)[:, None]
    _, cu_seqlens, longest = pack(mask)
    out = varlen_attention(q, k, v, cu_seqlens, longest, backend="nested")
    start = 0
    for length in lengths:
        s = slice(start, start + length)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[s], k[s]) / 32 ** 0.5, -1)
        torch.testing.assert_close(out[s], torch.einsum("hqk,khd->qhd", probs, v[s]))
        start += length
    with pytest.raises(ValueError, match="backend must be"):
        varlen_attention(q, k, v, cu_seqlens, longest, backend="flash")


# ----------------------------------------------------------------------------- the GPU run of this suite


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the GPU run's skips on a machine without CUDA")
def test_gpu_run_skips_cuda_and_interpreter_tests_with_a_reason():
    """POWERBERT_TEST_GPU=1 without the interpreter: the tests that run Triton on CPU tensors and
    those that need CUDA skip and say why, instead of failing."""
    tests = ["tests/kernels/test_kernels_attention.py::test_backends_agree_on_cpu",
             "tests/elimination/test_patch_fast_paths.py::test_gradients_flow_through_the_triton_gather",
             "tests/kernels/test_kernels_gather.py::test_gather_non_contiguous"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *tests],
                          cwd=ROOT, env=_clean_env(POWERBERT_TEST_GPU="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "interpreter-only: runs the Triton kernels on CPU tensors" in proc.stdout
    assert "POWERBERT_TEST_GPU=1 needs CUDA tensors" in proc.stdout
    assert " passed" not in proc.stdout.splitlines()[-1]
