"""The steps behind ``benchmarks/gpu.sh``: GPU tests, kernel benchmarks, model benchmarks, table.

    bash benchmarks/gpu.sh [--dry-run] [--step-timeout S] [tests|kernels|model|table|all ...] [-- PYTEST_ARGS]

Every step is one command that stands alone and stops itself before ``--step-timeout`` seconds
(default 480: a lent GPU machine kills a command at 10 minutes). A step that runs out of time is
interrupted (SIGINT), so pytest-benchmark still writes the cases it finished. Results go to
``$OUT`` when set, else ``benchmarks/results/`` (the dry run: ``work/gpu-dry-run/``), in at most
eight files (a lent machine sends no more back):

    gpu_run.json      environment (device, driver, CUDA, torch, triton, ...) and each step's status
    gpu.log           every step's output, appended with a header per step
    gpu_kernels.json  pytest-benchmark: extract op, attention against SDPA / varlen / nested
    gpu_model.json    pytest-benchmark: BERT end to end, families, against stock SDPA / unpadded
    model_e2e_<device>.json, families_e2e_<device>.json   speedups beside their ideals
    gpu_results.md    the table (``benchmarks/table.py``)

``--dry-run`` runs the same steps on CPU (CUDA hidden): the tests step collects the GPU run's
tests, the benchmark steps run their GPU cases with tiny shapes under ``TRITON_INTERPRET=1``,
and the table says "DRY RUN". It fails if any step fails, a file is missing or there are more
than eight. Only the standard library is imported here: the steps run in their own processes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from powerbert.inputs.files import write_json_atomic  # no torch: the driver starts before any step

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "kernels", "model", "table")
MAX_FILES = 8
RUN_FILE, LOG_FILE, TABLE_FILE = "gpu_run.json", "gpu.log", "gpu_results.md"
# In order of importance: a step interrupted at its timeout loses the last ones.
BENCHMARKS = {
    "kernels": ["benchmarks/test_bench_attention.py", "benchmarks/test_bench_ops.py"],
    "model": ["benchmarks/test_bench_peers.py", "benchmarks/test_bench_model.py", "benchmarks/test_bench_families.py"],
}
# Written by the model step's benchmarks themselves, into POWERBERT_RESULTS (= OUT).
RECORDS = ("model_e2e", "families_e2e")
GRACE_S = 30  # after SIGINT, before SIGKILL


def bench_json(step: str) -> str:
    return f"gpu_{step}.json"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="gpu.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="*", metavar="STEP",
                        help="tests, kernels, model, table or all (default: all, in that order)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the plumbing")
    parser.add_argument("--step-timeout", type=float, default=480.0,
                        help="seconds a step may run before it is interrupted (default 480)")
    args = parser.parse_args(argv)
    unknown = [s for s in args.steps if s not in STEPS + ("all",)]
    if unknown:
        parser.error(f"unknown step {unknown[0]!r}: choose from {', '.join(STEPS + ('all',))}")
    steps = list(STEPS) if not args.steps or "all" in args.steps else [s for s in STEPS if s in args.steps]

    out = Path(os.environ.get("OUT") or (ROOT / "work" / "gpu-dry-run" if args.dry_run else ROOT / "benchmarks" / "results"))
    out = out.resolve()
    if args.dry_run and out == (ROOT / "benchmarks" / "results").resolve():
        print("gpu.sh: --dry-run never writes into benchmarks/results/ (committed results); set OUT elsewhere",
              file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if not args.dry_run and any(s != "table" for s in steps):
        problem = _gpu_preflight()
        if problem:
            print(f"gpu.sh: {problem}", file=sys.stderr)
            return 2

    run = _load_json(out / RUN_FILE) or {}
    run["dry_run"] = args.dry_run
    environment = None  # one record per invocation: the steps run on the same machine
    rcs = []
    for step in steps:
        started = time.time()
        print(f"== gpu.sh {step}{' (dry run)' if args.dry_run else ''} -> {out}", flush=True)
        if step == "table":
            record = _table(out)
        else:
            env = _env(step, args.dry_run, out)
            environment = environment or _environment(env)
            run["environment"] = environment
            if step == "tests":
                record = _tests(out, env, args.dry_run, args.step_timeout, pytest_args)
            else:
                record = _benchmarks(step, out, env, args.step_timeout, pytest_args)
            record["device"] = run["environment"].get("device")
        record.update(started=datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds"),
                      seconds=round(time.time() - started, 1))
        run.setdefault("steps", {})[step] = record
        write_json_atomic(out / RUN_FILE, run)
        rcs.append(record["rc"])
        print(f"== {step}: rc {record['rc']} in {record['seconds']:.0f} s"
              f"{' (interrupted at the step timeout)' if record.get('timed_out') else ''}"
              f"{': ' + record['summary'] if record.get('summary') else ''}", flush=True)
    if "table" in steps:  # the steps' own records are in gpu_run.json now: render once more
        _table(out)

    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    print(f"== {len(files)} files in {out}: {', '.join(files)}")
    if len(files) > MAX_FILES and os.environ.get("OUT"):  # benchmarks/results/ holds committed files too
        print(f"gpu.sh: {len(files)} files in {out}, more than the {MAX_FILES} a lent machine sends back", file=sys.stderr)
    rc = max(rcs, default=0)
    if args.dry_run:
        rc = max(rc, _check_dry_run(out, steps, files))
    return rc


# ----------------------------------------------------------------------------- environment


def _gpu_preflight() -> str | None:
    code = ("import torch, pytest, pytest_benchmark, triton, transformers; "
            "print('ok' if torch.cuda.is_available() else 'none')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return (f"{sys.executable} cannot import torch, pytest, pytest-benchmark, triton and transformers "
                f"(nothing is installed from the network here; set PYTHON): {proc.stderr.strip().splitlines()[-1:]}")
    if proc.stdout.strip() != "ok":
        return "no CUDA device visible (use --dry-run on a CPU machine)"
    return None


def _env(step: str, dry_run: bool, out: Path) -> dict:
    env = dict(os.environ)
    for name in ("TRITON_INTERPRET", "POWERBERT_BENCH_DRY_RUN", "POWERBERT_TEST_GPU"):
        env.pop(name, None)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               POWERBERT_RESULTS=str(out), PYTHONDONTWRITEBYTECODE="1")
    if step == "tests":
        env["POWERBERT_TEST_GPU"] = "1"  # the GPU run of the suite: compiled kernels, CUDA tensors
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # tiny models: one thread is fastest
        if step != "tests":
            env.update(POWERBERT_BENCH_DRY_RUN="1", TRITON_INTERPRET="1")
    return env


def _environment(env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.common"], capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1:] or ["unknown"]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- steps


def _pytest(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args]


def _rc(proc: subprocess.Popen) -> int:
    """pytest's exit status; 5 (nothing collected, e.g. a ``-k`` that selects no case here) is no failure."""
    return 0 if proc.returncode == 5 else abs(proc.returncode)


