"""The GPU steps' plumbing, checked on CPU: ``benchmarks/gpu.sh --dry-run`` (the quick step too),
``benchmarks/table.py``, the unpadded stock baselines, and the GPU run of this suite skipping what
it cannot run.

``make gpu-dry-run`` (CI) runs every dry-run case; here a few cases per step keep it short.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy
import pytest
import torch
from transformers import BertConfig, BertModel

from benchmarks import gpu, table
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
    cases = ("B1-N16-float16-equal-sdpa-flash or B1-N16-float16-equal-triton or cuda-fp16-torch or cls-head or bert- "
             "or B1-N16-float16-equal-stock-sdpa")
    proc = subprocess.run(["bash", str(GPU_SH), "--dry-run", "kernels", "model", "table", "--", "-k", cases],
                          cwd=ROOT, env=_clean_env(OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["families_e2e_cpu.json", "gpu.log", "gpu_kernels.json", "gpu_model.json", "gpu_results.md",
                     "gpu_run.json", "model_e2e_cpu.json", "peers_e2e_cpu.json"]
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


@INTERPRETER_NUMPY
def test_dry_run_quick_step_saves_cases_and_renders_the_strongest_stock_table(tmp_path):
    """``gpu.sh --dry-run quick``: the tests that need CUDA selected and skipped (CUDA hidden), the
    end-to-end cases (batch 1 here) saved one by one, the table with each row's strongest stock,
    in four files. The patched row runs the packed forward, patched-padded the padded one."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(GPU_SH), "--dry-run", "quick", "--", "-k", "not B3"],
                          cwd=ROOT, env=_clean_env(OUT=str(out)), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert files == ["gpu.log", "gpu_results.md", "gpu_run.json", "peers_e2e_cpu.json"]
    run = json.loads((out / "gpu_run.json").read_text())
    quick = run["steps"]["quick"]
    assert list(run["steps"]) == ["quick"] and quick["rc"] == 0 and not quick["timed_out"]
    # (a): only tests that need CUDA, every one skipped here; the others deselected by the plugin.
    counts = quick["tests"]["counts"]
    assert counts.get("skipped", 0) > 0 and counts.get("deselected", 0) > 0 and "passed" not in counts
    # (b): fp16 only, batch 1; the graphs skip on CPU. Each case is in the record.
    record = json.loads((out / "peers_e2e_cpu.json").read_text())
    names = {b["name"] for b in record["benchmarks"]}
    assert names == {f"test_peers[B1-N16-float16-{scenario}-{impl}]" for scenario, impls in
                     (("equal", ("stock-sdpa", "patched", "patched-eager", "patched-padded")),
                      ("ragged", ("stock-sdpa", "stock-unpadded", "patched", "patched-eager", "patched-padded")))
                     for impl in impls}
    # (c): the table, marked, each row against the fastest stock of its shape, FLOPs ideal beside.
    text = (out / "gpu_results.md").read_text()
    assert text.startswith("# GPU benchmark results (DRY RUN)") and gpu.QUICK_TABLE_MARKER in text
    assert "Missing" not in text and "| quick | 0 |" in text
    rows = _peer_rows(text)
    assert rows[("equal", "stock-sdpa")][5] == "stock-sdpa"  # the only stock row on CPU
    assert rows[("ragged", "stock-sdpa")][5] in ("stock-sdpa", "stock-unpadded")
    patched = rows[("ragged", "patched")]
    assert patched[4].endswith("x") and patched[6].endswith("x") and "path packed" in patched[9]
    assert "path padded" in rows[("ragged", "patched-padded")][9]
    assert "path packed" in rows[("ragged", "patched-eager")][9]


def test_step_arguments_and_timeouts(tmp_path, monkeypatch):
    """``all`` is every step in order, quick included; quick's default time-out is 330 s (the step
    ends within 6 minutes), the others' 480, and ``--step-timeout`` sets them all."""
    calls = []
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(gpu, "_environment", lambda env: {"device": "test"})
    monkeypatch.setattr(gpu, "_table", lambda out, quiet=False: dict(rc=0, missing=[]))
    monkeypatch.setattr(gpu, "_tests", lambda out, env, dry, timeout, extra: calls.append(("tests", timeout)) or dict(rc=0))
    monkeypatch.setattr(gpu, "_benchmarks", lambda step, out, env, timeout, extra: calls.append((step, timeout)) or dict(rc=0))

    def quick(out, env, dry, end, extra, save):
        calls.append(("quick", round(end - time.time())))
        assert env["POWERBERT_BENCH_QUICK"] == "1" and extra == ["-k", "x"]
        return dict(rc=0)

    monkeypatch.setattr(gpu, "_quick", quick)
    gpu.main(["--dry-run", "all", "--", "-k", "x"])
    assert calls == [("tests", 480), ("kernels", 480), ("model", 480), ("quick", 330)]
    assert list(json.loads((tmp_path / "gpu_run.json").read_text())["steps"]) == list(gpu.STEPS)
    calls.clear()
    gpu.main(["--dry-run", "--step-timeout", "100", "quick", "--", "-k", "x"])
    assert calls == [("quick", 100)]
    assert gpu.STEPS == ("tests", "kernels", "model", "quick", "table")


