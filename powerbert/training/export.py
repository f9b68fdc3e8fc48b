"""The end of a pipeline run and the ``evaluate`` command: ``export`` and ``evaluate``.

``export`` copies the re-trained model to ``<output>/`` and writes ``metrics.json``: the learned
configuration, its ideals (``powerbert.elimination.retention``: vectors kept, vector ratio and
§6 FLOPs ideal at N, and the retrain step's ratio over the dev set's real lengths), the per-step
dev history and wall times, and the settings the steps' cache keys recorded. ``evaluate`` reports
the dev metric of a saved model on a data file, patched when its config holds a configuration.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

from powerbert.elimination.hard_extract import CONFIG_KEY
from powerbert.elimination.retention import cost_model_sizes, flops_ideal, is_proportional, vector_counts, vector_ratio
from powerbert.front_door import patch
from powerbert.inputs import examples as D
from powerbert.inputs.checks import check_int
from powerbert.inputs.files import write_json_atomic
from powerbert.inputs.model_folder import (MAX_LENGTH_KEY, check_model_dir, default_max_length, label_space_from_config,
                                           load_model, load_tokenizer, read_model_config)
from powerbert.training.config import STEPS, PipelineConfig
from powerbert.training.distributed import is_main_process, wait_for_everyone
from powerbert.training.step_cache import METRICS, exported_files, need_done, read_key, step_folder
from powerbert.training.task import evaluate_model


def export(cfg: PipelineConfig, records: dict | None = None) -> dict:
    """Copy the re-trained model to ``cfg.output`` and write ``metrics.json``; returns the metrics.

    ``metrics.json`` goes first (and comes back last), so it never sits beside a model it does
    not describe; its ``settings`` are those recorded by the steps (their keys), not ``cfg``.
    In a data-parallel run rank 0 writes, and the other ranks return what it wrote.
    """
    output = Path(cfg.output)
    if not is_main_process():
        wait_for_everyone()
        return json.loads((output / METRICS).read_text())
    metrics = _export(cfg, output, records or {step: need_done(cfg, step) for step in STEPS})
    wait_for_everyone()
    return metrics


def _export(cfg: PipelineConfig, output: Path, records: dict) -> dict:
    (output / METRICS).unlink(missing_ok=True)
    retrained = step_folder(cfg, "retrain")
    for item in exported_files(retrained):
        shutil.copy2(item, output / item.name)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(output, local_files_only=True)
    configuration = list(getattr(config, CONFIG_KEY))
    n = getattr(config, MAX_LENGTH_KEY, None) or cfg.max_length
    hidden, intermediate = cost_model_sizes(config)

    def step_summary(record):
        return {
            "dev": [{"epoch": h["epoch"], **{k: h["dev"][k] for k in ("metric", "value", "loss")},
                     **({"configuration": h["configuration"]} if "configuration" in h else {})}
                    for h in record["history"]],
            "best": record.get("best"),
            "wall_s": round(record["wall_s"], 2),
            **({"lambda_search_s": round(record["lambda_search_s"], 2)} if record.get("lambda_search_s") else {}),
        }

    keys = {step: read_key(step_folder(cfg, step)) for step in STEPS}
    if all(key is not None for key in keys.values()):
        # one value per setting; {step: value} where the steps were run with different ones
        per_step: dict[str, dict] = {}
        for step, key in keys.items():
            for name, value in {**key["settings"], **key["files"]}.items():
                per_step.setdefault(name, {})[step] = value
        settings = {name: next(iter(values.values())) if len({json.dumps(v, sort_keys=True)
                                                              for v in values.values()}) == 1 else values
                    for name, values in per_step.items()}
    else:  # step folders from before keys were recorded: the settings of this call, unverified
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("progress", "overwrite")}
        settings["unverified"] = [step for step, key in keys.items() if key is None]
    proportional = is_proportional(configuration)
    kept, total = vector_counts(configuration, n)
    metrics = {
        "configuration": configuration,
        "retention_mode": "proportional" if proportional else "fixed",
        "max_length": n,
        "num_layers": len(configuration),
        # at N: a sequence of N real tokens (for fixed mode also any batch padded to N)
        "vectors_kept": kept,
        "vectors_total": total,
        "vector_ratio": vector_ratio(configuration, n),
        "flops_ideal": flops_ideal(configuration, n, hidden, intermediate),
        **({"mean_kept_share": round(sum(configuration) / len(configuration), 4)} if proportional else {}),
        # over the dev set's real lengths (no padding on either side), when the retrain step recorded them
        **({"dev_real_lengths": records["retrain"]["dev_real_lengths"]}
           if "dev_real_lengths" in records["retrain"] else {}),
        "lambda": records["search"]["lambda"],
        "lr_soft": records["search"]["lr_soft"],
        "lambda_trials": records["search"].get("lambda_trials", []),
        "train_examples": records["finetune"].get("train_examples"),
        "dev_examples": records["finetune"].get("dev_examples"),
        "steps": {step: step_summary(records[step]) for step in STEPS},
        "wall_s_total": round(sum(records[step]["wall_s"] for step in STEPS), 2),
        # processes of each step (torchrun / accelerate launch); steps cached from before the move to
        # transformers.Trainer ran in one
        "world_size": _one_or_each({step: records[step].get("world_size", 1) for step in STEPS}),
        "warnings": records["search"].get("warnings", []),
        "settings": settings,
    }
    write_json_atomic(output / METRICS, metrics)  # rank 0 only: export() calls this on the main process
    return metrics


def _one_or_each(values: dict):
    """The value when every entry has the same one, else ``values`` (``{step: value}``)."""
    distinct = {json.dumps(v, sort_keys=True) for v in values.values()}
    return next(iter(values.values())) if len(distinct) == 1 else values


def evaluate(model_dir, data, *, text_column=None, text_pair_column=None, label_column=None,
             max_length: int | None = None, batch_size: int = 64, max_examples: int | None = None) -> dict:
    """Dev metric of a saved model on a data file; patched when its config holds a configuration.

    ``max_length`` None: the N the model was trained at (``powerbert_max_length``), else 128
    or the model's positions if fewer. Raises ValueError/SystemExit (one line) on bad input.
    """
    check_int("max_length", max_length, 2, optional=True)  # [CLS] plus one token at least
    check_model_dir(model_dir, max_length=max_length)
    config = read_model_config(model_dir)
    if max_length is None:
        max_length = default_max_length(config)
    examples = D.take(D.load_examples(data, text_column, text_pair_column, label_column), max_examples, 0)
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    labels = label_space_from_config(model.config)
    dataset = D.encode(examples, tokenizer, labels, max_length)
    configuration = getattr(model.config, CONFIG_KEY, None)
    if configuration is not None:
        patch(model)
    start = time.perf_counter()
    metrics = evaluate_model(model, dataset, labels, batch_size)
    metrics.update(wall_s=round(time.perf_counter() - start, 3), max_length=max_length,
                   configuration=None if configuration is None else list(configuration))
    return metrics
