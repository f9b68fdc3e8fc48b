"""Turn the files of ``benchmarks/gpu.sh`` into one Markdown table.

    python benchmarks/table.py OUT_DIR          (what ``gpu.sh table`` writes to gpu_results.md)
    python benchmarks/table.py results.json     (one pytest-benchmark file)

For every case: the median, sequences per second (``extra_info["sequences"]`` per call over the
median) and the ratio against its baseline, the case of the same group whose ``impl`` the case's
``extra_info["baseline"]`` names: baseline median / this median, so > 1 is faster. The end-to-end
cases of ``test_bench_peers`` (``peers_e2e_<device>.json``, written case by case, and
``gpu_model.json``) get a table of their own: each row's ratio to the strongest stock of its shape
(the fastest row with ``extra_info["stock"]``), named, and the FLOPs ideal against that stock
beside it. Files that are missing or unreadable are listed (with the step that writes them)
instead of failing, only for the steps ``gpu_run.json`` says ran when it says; a dry run
(``gpu.sh --dry-run``) is marked as such at the top.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# file -> the gpu.sh steps that write it (None: any step)
EXPECTED = {
    "gpu_run.json": None,
    "gpu_kernels.json": ("kernels",),
    "gpu_model.json": ("model",),
}
RECORDS = {"model_e2e": ("model",), "families_e2e": ("model",), "peers_e2e": ("model", "quick")}
PEERS = "peers_e2e"  # test_bench_peers' record: rendered by _peers_lines, not _record_lines
PEERS_TITLE = "## End to end against the strongest stock"  # gpu.py's QUICK_TABLE_MARKER
# Stock rows where extra_info lacks "stock" (results written before it was recorded).
STOCK_IMPLS = ("stock-sdpa", "stock-graph", "stock-unpadded", "stock-unpadded-graph")
PEERS_NOTES = ("path", "real_tokens", "attention", "max_abs_diff_vs_stock", "max_abs_diff_vs_eager")
# extra_info shown in the notes column, in this order, when present.
NOTES = ("real_tokens", "device_ms", "ideal_vectors", "attention", "max_abs_diff_vs_stock", "max_abs_diff_vs_eager", "sdpa_backend", "packed_tokens",
         "speedup_vs_eager_ref", "ratio_vs_bytes_floor", "effective_GBps", "paired_speedup_vs_stock-sdpa",
         "paired_speedup_vs_stock-cls-head")
DRY_RUN_BANNER = ("> **DRY RUN**: CPU, tiny shapes, Triton interpreted. This checks that the GPU steps, their "
                  "files and this table work; its numbers are not measurements.")


def _load(path: Path):
    """(data, problem): problem is None, "missing" or "unreadable: ..."."""
    if not path.exists():
        return None, "missing"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as err:
        return None, f"unreadable: {err}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return str(value)


def _environment_lines(env: dict) -> list[str]:
    if not env:
        return []
    device = env.get("device", "unknown")
    details = [env.get("capability"), env.get("memory_gib") and f"{env['memory_gib']} GiB",
               env.get("driver") and f"driver {env['driver']}",
               env.get("cuda_driver_api") and f"driver CUDA API {env['cuda_driver_api']}",
               env.get("torch_cuda") and f"torch built for CUDA {env['torch_cuda']}",
               env.get("cudnn") and f"cuDNN {env['cudnn']}"]
    software = [f"{name} {env[name]}" for name in ("torch", "triton", "transformers", "python") if env.get(name)]
    rows = [("device", device + (f" ({', '.join(d for d in details if d)})" if any(details) else "")),
            ("software", ", ".join(software)),
            ("torch.nn.attention.varlen in this torch", "yes" if env.get("torch_varlen_attn") else "no"),
            ("host", f"{env.get('cpu', '?')}, {env.get('cpu_count', '?')} CPUs, {env.get('platform', '?')}"),
            ("commit", env.get("git_commit") or "unknown")]
    return ["| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]


def _steps_lines(steps: dict) -> list[str]:
    if not steps:
        return []
    lines = ["## Steps", "", "| step | exit | seconds | device | summary |", "|---|---:|---:|---|---|"]
    for name, record in steps.items():
        summary = record.get("summary", "") + (" (interrupted at the step timeout)" if record.get("timed_out") else "")
        lines.append(f"| {name} | {record.get('rc')} | {record.get('seconds', '')} | {record.get('device') or ''} | {summary} |")
    return lines + [""]


def _step_names(steps) -> str:
    return "any step" if steps is None else "gpu.sh " + " or ".join(steps)


def _is_peers(bench: dict) -> bool:
    return bench.get("fullname", "").split("[")[0].endswith("test_bench_peers.py::test_peers")


def _is_stock(info: dict) -> bool:
    return bool(info["stock"]) if "stock" in info else info.get("impl") in STOCK_IMPLS


def _peers_lines(benches: list[dict]) -> list[str]:
    """test_bench_peers' rows, by shape: median, sequences/s, the ratio to the strongest stock
    of the shape (its median / this median: > 1 is faster than every stock measured), which
    stock that is, and the FLOPs ideal against it (patched rows)."""
    if not benches:
        return []
    groups: dict[str, list[dict]] = {}
    for bench in benches:
        groups.setdefault(bench.get("group") or "ungrouped", []).append(bench)
    lines = [PEERS_TITLE, "",
             "ratio: the strongest stock's median / this median (> 1: faster than the fastest stock of the shape). "
             "FLOPs ideal: stock's multiply-adds over the patched model's (§6), against that stock (padded to the "
             "batch's longest, or real tokens only for stock-unpadded); vector ideal: vectors processed against "
             "stock padded to the batch's longest.", "",
             "| shape | case | median ms | sequences/s | vs strongest stock | strongest stock | FLOPs ideal | "
             "vector ideal | rounds | notes |",
             "|---|---|---:|---:|---:|---|---:|---:|---:|---|"]
    for group, rows in groups.items():
        stocks = {b["extra_info"]["impl"]: b["stats"]["median"] for b in rows
                  if _is_stock(b.get("extra_info", {})) and b["stats"]["median"] > 0}
        strongest = min(stocks, key=stocks.get) if stocks else None
        shape = group.removeprefix("bert e2e ")
        for i, bench in enumerate(rows):
            info = bench.get("extra_info", {})
            median = bench["stats"]["median"]
            sequences = info.get("sequences")
            rate = f"{sequences / median:,.0f}" if sequences and median > 0 else "-"
            ratio = f"{stocks[strongest] / median:.2f}x" if strongest and median > 0 else "-"
            key = "ideal_flops_vs_unpadded" if (strongest or "").startswith("stock-unpadded") else "ideal_flops"
            flops = f"{info[key]:.2f}x" if info.get(key) is not None and not _is_stock(info) else "-"
            vectors = f"{info['ideal_vectors']:.2f}x" if info.get("ideal_vectors") is not None else "-"
            notes = "; ".join(f"{k} {_fmt(info[k])}" for k in PEERS_NOTES if info.get(k) is not None)
            lines.append(f"| {shape if i == 0 else ''} | {info.get('impl', bench['name'])} | {1e3 * median:.3f} | "
                         f"{rate} | {ratio} | {strongest or '(no stock row)'} | {flops} | {vectors} | "
                         f"{bench['stats'].get('rounds', '')} | {notes} |")
    return lines + [""]


def _benchmark_lines(title: str, data: dict) -> list[str]:
    """One table per benchmark function; rows grouped by pytest-benchmark group."""
    by_function: dict[str, dict[str, list]] = {}
    for bench in data.get("benchmarks", []):
        function = bench.get("fullname", bench["name"]).split("[")[0]
        by_function.setdefault(function, {}).setdefault(bench.get("group") or "ungrouped", []).append(bench)
    lines = [f"## {title}", ""]
    if not by_function:
        return lines + ["(no benchmark in this file: every case failed or was skipped, see gpu.log)", ""]
    for function, groups in by_function.items():
        lines += [f"### {function}", "",
                  "ratio: the baseline's median / this median (> 1: faster than the baseline)", "",
                  "| group | case | median ms | sequences/s | ratio | vs | notes |", "|---|---|---:|---:|---:|---|---|"]
        for group, benches in groups.items():
            medians = {b.get("extra_info", {}).get("impl", b["name"]): b["stats"]["median"] for b in benches}
            first = True
            for bench in benches:
                info = bench.get("extra_info", {})
                median = bench["stats"]["median"]
                impl = info.get("impl", bench["name"])
                sequences = info.get("sequences")
                rate = f"{sequences / median:,.0f}" if sequences and median > 0 else "-"
                baseline = info.get("baseline")
                if baseline in medians and median > 0:
                    ratio = f"{medians[baseline] / median:.2f}x"
                else:
                    ratio = "-" if baseline is None else "(baseline missing)"
                notes = "; ".join(f"{k} {_fmt(info[k])}" for k in NOTES if info.get(k) is not None)
                lines.append(f"| {group if first else ''} | {impl} | {1e3 * median:.3f} | {rate} | {ratio} | "
                             f"{baseline or ''} | {notes} |")
                first = False
        lines.append("")
    return lines


def _record_lines(out: Path, ran: set | None = None) -> tuple[list[str], list[str]]:
    """The model benchmarks' speedups beside their ideals (model_e2e_*.json, families_e2e_*.json)."""
    lines, missing = [], []
    for prefix, steps in RECORDS.items():
        paths = sorted(out.glob(f"{prefix}_*.json"))
        if not paths and (ran is None or ran & set(steps)):
            missing.append(f"{prefix}_<device>.json ({_step_names(steps)})")
        for path in paths:
            record, problem = _load(path)
            if problem:
                missing.append(f"{path.name} ({problem})")
                continue
            if prefix == PEERS:
                continue  # _peers_lines
            lines += [f"## {path.name}: speedup beside the ideal ({record.get('device', '?')}, {record.get('dtype', '?')})", ""]
            if prefix == "model_e2e":
                lines += ["| case | patched | baseline | patched ms | baseline ms | speedup | paired | vector ideal | FLOPs ideal |",
                          "|---|---|---|---:|---:|---:|---:|---:|---:|"]
                for case, body in record.get("cases", {}).items():
                    for r in body.get("rows", []):
                        paired = f"{r['paired_speedup']:.2f}x" if r.get("paired_speedup") else "-"
                        lines.append(f"| {case} | {r['patched']} | {r['baseline']} | {r['patched_ms']:.2f} | "
                                     f"{r['baseline_ms']:.2f} | {r['speedup']:.2f}x | {paired} | "
                                     f"{r['ideal_vector_ratio']:.2f}x | {r['ideal_flops']:.2f}x |")
            else:
                lines += [f"batch {record.get('batch')}, N {record.get('length')}", "",
                          "| family | stock ms | patched ms | speedup | paired | vector ideal | FLOPs ideal |",
                          "|---|---:|---:|---:|---:|---:|---:|"]
                for r in record.get("rows", []):
                    lines.append(f"| {r['family']} | {r['stock_ms']:.2f} | {r['patched_ms']:.2f} | {r['speedup']:.2f}x | "
                                 f"{r['speedup_paired']:.2f}x | {r['ideal_vector_ratio']:.2f}x | {r['ideal_flops']:.2f}x |")
            lines.append("")
    return lines, missing