def _start(cmd: list[str], env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _finish(procs: list[subprocess.Popen], deadline: float) -> bool:
    """Wait for every process until ``deadline``; then SIGINT the rest (pytest then reports and
    writes its benchmark JSON), SIGKILL after a grace period. True if any was interrupted."""
    interrupted = False
    for proc in procs:
        try:
            proc.wait(timeout=max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            interrupted = True
            for sig, wait in ((signal.SIGINT, GRACE_S), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return interrupted


def _append_log(out: Path, title: str, text: str) -> None:
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    with open(out / LOG_FILE, "a", encoding="utf-8") as log:
        log.write(f"\n===== {title} ({stamp}) =====\n{text}")


SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed|warnings?|tests? collected)")


def _summary(text: str) -> dict:
    """Counts from pytest's last summary line (``3 failed, 10 passed, 2 skipped in 4.1s``)."""
    for line in reversed(text.strip().splitlines()):
        found = SUMMARY.findall(line)
        if found:
            return {word.rstrip("s") if word.startswith(("error", "warning")) else word.split()[-1]: int(n)
                    for n, word in found}
    return {}


def _summary_text(counts: dict) -> str:
    return ", ".join(f"{n} {word}" for word, n in counts.items())


def _tests(out: Path, env: dict, dry_run: bool, timeout: float, extra: list[str]) -> dict:
    """The suite with POWERBERT_TEST_GPU=1, its files spread over parallel pytest processes:
    Triton compiles on the CPU, so compile-heavy files in parallel finish far sooner. The dry
    run collects the same tests with CUDA hidden (nothing may query the GPU at collection)."""
    files = sorted(ROOT.glob("tests/**/test_*.py"))
    cpus = os.cpu_count() or 2
    workers = max(1, min(6, cpus // 2, len(files)))
    groups: list[list[Path]] = [[] for _ in range(workers)]
    sizes = [0] * workers
    for path in sorted(files, key=lambda p: p.stat().st_size, reverse=True):  # size ~ test count
        i = sizes.index(min(sizes))
        groups[i].append(path)
        sizes[i] += path.stat().st_size
    if not dry_run:
        env = dict(env, OMP_NUM_THREADS=str(max(1, cpus // workers)))
    mode = ["--collect-only", "-q"] if dry_run else ["-q", "-rfEs"]
    deadline = time.time() + timeout
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(Path(tmp) / f"group{i}.log", "w+", encoding="utf-8") for i in range(workers)]
        procs = [_start(_pytest([*mode, *extra, *(str(p.relative_to(ROOT)) for p in group)]), env, log)
                 for group, log in zip(groups, logs)]
        timed_out = _finish(procs, deadline)
        results, counts = [], {}
        for i, (group, log, proc) in enumerate(zip(groups, logs, procs)):
            log.seek(0)
            text = log.read()
            log.close()
            names = [p.name for p in group]
            _append_log(out, f"tests group {i + 1}/{workers} (rc {proc.returncode}): {' '.join(names)}", text)
            group_counts = _summary(text)
            if dry_run and not group_counts:  # --collect-only -q prints "N tests collected"
                group_counts = {"collected": sum(1 for line in text.splitlines() if "::" in line)}
            for word, n in group_counts.items():
                counts[word] = counts.get(word, 0) + n
            results.append(dict(files=names, rc=_rc(proc), summary=_summary_text(group_counts)))
            print(f"   group {i + 1}: rc {proc.returncode}: {_summary_text(group_counts) or text.strip()[-300:]}")
    rc = max((r["rc"] for r in results), default=0)
    return dict(rc=124 if timed_out else rc, timed_out=timed_out, summary=_summary_text(counts), counts=counts,
                groups=results, mode="collect-only" if dry_run else "run")


def _benchmarks(step: str, out: Path, env: dict, timeout: float, extra: list[str]) -> dict:
    target = out / bench_json(step)
    target.unlink(missing_ok=True)  # a stale file must not pass for this run's results
    if step == "model":
        device = "cpu" if env.get("POWERBERT_BENCH_DRY_RUN") == "1" else "cuda"
        for name in RECORDS:  # the model benchmark merges cases into its record: start clean
            (out / f"{name}_{device}.json").unlink(missing_ok=True)
    cmd = _pytest(["-q", "-rfEs", "-s", *BENCHMARKS[step], "--benchmark-only", f"--benchmark-json={target}",
                   "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name", *extra])
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        proc = _start(cmd, env, log)
        timed_out = _finish([proc], time.time() + timeout)
        log.seek(0)
        text = log.read()
    _append_log(out, f"{step} (rc {proc.returncode}): {' '.join(cmd[3:])}", text)
    tail = text.strip().splitlines()[-15:]
    print("\n".join("   " + line for line in tail))
    counts = _summary(text)
    return dict(rc=124 if timed_out else _rc(proc), timed_out=timed_out, summary=_summary_text(counts),
                counts=counts, files=BENCHMARKS[step], json=target.name if target.exists() else None)


def _table(out: Path) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("powerbert_bench_table", ROOT / "benchmarks" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text, missing = table.render(out)
    (out / TABLE_FILE).write_text(text, encoding="utf-8")
    print(f"   {TABLE_FILE}: {len(text.splitlines())} lines" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return dict(rc=0, missing=missing, summary=f"missing: {', '.join(missing)}" if missing else "")


def _check_dry_run(out: Path, steps: list[str], files: list[str]) -> int:
    problems = []
    run = _load_json(out / RUN_FILE) or {}
    for step in steps:
        record = run.get("steps", {}).get(step, {})
        if record.get("rc") != 0:
            problems.append(f"step {step} rc {record.get('rc')}")
    if "table" in steps:
        text = (out / TABLE_FILE).read_text(encoding="utf-8") if (out / TABLE_FILE).exists() else ""
        if "DRY RUN" not in text:
            problems.append(f"{TABLE_FILE} lacks the DRY RUN marker")
        if set(STEPS) <= set(steps) and run.get("steps", {}).get("table", {}).get("missing"):
            problems.append(f"table: missing {run['steps']['table']['missing']}")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out} (at most {MAX_FILES})")
    for problem in problems:
        print(f"gpu.sh --dry-run: {problem}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- files


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
