"""Train one target of ``make reproduce``'s cache, and nothing else.

    python -m benchmarks.studies.reproduce.train_target --task movie_reviews --target 4.5

Fine-tune (shared by every target), search and re-train one target of the full budget, in the very
folders and with the very spec ``make reproduce`` uses (``experiment``), so a later ``make
reproduce`` resumes from them and a study that needs a reproduce model (the int8 accuracy of
issue 21) does not wait for the whole three-hour run. Every step is skipped when cached.
Prints the two model folders (fine-tuned baseline, re-trained PoWER-BERT model).
"""
from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import torch

from .budget import FULL


def main(argv=None) -> int:
    specs = {t.name: t for t in FULL.tasks}
    parser = argparse.ArgumentParser(prog="python -m benchmarks.studies.reproduce.train_target",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(specs), required=True)
    parser.add_argument("--target", type=float, required=True, help="one of the task's target vector ratios")
    parser.add_argument("--mode", choices=("fixed", "proportional"), default="fixed")
    parser.add_argument("--work", type=Path, default=Path("work/reproduce"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    spec = specs[args.task]
    targets = spec.targets if args.mode == "fixed" else spec.proportional_targets
    if args.target not in targets:
        parser.error(f"--target {args.target:g}: {spec.name}'s {args.mode} targets are {[f'{t:g}' for t in targets]}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    from powerbert.training import steps as training_steps

    from .. import data as reproduce_data
    from . import experiment

    task_dir = args.work / spec.name
    experiment.check_spec(task_dir, spec)
    reproduce_data.prepare(spec, args.data_dir, task_dir / "data")
    base = experiment.base_config(spec, task_dir, args.data_dir)
    (task_dir / "base").mkdir(parents=True, exist_ok=True)
    training_steps.finetune(base)
    cfg = experiment.target_config(base, task_dir, args.target, args.mode)
    training_steps.search(cfg)
    training_steps.retrain(cfg)
    print(task_dir / "base" / "finetune")
    print(Path(cfg.output) / "retrain")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
