"""What ``powerbert calibrate`` writes: the patched model folder and its report.

``save`` writes ``calibration.json`` (the report of ``powerbert.calibrate.calibrate``, with the
list of files it wrote) and ``calibration.md`` (``markdown``: the same as a short page) to the
output folder, and the model patched with the chosen configuration when one was found. Each file
is written atomically; a rerun removes what the previous run listed, so no stale model stays.
"""
from __future__ import annotations

import json
from pathlib import Path

from powerbert.calibrate import Calibration
from powerbert.front_door import unpatch
from powerbert.inputs.files import write_json_atomic, write_text_atomic
from powerbert.sentence_models import is_sentence_model

REPORT_JSON = "calibration.json"
REPORT_MD = "calibration.md"


def save(calibration: Calibration, model, output, tokenizer=None) -> Path:
    """Write ``calibration.json`` and ``calibration.md`` to ``output``, and, when a configuration was
    found, the model patched with it (``model.save`` for a SentenceTransformer, ``save_pretrained``
    and the tokenizer for a classifier). ``model`` is left unpatched.

    A rerun into a folder an earlier ``save`` wrote first removes the files that run listed in its
    report (``files``), so a rerun that finds no configuration leaves no stale model behind; any
    other file in the folder is kept.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    _remove_previous(output)
    kept = {p for p in output.rglob("*") if p.is_file()}  # the user's own files
    if calibration.retention is not None:
        calibration.apply(model)
        try:
            if is_sentence_model(model):
                model.save(str(output))
            else:
                model.save_pretrained(output)
                if tokenizer is not None:
                    tokenizer.save_pretrained(output)
        finally:
            unpatch(model)
    written = sorted(p.relative_to(output).as_posix() for p in output.rglob("*") if p.is_file() and p not in kept)
    report = dict(calibration.report, files=sorted(set(written) | {REPORT_JSON, REPORT_MD}))
    write_json_atomic(output / REPORT_JSON, report, indent=1)
    write_text_atomic(output / REPORT_MD, markdown(report))
    return output


def _remove_previous(output: Path) -> None:
    """Delete the files an earlier ``save`` listed in ``output``'s report, then folders left empty."""
    try:
        listed = json.loads((output / REPORT_JSON).read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return
    root = output.resolve()
    for name in listed:
        path = (output / str(name)).resolve()
        if root in path.parents and path.is_file():  # never outside the folder
            path.unlink()
    for folder in sorted((p for p in output.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()


def _fmt(value, digits=4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(report: dict) -> str:
    """The report as a short Markdown page."""
    metric, threshold = report["metric"], report["min_value"]
    lines = [f"# powerbert calibrate: mean {metric} >= {threshold:g}", ""]
    lines += [f"**Warning:** {warning}." for warning in report.get("warnings", [])] + (
        [""] if report.get("warnings") else [])
    chosen = report["chosen"]
    if chosen is None:
        best = max((r for r in report["candidates"] if "calibration_mean" in r),
                   key=lambda r: r["calibration_mean"], default=None)
        lines += ["No configuration of the family reached the threshold on the calibration texts."
                  + ("" if best is None else f" The closest: {best['retention']} (mean {best['calibration_mean']:.4f},"
                                             f" ideal {best['vector_ideal']:.2f}x)."), ""]
    else:
        lines += [f"Chosen: `{chosen['retention']}`" + (f", retention_min {report['retention_min']}"
                                                          if report["retention_min"] else ""), ""]
        hold = chosen.get("holdout")
        if hold is not None:
            q = hold["quantiles"]
            lines += [f"Held-out texts ({hold['texts']}, mean {chosen['holdout_mean_tokens']:.1f} tokens): mean "
                      f"{metric} {hold['mean']:.4f}, min {hold['min']:.4f}, p01 {q['p01']:.4f}, p05 {q['p05']:.4f}, "
                      f"median {q['p50']:.4f}; {hold['share_below_threshold'] * 100:.1f}% of texts below "
                      f"{threshold:g}.", "",
                      f"Ideal speedup against stock with dynamic padding (texts batched as `encode` batches them, "
                      f"{report['batch_size']} a batch): {chosen['vector_ideal']:.2f}x by vectors processed, "
                      f"{chosen['flops_ideal']:.2f}x by the FLOPs model (powerbert/ALGORITHM.md §6, §8), "
                      f"{chosen['layout_ideal']:.2f}x by vectors in the padded layout the patched model runs "
                      f"(each batch padded to its largest keep count).", ""]
        timing = chosen.get("timing")
        if timing is not None:
            threads = f"{timing['threads']} thread" + ("s" if timing["threads"] != 1 else "")
            lines += [f"Measured on the held-out texts ({timing['device']}, {threads}, {timing['rounds']} alternated "
                      f"rounds of stock and patched `encode`): stock {timing['stock_median_s'] * 1000:.0f} ms, "
                      f"patched {timing['patched_median_s'] * 1000:.0f} ms: **{timing['speedup']:.2f}x** "
                      f"(paired {timing['paired']:.2f}x). Timings taken while other work runs are noisy: "
                      f"re-measure on a quiet machine.", ""]
    lines += [f"Search: {report['calibration_texts']} calibration texts (mean {report['calibration_mean_tokens']:.1f}"
              f" tokens), {report['evaluated']} of {len(report['candidates'])} candidates evaluated, family "
              f"`{report['family']}`, shares {report['shares']}.", "",
              f"| configuration | vector ideal | FLOPs ideal | calibration {metric} | held-out {metric} | status |",
              "|---|---:|---:|---:|---:|---|"]
    for r in sorted(report["candidates"], key=lambda r: -r["vector_ideal"]):
        lines.append(f"| {r['retention']} | {r['vector_ideal']:.2f}x | {r['flops_ideal']:.2f}x | "
                     f"{_fmt(r.get('calibration_mean'))} | {_fmt(r.get('holdout_mean'))} | {r['status']} |")
    return "\n".join(lines) + "\n"