def test_quick_tests_select_what_needs_cuda():
    """The quick step's pytest plugin keeps tests marked gpu and tests on the device fixture."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "-p", "benchmarks.gpu", "tests/test_cuda_graph.py", "tests/kernels/test_kernels_gather.py"],
                          cwd=ROOT, env=_clean_env(POWERBERT_TEST_GPU="1", PYTHONPATH=str(ROOT)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    selected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert any("test_cuda_graph.py::test_replay_equals_the_eager_static_forward" in n for n in selected)  # gpu
    assert any(n.startswith("tests/kernels/test_kernels_gather.py::") for n in selected)  # device fixture
    assert not any("test_argument_checks_run_before_anything_touches_cuda" in n for n in selected)  # CPU only
    assert "deselected" in proc.stdout.splitlines()[-1]
    assert all(Path(ROOT / f).parent.is_dir() for f in gpu.QUICK_TESTS)


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
         "steps": {"kernels": {"rc": 0, "seconds": 1.0, "summary": "3 passed"}, "model": {"rc": 1}}}))
    text, missing = table.render(tmp_path)
    assert text.startswith("# GPU benchmark results: test device") and "DRY RUN" not in text
    lines = {line.split(" | ")[1]: line.split(" | ") for line in text.splitlines() if line.startswith("| ")}
    assert lines["stock"][2:6] == ["10.000", "800", "1.00x", "stock"]
    assert lines["patched"][2:6] == ["4.000", "2,000", "2.50x", "stock"]
    assert lines["other"][4] == "(baseline missing)"
    assert "gpu_model.json (gpu.sh model)" in missing and "gpu_kernels.json" not in " ".join(missing)


def _peer(group, impl, median, stock=False, **extra):
    """A test_bench_peers entry (pytest-benchmark's form), group "equal B8 N128 float16"."""
    bench = _bench(f"{group}-{impl}", impl, median, "stock-sdpa", group=f"bert e2e {group}", stock=stock, **extra)
    bench["fullname"] = f"benchmarks/test_bench_peers.py::test_peers[{group}-{impl}]"
    return bench


def _peer_rows(text):
    """The end-to-end table's rows by (scenario, case): its cells split (notes last)."""
    rows, shape = {}, ""
    for line in text.split(table.PEERS_TITLE, 1)[1].split("\n## ", 1)[0].splitlines():
        cells = line.split(" | ")
        if len(cells) == 10 and cells[1] != "case":
            shape = cells[0].lstrip("| ") or shape
            rows[(shape.split()[0], cells[1])] = cells
    return rows


def test_table_peers_against_the_strongest_stock_with_its_flops_ideal(tmp_path):
    """Each end-to-end row: ratio to the fastest stock row of its shape, named; the FLOPs ideal
    against stock padded to the longest, or against stock on real tokens where that is fastest.
    The record (written case by case) wins over gpu_model.json's entry of the same case; only
    the steps that ran are expected."""
    ideals = dict(ideal_flops=3.0, ideal_flops_vs_unpadded=2.0, ideal_vectors=3.5)
    model = [_peer("equal B8 N128 float16", "stock-sdpa", 0.010, stock=True),
             _peer("equal B8 N128 float16", "stock-graph", 0.008, stock=True),
             _peer("equal B8 N128 float16", "patched", 0.004, **ideals),
             _peer("ragged B8 N128 float16", "stock-sdpa", 0.010, stock=True),
             _peer("ragged B8 N128 float16", "patched", 0.999, **ideals)]
    record = [_peer("ragged B8 N128 float16", "stock-unpadded", 0.005, stock=True),
              _peer("ragged B8 N128 float16", "patched", 0.004, path="packed", **ideals)]
    (tmp_path / "gpu_model.json").write_text(json.dumps({"benchmarks": model}))
    (tmp_path / "peers_e2e_cuda.json").write_text(json.dumps({"benchmarks": record}))
    (tmp_path / "gpu_run.json").write_text(json.dumps({"dry_run": False, "environment": {"device": "d"},
                                                      "steps": {"quick": {"rc": 0, "summary": ""}}}))
    text, missing = table.render(tmp_path)
    assert missing == []  # quick ran: nothing of kernels' or model's is missing
    assert text.count(table.PEERS_TITLE) == 1 and table.PEERS_TITLE == gpu.QUICK_TABLE_MARKER
    assert "test_peers" not in text  # not again in the Models table
    rows = _peer_rows(text)
    assert rows[("equal", "patched")][2:8] == ["4.000", "2,000", "2.00x", "stock-graph", "3.00x", "3.50x"]
    assert rows[("equal", "stock-sdpa")][4:7] == ["0.80x", "stock-graph", "-"]
    assert rows[("ragged", "patched")][2:8] == ["4.000", "2,000", "1.25x", "stock-unpadded", "2.00x", "3.50x"]
    assert "path packed" in rows[("ragged", "patched")][9]
    assert rows[("ragged", "stock-unpadded")][4] == "1.00x"


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


def test_unpadded_with_fixed_lengths_matches_unpadded(one_thread):
    """stock-unpadded-graph's module (packing computed once, for capture) computes stock-unpadded."""
    from benchmarks import test_bench_peers as peers
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=101, hidden_size=64, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=96)).eval()
    inputs = peers._inputs("ragged", 3, 16, "cpu")
    inputs["input_ids"] = inputs["input_ids"] % 101
    fixed = peers.UnpaddedFixedLengths(model, inputs["attention_mask"]).eval()
    with torch.no_grad():
        expected = peers._classify_unpadded(model, inputs)
        got = fixed(input_ids=inputs["input_ids"], token_type_ids=inputs["token_type_ids"])
        stock = model(**inputs).logits
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got, stock, atol=1e-5, rtol=1e-5)
    assert peers.unpadded.pack is pack  # restored after the call


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