def render(out: Path) -> tuple[str, list[str]]:
    """Markdown for the gpu.sh files in ``out``; returns (text, the files missing or unreadable)."""
    out = Path(out)
    run, problem = _load(out / "gpu_run.json")
    run = run or {}
    # The steps that ran (gpu_run.json): files of other steps are not missing. Unknown: expect all.
    ran = {s for s in run.get("steps", {}) if s != "table"} or None
    loaded, missing = {}, []
    if problem:
        missing.append(f"gpu_run.json ({_step_names(None)}{'' if problem == 'missing' else ', ' + problem})")
    for name, steps in EXPECTED.items():
        if name == "gpu_run.json":
            continue
        data, problem = _load(out / name)
        loaded[name] = data
        if problem and (ran is None or ran & set(steps) or problem != "missing"):
            missing.append(f"{name} ({_step_names(steps)}{'' if problem == 'missing' else ', ' + problem})")
    # test_bench_peers: its record (case by case) over gpu_model.json's entries of the same case.
    peers = {b["name"]: b for b in (loaded["gpu_model.json"] or {}).get("benchmarks", []) if _is_peers(b)}
    for path in sorted(out.glob(f"{PEERS}_*.json")):
        record, _ = _load(path)
        peers.update((b["name"], b) for b in (record or {}).get("benchmarks", []) if isinstance(b, dict) and "name" in b)
    benchmarks = [b for name in ("gpu_kernels.json", "gpu_model.json") for b in (loaded[name] or {}).get("benchmarks", [])]
    dry_run = run.get("dry_run") or any(b.get("extra_info", {}).get("dry_run") for b in [*benchmarks, *peers.values()])
    env = run.get("environment") or {}
    title = "# GPU benchmark results" + (" (DRY RUN)" if dry_run else f": {env.get('device', 'unknown device')}")
    lines = [title, ""]
    if dry_run:
        lines += [DRY_RUN_BANNER, ""]
    lines += _environment_lines(env)
    records, records_missing = _record_lines(out, ran)
    missing += records_missing
    if missing:
        lines += ["**Missing:** " + "; ".join(missing), ""]
    lines += _steps_lines(run.get("steps", {}))
    lines += _peers_lines(list(peers.values()))
    for name, title in (("gpu_kernels.json", "Kernels"), ("gpu_model.json", "Models")):
        if loaded[name] is not None:
            data = dict(loaded[name], benchmarks=[b for b in loaded[name].get("benchmarks", []) if not _is_peers(b)])
            lines += _benchmark_lines(title, data)
    lines += records
    return "\n".join(lines).rstrip() + "\n", missing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="a gpu.sh output folder, or one pytest-benchmark JSON file")
    args = parser.parse_args()
    path = Path(args.path)
    if path.is_dir():
        text, missing = render(path)
        print(text, end="")
        if missing:
            print(f"table.py: missing {', '.join(missing)}", file=sys.stderr)
        return
    data, problem = _load(path)
    if problem:
        sys.exit(f"table.py: {path} is {problem}")
    print("\n".join(_benchmark_lines(path.name, data)))


if __name__ == "__main__":
    main()
