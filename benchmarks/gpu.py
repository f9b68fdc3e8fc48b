"""The steps behind ``benchmarks/gpu.sh``: GPU tests, kernel benchmarks, model benchmarks, table.

    bash benchmarks/gpu.sh [--dry-run] [--step-timeout S] [tests|kernels|model|quick|table|all ...] [-- PYTEST_ARGS]

Every step is one command that stands alone and stops itself before ``--step-timeout`` seconds
(default 480, ``quick`` 330: a lent GPU machine kills a command at 10 minutes). A step that runs
out of time is interrupted (SIGINT), so pytest-benchmark still writes the cases it finished.
Results go to ``$OUT`` when set, else ``benchmarks/results/`` (the dry run: ``work/gpu-dry-run/``),
in at most eight files (a lent machine sends no more back):

    gpu_run.json      environment (device, driver, CUDA, torch, triton, ...) and each step's status
    gpu.log           every step's output, appended with a header per step
    gpu_kernels.json  pytest-benchmark: extract op, attention against SDPA / varlen / nested
    gpu_model.json    pytest-benchmark: BERT end to end, families, against stock SDPA / unpadded
    model_e2e_<device>.json, families_e2e_<device>.json   speedups beside their ideals
    peers_e2e_<device>.json   BERT end to end against every stock (``test_bench_peers``), one entry
                      written as each case finishes (``model`` and ``quick``)
    gpu_results.md    the table (``benchmarks/table.py``)

``quick`` is the one-command check (at most 6 minutes on an H100/H200, four of those files:
gpu_run.json, gpu.log, peers_e2e_cuda.json, gpu_results.md): (a) the tests that need CUDA in the
files of ``QUICK_TESTS`` (``-m gpu`` tests and those on the ``device`` fixture, selected by this
module as a pytest plugin) within ``QUICK_TESTS_S`` seconds; (b) ``test_bench_peers.py`` in fp16,
B 1, 8, 64, 256 x N 128, 512 (``POWERBERT_BENCH_QUICK=1``), every case saved as it finishes; (c)
the table, rendered again every ``TABLE_EVERY_S`` seconds while (b) runs and at its end, so a
time-out, ours or the machine's, keeps what finished.

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

from powerbert.inputs.files import write_json_atomic, write_text_atomic  # no torch: the driver starts before any step

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "kernels", "model", "quick", "table")
STEP_TIMEOUT = {"quick": 330.0}  # seconds; the other steps 480
MAX_FILES = 8
RUN_FILE, LOG_FILE, TABLE_FILE = "gpu_run.json", "gpu.log", "gpu_results.md"
QUICK_TABLE_MARKER = "## End to end against the strongest stock"  # table.py's section for test_bench_peers
# In order of importance: a step interrupted at its timeout loses the last ones.
BENCHMARKS = {
    "kernels": ["benchmarks/test_bench_attention.py", "benchmarks/test_bench_ops.py"],
    "model": ["benchmarks/test_bench_peers.py", "benchmarks/test_bench_model.py", "benchmarks/test_bench_families.py",
              "benchmarks/test_bench_compiled.py"],
}
# Written by the benchmarks themselves, into POWERBERT_RESULTS (= OUT), by step. Each is removed
# once per invocation, before the first step that writes it (``quick model`` keeps both's rows).
RECORDS = {"model": ("model_e2e", "families_e2e", "peers_e2e"), "quick": ("peers_e2e",)}
GRACE_S = 30  # after SIGINT, before SIGKILL

# The quick step. (a) The tests that need CUDA, in these files (missing ones are left out): the
# packed path's kernels and forward, and CUDA graphs. (b) The end-to-end table in fp16.
QUICK_TESTS = ("tests/kernels/test_kernels_varlen_attention.py", "tests/kernels/test_kernels_lse_significance.py",
               "tests/kernels/test_kernels_select_gather_norm.py", "tests/elimination/test_packed.py",
               "tests/test_cuda_graph.py")
QUICK_BENCHMARKS = ["benchmarks/test_bench_peers.py"]
QUICK_TESTS_S = 120  # (a)'s own time-out, within the step's
QUICK_GRACE_S = 10  # after SIGINT, before SIGKILL: the quick step's deadlines leave room for it
TABLE_EVERY_S = 20
# Time on an H200, estimated (not yet measured) from benchmarks/results/gpu.log of 2026-12-04: its
# model step took 156 s for 108 test_bench_peers cases and 20 others; the peers cases' calls (timed
# rounds and warm-up, from gpu_model.json) were ~23 s of it, so ~0.6-1 s a case went to model
# set-up, Triton compiles, graph capture and reference calls. Quick: ~10 s preflight and
# environment (counted in its time-out when quick runs first); (a) ~40-60 s expected, 120 s at most
# (five files of compiled-kernel tests over three processes); (b) 8 shapes x 12 rows = 96 cases
# (graph rows included; 112 with patched-eager since): ~15 s start and model, ~40 s compiles (padded, packed and static-layout
# kernels, fp16 only), 96 x 0.6 = ~60 s per-case overhead, ~35 s of calls (B256 N512 alone: 12
# rows at ~25-75 ms a call, ~25 calls each with its rounds cut to ~1 s, ~16 s); (c) < 1 s.
# About 200-260 s in all, 330 s at most (the deadlines leave QUICK_GRACE_S for each interrupt),
# against the 360 s asked.


def bench_json(step: str) -> str:
    return f"gpu_{step}.json"


def main(argv: list[str] | None = None) -> int:
    begun = time.time()
    argv = list(sys.argv[1:] if argv is None else argv)
    pytest_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, pytest_args = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(prog="gpu.sh", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("steps", nargs="*", metavar="STEP",
                        help="tests, kernels, model, quick, table or all (default: all, in that order)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the plumbing")
    parser.add_argument("--step-timeout", type=float, default=None,
                        help="seconds a step may run before it is interrupted (default 480, quick 330)")
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
    cleaned: set[str] = set()  # records removed in this invocation (RECORDS)
    rcs = []
    for step in steps:
        started = time.time()
        stamp = datetime.datetime.fromtimestamp(started).isoformat(timespec="seconds")
        timeout = args.step_timeout if args.step_timeout is not None else STEP_TIMEOUT.get(step, 480.0)
        print(f"== gpu.sh {step}{' (dry run)' if args.dry_run else ''} -> {out}", flush=True)
        if step == "table":
            record = _table(out)
        else:
            env = _env(step, args.dry_run, out)
            environment = environment or _environment(env)
            run["environment"] = environment
            device = "cpu" if args.dry_run else "cuda"
            for name in RECORDS.get(step, ()):  # the benchmarks merge cases into their records
                if name not in cleaned:
                    (out / f"{name}_{device}.json").unlink(missing_ok=True)
                    cleaned.add(name)
            if step == "tests":
                record = _tests(out, env, args.dry_run, timeout, pytest_args)
            elif step == "quick":
                def save(partial, step=step):  # (a)'s result kept before (b) starts
                    partial.update(device=run["environment"].get("device"), started=stamp,
                                   seconds=round(time.time() - started, 1))
                    run.setdefault("steps", {})[step] = partial
                    write_json_atomic(out / RUN_FILE, run)

                # First step: its time-out counts from the command's start (the preflight's ~10 s too).
                end = (begun if step == steps[0] else started) + timeout
                record = _quick(out, env, args.dry_run, end, pytest_args, save)
            else:
                record = _benchmarks(step, out, env, timeout, pytest_args)
            record["device"] = run["environment"].get("device")
        record.update(started=stamp, seconds=round(time.time() - started, 1))
        run.setdefault("steps", {})[step] = record
        write_json_atomic(out / RUN_FILE, run)
        if step == "quick":  # its table once more, with the step's final record
            _table(out)
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
        rc = max(rc, _check_dry_run(out, steps, files, pytest_args))
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
    for name in ("TRITON_INTERPRET", "POWERBERT_BENCH_DRY_RUN", "POWERBERT_TEST_GPU", "POWERBERT_BENCH_QUICK"):
        env.pop(name, None)
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               POWERBERT_RESULTS=str(out), PYTHONDONTWRITEBYTECODE="1")
    if step == "tests":
        env["POWERBERT_TEST_GPU"] = "1"  # the GPU run of the suite: compiled kernels, CUDA tensors
    if step == "quick":
        env["POWERBERT_BENCH_QUICK"] = "1"  # test_bench_peers: fp16, B 1, 8, 64, 256 (benchmarks/common.py)
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # tiny models: one thread is fastest
        if step != "tests":
            env.update(POWERBERT_BENCH_DRY_RUN="1", TRITON_INTERPRET="1")
    return env


def _tests_env(env: dict) -> dict:
    """A benchmark step's environment turned into the GPU run of the suite (the quick step's (a))."""
    env = {k: v for k, v in env.items()
           if k not in ("TRITON_INTERPRET", "POWERBERT_BENCH_DRY_RUN", "POWERBERT_BENCH_QUICK")}
    env["POWERBERT_TEST_GPU"] = "1"
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


def _finish(procs: list[subprocess.Popen], deadline: float, grace: float = GRACE_S, tick=None) -> bool:
    """Wait for every process until ``deadline``; then SIGINT the rest (pytest then reports and
    writes its benchmark JSON), SIGKILL after ``grace`` seconds. ``tick`` (if given) is called
    every ``TABLE_EVERY_S`` seconds while waiting. True if any was interrupted."""
    interrupted = False
    for proc in procs:
        while True:
            left = deadline - time.time()
            try:
                proc.wait(timeout=max(0.0, min(left, TABLE_EVERY_S) if tick else left))
                break
            except subprocess.TimeoutExpired:
                if time.time() < deadline:
                    if tick is not None:
                        tick()
                    continue
            interrupted = True
            for sig, wait in ((signal.SIGINT, grace), (signal.SIGKILL, None)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            break
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
    mode = ["--collect-only", "-q"] if dry_run else ["-q", "-rfEs"]
    record = _test_groups(out, env, files, workers, [*mode, *extra], time.time() + timeout, dry_run, "tests")
    record["mode"] = "collect-only" if dry_run else "run"
    return record


def _test_groups(out: Path, env: dict, files: list[Path], workers: int, args: list[str], deadline: float,
                 collect: bool, title: str, grace: float = GRACE_S) -> dict:
    """``files`` over ``workers`` parallel pytest processes (balanced by file size, ~ test count),
    each one's output appended to gpu.log; the counts summed over them."""
    groups: list[list[Path]] = [[] for _ in range(workers)]
    sizes = [0] * workers
    for path in sorted(files, key=lambda p: p.stat().st_size, reverse=True):  # size ~ test count
        i = sizes.index(min(sizes))
        groups[i].append(path)
        sizes[i] += path.stat().st_size
    groups = [group for group in groups if group]
    cpus = os.cpu_count() or 2
    if not collect:
        env = dict(env, OMP_NUM_THREADS=str(max(1, cpus // max(1, len(groups)))))
    with tempfile.TemporaryDirectory() as tmp:
        logs = [open(Path(tmp) / f"group{i}.log", "w+", encoding="utf-8") for i in range(len(groups))]
        procs = [_start(_pytest([*args, *(str(p.relative_to(ROOT)) for p in group)]), env, log)
                 for group, log in zip(groups, logs)]
        timed_out = _finish(procs, deadline, grace)
        results, counts = [], {}
        for i, (group, log, proc) in enumerate(zip(groups, logs, procs)):
            log.seek(0)
            text = log.read()
            log.close()
            names = [p.name for p in group]
            _append_log(out, f"{title} group {i + 1}/{len(groups)} (rc {proc.returncode}): {' '.join(names)}", text)
            group_counts = _summary(text)
            if collect and not group_counts:  # --collect-only -q prints "N tests collected"
                group_counts = {"collected": sum(1 for line in text.splitlines() if "::" in line)}
            for word, n in group_counts.items():
                counts[word] = counts.get(word, 0) + n
            results.append(dict(files=names, rc=_rc(proc), summary=_summary_text(group_counts)))
            print(f"   group {i + 1}: rc {proc.returncode}: {_summary_text(group_counts) or text.strip()[-300:]}")
    rc = max((r["rc"] for r in results), default=0)
    return dict(rc=124 if timed_out else rc, timed_out=timed_out, summary=_summary_text(counts), counts=counts,
                groups=results)


def _benchmarks(step: str, out: Path, env: dict, timeout: float, extra: list[str]) -> dict:
    target = out / bench_json(step)
    target.unlink(missing_ok=True)  # a stale file must not pass for this run's results
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


def _quick(out: Path, env: dict, dry_run: bool, end: float, extra: list[str], save) -> dict:
    """One command: (a) the tests that need CUDA in QUICK_TESTS, (b) the end-to-end benchmark in
    fp16, (c) the table; everything done by ``end`` (the step's start + its time-out).

    (a) runs in parallel processes like the tests step, selected by this module as a pytest plugin
    (``-p benchmarks.gpu``: ``-m gpu`` tests and tests on the ``device`` fixture); the dry run runs
    them too, CUDA hidden, so every one skips and the selection is checked. Its record is saved
    (``save``) before (b). (b) writes each case to ``peers_e2e_<device>.json`` as it finishes and
    its output straight into gpu.log; the table is rendered again every TABLE_EVERY_S seconds.
    No pytest-benchmark JSON: the record holds each case's statistics (the file budget).
    """
    files = [ROOT / f for f in QUICK_TESTS if (ROOT / f).exists()]
    absent = [f for f in QUICK_TESTS if not (ROOT / f).exists()]
    cpus = os.cpu_count() or 2
    room = end - time.time() - 2 * QUICK_GRACE_S - 5  # both parts' interrupts, the table
    tests_deadline = time.time() + max(1.0, min(QUICK_TESTS_S - QUICK_GRACE_S, room / 2))
    if files:
        workers = 1 if dry_run else max(1, min(3, cpus // 4, len(files)))
        tests = _test_groups(out, _tests_env(env), files, workers,
                             ["-p", "benchmarks.gpu", "-q", "-rfEs", *extra], tests_deadline, False,
                             "quick tests", QUICK_GRACE_S)
    else:
        tests = dict(rc=0, timed_out=False, summary="no file", counts={}, groups=[])
    tests.update(absent=absent)
    print(f"   tests: rc {tests['rc']}: {tests['summary']}" + (f"; absent: {', '.join(absent)}" if absent else ""),
          flush=True)
    record = dict(rc=tests["rc"], timed_out=tests["timed_out"], tests=tests, summary=f"tests: {tests['summary']}")
    save(dict(record, summary=record["summary"] + "; benchmarks: running"))

    cmd = _pytest(["-q", "-rfEs", "-s", *QUICK_BENCHMARKS, "--benchmark-only",
                   "--benchmark-columns=min,median,max,rounds", "--benchmark-sort=name", *extra])
    _append_log(out, f"quick benchmarks: {' '.join(cmd[3:])}", "")
    with open(out / LOG_FILE, "a", encoding="utf-8") as log:  # straight to the log: a kill keeps it
        start = log.tell()
        proc = _start(cmd, env, log)
        timed_out = _finish([proc], end - QUICK_GRACE_S - 3, QUICK_GRACE_S, tick=lambda: _table(out, quiet=True))
        log.write(f"\n(rc {proc.returncode})\n")
    with open(out / LOG_FILE, encoding="utf-8") as log:
        log.seek(start)
        text = log.read()
    print("\n".join("   " + line for line in text.strip().splitlines()[-12:]))
    counts = _summary(text)
    bench = dict(rc=124 if timed_out else _rc(proc), timed_out=timed_out, summary=_summary_text(counts),
                 counts=counts, files=QUICK_BENCHMARKS)
    _table(out, quiet=True)  # main renders it once more with this record in gpu_run.json, and says so
    return dict(rc=max(tests["rc"], bench["rc"]), timed_out=tests["timed_out"] or timed_out, tests=tests,
                benchmarks=bench,
                summary=f"tests: {tests['summary'] or '-'}; benchmarks: {bench['summary'] or '-'}")


def _table(out: Path, quiet: bool = False) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("powerbert_bench_table", ROOT / "benchmarks" / "table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text, missing = table.render(out)
    write_text_atomic(out / TABLE_FILE, text)
    if not quiet:
        print(f"   {TABLE_FILE}: {len(text.splitlines())} lines" + (f"; missing: {', '.join(missing)}" if missing else ""))
    return dict(rc=0, missing=missing, summary=f"missing: {', '.join(missing)}" if missing else "")


def _check_dry_run(out: Path, steps: list[str], files: list[str], pytest_args: list[str]) -> int:
    problems = []
    run = _load_json(out / RUN_FILE) or {}
    for step in steps:
        record = run.get("steps", {}).get(step, {})
        if record.get("rc") != 0:
            problems.append(f"step {step} rc {record.get('rc')}")
    text = (out / TABLE_FILE).read_text(encoding="utf-8") if (out / TABLE_FILE).exists() else ""
    if "table" in steps or "quick" in steps:
        if "DRY RUN" not in text:
            problems.append(f"{TABLE_FILE} lacks the DRY RUN marker")
        if set(STEPS) <= set(steps) and run.get("steps", {}).get("table", {}).get("missing"):
            problems.append(f"table: missing {run['steps']['table']['missing']}")
    if "quick" in steps:
        quick = run.get("steps", {}).get("quick", {})
        selected = sum(quick.get("tests", {}).get("counts", {}).get(word, 0) for word in ("passed", "skipped", "failed"))
        narrowed = any(arg.startswith(("-k", "-m")) for arg in pytest_args)  # may select none of them
        if not selected and not narrowed and quick.get("tests", {}).get("absent") != list(QUICK_TESTS):
            problems.append("quick: its tests part selected no test")
        if QUICK_TABLE_MARKER not in text:
            problems.append(f"quick: {TABLE_FILE} lacks {QUICK_TABLE_MARKER!r}")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files in {out} (at most {MAX_FILES})")
    for problem in problems:
        print(f"gpu.sh --dry-run: {problem}", file=sys.stderr)
    return 1 if problems else 0


# ----------------------------------------------------------------------------- pytest plugin


def pytest_collection_modifyitems(config, items):
    """As a pytest plugin (``-p benchmarks.gpu``, the quick step's tests): keep only the tests
    that need CUDA, those marked ``gpu`` and those on the ``device`` fixture (compiled kernels on
    CUDA tensors in the GPU run, tests/conftest.py); interpreter-only tests go too."""
    keep, drop = [], []
    for item in items:
        needs_cuda = item.get_closest_marker("gpu") is not None or "device" in getattr(item, "fixturenames", ())
        (keep if needs_cuda and item.get_closest_marker("interpreter") is None else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


# ----------------------------------------------------------------------------- files


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


if __name__ == "__main__":
    sys.exit(main())
