"""``python -m benchmarks.studies.reproduce [--budget full|quick] --work DIR --out DIR``: see ``__init__``."""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks import common
from powerbert.inputs.files import write_json_atomic


class WallClock:
    """This invocation's wall time, added to the work folder's total (``wall.json``).

    ``tick()`` after every finished step rewrites this invocation's entry, so an interrupted
    invocation still counts, up to its last finished step, in the total of the resumed run.
    """

    def __init__(self, work: Path):
        self.path = work / "wall.json"
        self.start = time.perf_counter()
        saved = json.loads(self.path.read_text()) if self.path.is_file() else {"invocations": []}
        self.previous = saved["invocations"]

    def tick(self) -> dict:
        this_run = time.perf_counter() - self.start
        invocations = self.previous + [round(this_run, 1)]
        write_json_atomic(self.path, {"invocations": invocations}, indent=None)
        return {"total_s": sum(invocations), "invocations": len(invocations), "this_invocation_s": this_run,
                "per_invocation_s": invocations}


def main(argv=None) -> int:
    from .budget import BUDGETS

    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.reproduce", description=__doc__)
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--work", type=Path, default=Path("work/reproduce"), help="cache of finished steps (ignored)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="results folder")
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="where the PyPI data packages go")
    parser.add_argument("--tasks", nargs="*", default=None, help="a subset of the budget's tasks")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--command", default=None, help="the command to record (e.g. 'make reproduce')")
    parser.add_argument("--train-only", action="store_true",
                        help="train every model and stop before the timed passes (they, and the results, come "
                             "from a later invocation without this flag, on a quiet machine)")
    args = parser.parse_args(argv)

    budget = BUDGETS[args.budget]
    tasks = [t for t in budget.tasks if args.tasks is None or t.name in args.tasks]
    if not tasks:
        raise SystemExit(f"--tasks {args.tasks}: none of {[t.name for t in budget.tasks]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    args.work.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s",
                        handlers=[logging.StreamHandler(), logging.FileHandler(args.work / "run.log")])
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    log = logging.getLogger("powerbert.reproduce")
    log.info("budget %s, tasks %s, work %s, out %s, %d threads", budget.name, [t.name for t in tasks], args.work,
             args.out, torch.get_num_threads())

    from . import experiment, report

    clock = WallClock(args.work)
    raws = []
    for spec in tasks:
        task_start = time.perf_counter()
        raws.append(experiment.run_task(spec, budget, args.data_dir, args.work, tick=clock.tick,
                                        timing=not args.train_only))
        log.info("%s: done in %.1f min (this invocation)", spec.name, (time.perf_counter() - task_start) / 60)
    if args.train_only:
        log.info("every model is trained (%.1f min over %d invocation(s)); run again without --train-only, on a "
                 "quiet machine, for the timed passes and the results", clock.tick()["total_s"] / 60,
                 clock.tick()["invocations"])
        return 0
    import transformers

    result = {
        "command": args.command or f"python -m benchmarks.studies.reproduce --budget {budget.name}",
        "python_command": shlex.join(["python", "-m", "benchmarks.studies.reproduce", *(sys.argv[1:] if argv is None else argv)]),
        "commit": common.commit(),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"cpu": common.cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "platform": platform.platform()},
        "budget": budget.as_dict(),
        "wall_s": clock.tick(),
        "tasks": {raw["spec"].name: report.task_result(raw, args.work, budget.ablations) for raw in raws},
    }
    for path in report.write(result, raws, args.out):
        log.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
