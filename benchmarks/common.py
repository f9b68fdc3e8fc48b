"""What the benchmarks share: where they run, where results go, what is recorded beside them,
and one warmed-up timer.

Three ways a benchmark runs:

* on a GPU (``benchmarks/gpu.sh kernels|model``): CUDA tensors, the GPU grid of shapes;
* on a CPU (``make bench``): the CPU cases; GPU-only cases skip with a reason;
* the dry run (``benchmarks/gpu.sh --dry-run``, ``POWERBERT_BENCH_DRY_RUN=1``): the GPU cases'
  code paths on CPU tensors with tiny shapes, one warm-up and one timed round, Triton kernels
  under ``TRITON_INTERPRET=1``. It checks the plumbing (cases, records, table); its numbers mean
  nothing.

``POWERBERT_BENCH_QUICK=1`` (``gpu.sh quick``, dry run or not) narrows a grid to the quick step's
(``test_bench_peers``: fp16 only, and batch 256 besides 1, 8, 64).

Only environment variables decide the case grid, so collecting a benchmark never queries the GPU;
:func:`device` asks torch when a case runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

DRY_RUN = os.environ.get("POWERBERT_BENCH_DRY_RUN", "") == "1"
QUICK = os.environ.get("POWERBERT_BENCH_QUICK", "") == "1"
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
# gpu.sh points this at $OUT; by default the committed results folder.
RESULTS = Path(os.environ.get("POWERBERT_RESULTS") or Path(__file__).parent / "results")
SKIP_NO_CUDA = "needs a CUDA GPU (the dry run, POWERBERT_BENCH_DRY_RUN=1, runs this case's code on CPU)"
SKIP_INTERPRETER = "TRITON_INTERPRET is set: never benchmark the interpreter (outside the dry run)"


def device() -> str:
    """``"cuda"`` on a GPU machine, else ``"cpu"``; always ``"cpu"`` in the dry run."""
    return "cpu" if DRY_RUN else ("cuda" if torch.cuda.is_available() else "cpu")


def require_gpu_case() -> str:
    """Skip a GPU case where it cannot run; return the device it runs on (CPU in the dry run)."""
    import pytest

    if DRY_RUN:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.skip(SKIP_NO_CUDA)
    if INTERPRETING:
        pytest.skip(SKIP_INTERPRETER)
    return "cuda"


def rounds(gpu: int, cpu: int | None = None) -> int:
    """Timed rounds: ``gpu`` on CUDA, ``cpu`` (default ``gpu``) on CPU, 1 in the dry run."""
    if DRY_RUN:
        return 1
    return gpu if device() == "cuda" else (gpu if cpu is None else cpu)


def save_case(benchmark, name: str, dev: str, **fields) -> Path:
    """Merge this finished case into ``<name>_<dev>.json`` under RESULTS, written atomically at
    once (a run cut short keeps every case before it). The entry has pytest-benchmark's JSON form
    (name, fullname, group, stats, extra_info), so ``table.py`` reads both alike; a case run again
    replaces its entry. ``fields`` go to the file's top level (device, versions)."""
    from powerbert.inputs.files import write_json_atomic

    stats = benchmark.stats.stats
    entry = dict(name=benchmark.name, fullname=benchmark.fullname, group=benchmark.group,
                 stats={key: getattr(stats, key) for key in ("min", "max", "mean", "median", "stddev", "iqr", "rounds")},
                 extra_info=dict(benchmark.extra_info))
    path = RESULTS / f"{name}_{dev}.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    entries = {b["name"]: b for b in record.get("benchmarks", []) if isinstance(b, dict) and "name" in b}
    entries[entry["name"]] = entry
    record.update(fields, dry_run=DRY_RUN, torch=torch.__version__, benchmarks=list(entries.values()))
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return path


def synchronize(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def triton_path():
    """Context that runs a patched model's Triton code path: itself on CUDA, and in the dry run
    under the interpreter on CPU tensors (the CPU default is the torch path)."""
    if DRY_RUN and INTERPRETING:
        from powerbert.elimination import dispatch as ops

        return ops.use_backend("triton")
    return contextlib.nullcontext()


def device_name(dev: str) -> str:
    if dev == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


def timed(benchmark, fn, *, dev: str, group: str, impl: str, baseline: str | None, sequences: int,
          rounds: int, warmup_rounds: int = 3, setup=None, **extra) -> float:
    """Time ``fn`` with pytest-benchmark; returns the median in seconds.

    ``fn`` runs once before anything is timed (Triton compiles, cuDNN/cuBLAS plans, allocator
    growth), then ``warmup_rounds`` untimed rounds (at most 1 in the dry run; pass 0 when
    ``setup`` records something per round), then ``rounds`` timed ones,
    each followed by a device synchronisation. ``extra_info`` gets what ``table.py`` needs:
    ``impl`` (this row), ``baseline`` (the ``impl`` of the group the ratio is taken against),
    ``sequences`` per call (for sequences/s), device and dtype.
    """
    fn()
    synchronize(dev)

    def step():
        out = fn()
        synchronize(dev)
        return out

    benchmark.group = group
    benchmark.pedantic(step, setup=setup, rounds=rounds, warmup_rounds=min(1, warmup_rounds) if DRY_RUN else warmup_rounds)
    benchmark.extra_info.update(impl=impl, baseline=baseline, sequences=sequences, device=device_name(dev),
                                dry_run=DRY_RUN, **extra)
    return benchmark.stats.stats.median


# ----------------------------------------------------------------------------- environment


def _command(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def commit() -> str:
    """This checkout's short commit, ``+dirty`` when tracked files differ from it."""
    root = str(Path(__file__).resolve().parents[1])
    sha = _command("git", "-C", root, "rev-parse", "--short", "HEAD")
    if sha is None:
        return "unknown"
    dirty = _command("git", "-C", root, "status", "--porcelain", "--untracked-files=no")  # None when clean
    return sha + ("+dirty" if dirty else "")


def environment() -> dict:
    """Device, driver and library versions, recorded with every stored result."""
    import transformers
    import triton

    info = dict(
        dry_run=DRY_RUN, python=platform.python_version(), platform=platform.platform(),
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
        torch_cuda=torch.version.cuda, cudnn=None, device="cpu", device_count=0,
        triton_interpret=INTERPRETING,
        git_commit=_command("git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"),
    )
    try:
        from torch.nn.attention import varlen  # noqa: F401

        info["torch_varlen_attn"] = True
    except ImportError:
        info["torch_varlen_attn"] = False
    if device() == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=torch.cuda.get_device_name(), device_count=torch.cuda.device_count(),
            capability=f"sm_{props.major}{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
            driver=_command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
            flash_sdp_enabled=torch.backends.cuda.flash_sdp_enabled(),
            mem_efficient_sdp_enabled=torch.backends.cuda.mem_efficient_sdp_enabled(),
        )
        if info["driver"]:
            info["driver"] = info["driver"].splitlines()[0]
        else:  # no nvidia-smi: the kernel module says it too
            try:
                line = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
                info["driver"] = next((w for w in line.split() if w.count(".") >= 1 and w[0].isdigit()), line)
            except (OSError, IndexError):
                pass
        info["cuda_driver_api"] = _cuda_driver_api()
    return info


def _cuda_driver_api() -> int | None:
    """The CUDA version the driver supports (e.g. 12080), from libcuda itself."""
    import ctypes

    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return version.value
    except (OSError, AttributeError):
        pass
    return None


if __name__ == "__main__":  # gpu.sh records this in gpu_run.json, from a process of its own
    print(json.dumps(environment()))
