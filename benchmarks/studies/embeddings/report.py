"""``embeddings.json``, ``embeddings.md`` and ``embeddings.png`` from the benchmark's results."""
from __future__ import annotations

import json
from pathlib import Path

TITLES = {"movie_reviews": "movie reviews (polarity)", "nyt_editorials": "NYT editorial snippets (polarity)",
          "tweets": "tweets (polarity)", "bbc_news": "BBC News (5 topics)"}


def _rows(task: dict) -> list[dict]:
    rows = [r for key, r in task["rows"].items() if key != "stock"]
    return sorted(rows, key=lambda r: r["vector_ideal"])


def _timing(row: dict) -> str:
    timing = row.get("timing")
    return "" if timing is None else f"{timing['speedup']:.2f}x"


def markdown(results: dict) -> str:
    setup = results["setup"]
    lines = ["# Sentence embeddings, calibrated without labels: speed vs quality", "",
             f"Model: {setup['model']}. {setup['device']}, {setup['threads']} thread"
             f"{'s' if setup['threads'] != 1 else ''}, {setup['dtype']}, "
             f"batch {setup['batch_size']}; torch {setup['versions']['torch']}, transformers "
             f"{setup['versions']['transformers']}, sentence-transformers "
             f"{setup['versions']['sentence_transformers']}; commit {setup['commit']}, {setup['date']}."
             + (f" {setup['machine_note']}" if setup["machine_note"] else ""),
             "",
             "Per task: `powerbert.calibrate.search` on the calibration texts (cosine to stock, no labels), the "
             f"fastest configuration (by vectors processed) reaching each threshold C in {setup['thresholds']}, then "
             "on a disjoint evaluation split: mean / 5th-percentile cosine of each text's embedding to its stock "
             f"embedding, and leave-one-out {setup['k']}-NN accuracy (cosine) with the embeddings, against stock "
             "`encode` on the same texts (labels used only here). Δ k-NN: patched minus stock, ± its paired "
             "standard error. Ideal speedups against stock `encode` (length-sorted, dynamically padded batches): "
             "vectors processed (§8), FLOPs (§6), and vectors in the padded layout the patched model runs (each "
             "layer's batch padded to its largest keep count: `encode` sorts by characters, so batches of short "
             "texts carry token padding that the first two count as saved and the patched model does not save; "
             "the layout ideal is the bound a measured speedup stays under). The plot's x axis is the layout "
             "ideal.", ""]
    timed = any("timing" in row for task in results["tasks"].values() for row in task["rows"].values())
    for name, task in results["tasks"].items():
        stock = task["rows"]["stock"]
        lines += [f"## {TITLES.get(name, name)}", "",
                  f"{task['examples']} examples; {task['calibration_texts']} calibration texts, "
                  f"{task['evaluation_texts']} evaluation texts (mean {task['eval_mean_tokens']:.1f} tokens); "
                  f"stock k-NN accuracy **{stock['knn_accuracy']:.2f}**.", "",
                  "| C | configuration | calib. cosine | cosine (mean / p5) | k-NN acc | Δ k-NN | vector ideal "
                  "| FLOPs ideal | layout ideal |" + (" measured |" if timed else ""),
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if timed else "")]
        for row in _rows(task):
            cs = ", ".join(f"{c:g}" for c in sorted(row["thresholds"], reverse=True))
            config = "(" + ", ".join(f"{f:.2f}" for f in row["retention"]) + ")"
            lines.append(f"| {cs} | {config} | {row['calibration_mean']:.3f} | {row['cosine_mean']:.3f} / "
                         f"{row['cosine_p05']:.3f} | {row['knn_accuracy']:.2f} | {row['knn_delta']:+.2f} ± "
                         f"{row['knn_delta_se']:.2f} | {row['vector_ideal']:.2f}x | {row['flops_ideal']:.2f}x | "
                         f"{row['layout_ideal']:.2f}x |" + (f" {_timing(row)} |" if timed else ""))
        keep_all = task.get("keep_all_timing")
        if keep_all:
            lines.append(f"\nKeep-all patched (every vector kept: the patched attention alone) vs stock `encode`: "
                         f"{keep_all['speedup']:.2f}x on the same texts; a row's measured speedup over it is what "
                         f"elimination adds.")
        missing = [c for c, r in task["chosen"].items() if r is None]
        if missing:
            lines.append(f"\nNo configuration of the family reached C = {', '.join(missing)} on the calibration texts.")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 8), sharex=True)
    for name, task in results["tasks"].items():
        rows = _rows(task)
        x = [1.0] + [r["layout_ideal"] for r in rows]
        line = top.errorbar(x, [0.0] + [r["knn_delta"] for r in rows],
                            yerr=[0.0] + [1.96 * r["knn_delta_se"] for r in rows], marker="o", capsize=3,
                            label=f"{TITLES.get(name, name)} (stock {task['rows']['stock']['knn_accuracy']:.1f})")
        bottom.plot(x, [1.0] + [r["cosine_mean"] for r in rows], marker="o", color=line[0].get_color())
    top.axhline(-1.0, color="grey", linestyle=":", linewidth=1)
    top.axhline(0.0, color="black", linewidth=0.5)
    top.set_ylabel("k-NN accuracy − stock (points, ±95%)")
    top.legend(fontsize=8)
    bottom.set_ylabel("mean cosine to stock embedding")
    bottom.set_xlabel("ideal speedup vs stock encode (vectors in the padded layout the patched model runs)")
    top.set_title(f"{results['setup'].get('short_name', 'MiniLM-L6')} SentenceTransformer, calibrated "
                  "configurations (no labels)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(results: dict, out: Path, name: str = "embeddings") -> None:
    """``<name>.json``, ``.md`` and ``.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / f"{name}.md").write_text(markdown(results))
    plot(results, out / f"{name}.png")


if __name__ == "__main__":  # python -m benchmarks.studies.embeddings.report RESULTS.json: rewrite the .md and .png
    import sys

    source = Path(sys.argv[1])
    write_report(json.loads(source.read_text()), source.parent, source.stem)
