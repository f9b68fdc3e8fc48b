"""``python -m benchmarks.studies.reproduce.check RESULTS_DIR [NAME]``: every expected file and key exists.

NAME is the budget's ``results_name`` (``reproduce``, the default, or ``reproduce_mpnet``).

Exits 1 naming what is missing (the quick mode's test-like check, run by ``make reproduce-quick``).
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

TOP = ("command", "python_command", "commit", "machine", "budget", "wall_s", "tasks")
MACHINE = ("cpu", "cores", "torch_threads", "torch", "transformers")
TASK = ("title", "spec", "splits", "timing_setup", "baseline", "powerbert", "goal")
BASELINE = ("test_accuracy", "time_padded_s", "time_dynamic_s", "padded", "dynamic", "dev_best")
TIMED = ("test_accuracy", "delta_points", "time_s", "speedup_vs_padded", "speedup_vs_dynamic")
PROPORTIONAL = ("lambda", "configuration", "ideal_vs_dynamic", "flops_ideal_vs_dynamic", "test_accuracy",
                "speedup_vs_dynamic", "padded", "dynamic")
HEADLINE = ("delta_points", "speedup_vs_dynamic", "ideal_vs_dynamic", "flops_ideal_vs_dynamic")
POWER = ("lambda", "configuration", "vectors_kept", "vectors_total", "vector_ratio", "flops_ideal", "test_accuracy",
         "speedup_vs_padded", "speedup_vs_dynamic", "padded", "dynamic", "ablation")


def problems(out: Path, stem: str = "reproduce") -> list[str]:
    found = []
    result_path = out / f"{stem}.json"
    for name in (f"{stem}.json", f"{stem}.md", f"{stem}_splits.json"):
        if not (out / name).is_file() or (out / name).stat().st_size == 0:
            found.append(f"missing or empty: {out / name}")
    if not result_path.is_file():
        return found
    result = json.loads(result_path.read_text())
    found += [f"{stem}.json: no key {k!r}" for k in TOP if k not in result]
    found += [f"machine: no key {k!r}" for k in MACHINE if k not in result.get("machine", {})]
    budget = result.get("budget", {})
    expected_tasks = [t["name"] for t in budget.get("tasks", [])]
    splits = json.loads((out / f"{stem}_splits.json").read_text()) if (out / f"{stem}_splits.json").is_file() else {}
    markdown = (out / f"{stem}.md").read_text() if (out / f"{stem}.md").is_file() else ""
    for name in expected_tasks:
        t = result.get("tasks", {}).get(name)
        if t is None:
            found.append(f"tasks: no task {name!r}")
            continue
        found += [f"{name}: no key {k!r}" for k in TASK if k not in t]
        found += [f"{name}.baseline: no key {k!r}" for k in BASELINE if k not in t.get("baseline", {})]
        for split in ("train", "dev", "test"):
            if not t.get("splits", {}).get(split, {}).get("size"):
                found.append(f"{name}.splits.{split}: no size")
            if not splits.get(name, {}).get(split):
                found.append(f"{stem}_splits.json: no ids for {name}.{split}")
        spec = next(s for s in budget["tasks"] if s["name"] == name)
        points = t.get("powerbert", [])
        if len(points) != len(spec["targets"]):
            found.append(f"{name}: {len(points)} PoWER-BERT points, expected {len(spec['targets'])}")
        for i, p in enumerate(points):
            found += [f"{name}.powerbert[{i}]: no key {k!r}" for k in POWER if k not in p]
            for batching in ("padded", "dynamic"):
                found += [f"{name}.powerbert[{i}].{batching}: no key {k!r}" for k in TIMED if k not in p.get(batching, {})]
            for selection in budget.get("ablations", []):
                e = p.get("ablation", {}).get(selection)
                if e is None:
                    found.append(f"{name}.powerbert[{i}].ablation: no {selection!r}")
                    continue
                found += [f"{name}.powerbert[{i}].ablation.{selection}: no key {k!r}" for k in TIMED if k not in e]
            for k in ("test_accuracy", "speedup_vs_padded"):
                v = p.get(k)
                if not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    found.append(f"{name}.powerbert[{i}].{k} = {v!r} is not a positive number")
        proportional = t.get("proportional", [])
        if len(proportional) != len(spec.get("proportional_targets", [])):
            found.append(f"{name}: {len(proportional)} proportional points, expected {len(spec['proportional_targets'])}")
        for i, p in enumerate(proportional):
            found += [f"{name}.proportional[{i}]: no key {k!r}" for k in PROPORTIONAL if k not in p]
            for batching in ("padded", "dynamic"):
                found += [f"{name}.proportional[{i}].{batching}: no key {k!r}" for k in TIMED
                          if k not in p.get(batching, {})]
        if spec.get("headline_seeds"):
            h = t.get("headline") or {}
            if h.get("seeds") != [spec["seed"], *spec["headline_seeds"]]:
                found.append(f"{name}.headline: seeds {h.get('seeds')!r}, expected {[spec['seed'], *spec['headline_seeds']]}")
            rows = h.get("rows", {})
            if spec.get("headline_modes", "each") == "best":
                # the one mode whose choice is fastest within 1 point (experiment.choose_headline)
                modes = ["baseline", *[m for m in ("fixed", "proportional") if m in rows][:1]]
                if len(modes) == 1:
                    found.append(f"{name}.headline: no fixed or proportional row (headline_modes 'best')")
            else:
                modes = ["baseline", "fixed", "proportional"]
            for mode in modes:
                row = rows.get(mode)
                if row is None or len(row.get("per_seed", [])) != len(h.get("seeds") or []):
                    found.append(f"{name}.headline: no {mode} row with one entry per seed")
                elif not all(k in row for k in ("test_accuracy",) + (() if mode == "baseline" else HEADLINE)):
                    found.append(f"{name}.headline.{mode}: missing one of {HEADLINE}")
            if "goal" not in h or "Headline rows over" not in markdown:
                found.append(f"{name}.headline: no goal, or no headline section in {stem}.md")
        png = out / f"{stem}_{name}.png"
        if not png.is_file() or png.read_bytes()[:8] != b"\x89PNG\r\n\x1a\n":
            found.append(f"missing or not a PNG: {png}")
        if f"{stem}_{name}.png" not in markdown or t.get("title", "?") not in markdown:
            found.append(f"{stem}.md: no section or plot for {name}")
    return found


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) not in (1, 2):
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    found = problems(out, *argv[1:])
    for problem in found:
        print(f"FAIL {problem}", file=sys.stderr)
    if not found:
        print(f"OK: every expected file and key is in {out}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
