"""The three steps of the PoWER-BERT pipeline (powerbert/ALGORITHM.md §4) and ``run``, as a Python API.

    from powerbert.training.config import PipelineConfig
    from powerbert.training.steps import run
    metrics = run(PipelineConfig(model="path/to/bert", data="train.csv", output="out"))

Steps, each writing ``<output>/<step>/`` (the model via ``save_pretrained``, its tokenizer, a
``settings.json`` with the step's cache key and a ``done.json`` marker with the step's record):

1. ``finetune``: the pretrained model on the task at ``lr_bert``; the best dev checkpoint is kept.
2. ``search``: soft extract attached (``soft_extract.py``), the whole model trained with AdamW,
   the retention vectors at ``lr_soft`` and everything else at ``lr_bert``, 10% linear warm-up
   then linear decay, loss = task loss + lambda * sum_l l * mass(l). The configuration is read
   off the *final* retention vectors, and the final weights are kept (the search has no dev
   criterion that weighs the regulariser against accuracy; the paper keeps the last state too).
   ``retention_mode`` says what it learns: ``"fixed"`` slot counts k_l (ints, powerbert/ALGORITHM.md §3)
   or ``"proportional"`` shares f_l of each sequence's real length (floats, §8: soft extract
   over relative rank, mass(l) = share(l) times the batch's mean real length).
3. ``retrain``: the search weights patched with the learned configuration (hard extraction,
   ``powerbert.patch``; a proportional one keeps ``ceil(f_l * len_i)`` vectors of sequence i)
   and trained at ``lr_bert``; the best dev checkpoint is kept (the untrained patched model
   counts as epoch 0).

``export`` (``powerbert.training.export``) then copies the re-trained model to ``<output>/`` and writes ``metrics.json``.

Validation first: ``preflight`` (``powerbert.training.preflight``) checks every setting (finite, in
range), the output folder (not a file, not the model folder), the model folder
(``powerbert.inputs.model_folder``: config, supported architecture, weights, tokenizer files, N within
its positions) and the data (format, finite labels, classification or regression from the whole
label column) before any training, and raises ValueError or SystemExit with a one-line message.

Training (``powerbert.training.loop``), the retention vectors' learning rate and the lambda
bisection of ``target_speedup`` (``powerbert.training.lambda_search``) and the step cache
(``powerbert.training.step_cache``: each step's key, skipping a finished step, resuming an
interrupted one, ``overwrite``) each have their own module. Each step is a function of
``(cfg, key)`` in ``STEP_FUNCTIONS``; ``run`` runs them in ``STEPS`` order.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from powerbert.elimination.retention import is_proportional, real_length_ratio, vector_ratio
from powerbert.elimination.soft_extract import fractions_from_shares
from powerbert.front_door import patch
from powerbert.inputs import examples as D
from powerbert.inputs.model_folder import label_space_from_config, load_model, load_tokenizer
from powerbert.training.config import STEPS, PipelineConfig
from powerbert.training.distributed import is_main_process
from powerbert.training.export import export
from powerbert.training.lambda_search import (RATIO_BASIS, find_lambda, lr_soft_warnings, search_lr_soft,
                                              soft_search)
from powerbert.training.loop import train_model
from powerbert.training.preflight import preflight
from powerbert.training.step_cache import (LAMBDA, begin_step, discard, finish_step, need_done, stale_step,
                                           step_folder, write_json)
from powerbert.training.task import prepare_task, real_lengths, seed_everything

log = logging.getLogger("powerbert")


def _at_minimum(configuration, max_length: int) -> bool:
    """True when every layer keeps the least the read-out allows ([CLS] alone)."""
    if is_proportional(configuration):
        return all(f <= fractions_from_shares([0.0], max_length)[0] for f in configuration)
    return all(k == 1 for k in configuration)


def prepare(cfg: PipelineConfig, steps) -> dict[str, dict]:
    """``preflight``, then (``overwrite``) discard the first stale step and the later ones."""
    keys = preflight(cfg, steps)
    stale = stale_step(cfg, keys)
    if stale is not None:
        discard(cfg, stale[0])
    return keys


def finetune(cfg: PipelineConfig) -> dict:
    """Step 1: fine-tune ``cfg.model`` on the task; keeps the best dev checkpoint."""
    return finetune_step(cfg, prepare(cfg, ("finetune",))["finetune"])


def finetune_step(cfg: PipelineConfig, key: dict) -> dict:
    """Step 1 with its cache key ``key`` (``prepare``): reuses a finished step, resumes a started one; returns the step's record (``done.json``)."""
    step_dir, done = begin_step(cfg, "finetune", key)
    if done is not None:
        return done
    seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model)
    task = prepare_task(cfg, tokenizer)
    log.info("finetune: %d train / %d dev examples, %s, N = %d", len(task.train), len(task.dev),
             D.describe(task.labels), cfg.max_length)
    model = load_model(cfg.model, task.labels, cfg.max_length)
    result = train_model(model, task, cfg, step="finetune", step_dir=step_dir, epochs=cfg.epochs_for("finetune"),
                         tokenizer=tokenizer, initial_eval=cfg.epochs_for("finetune") == 0)
    record = {"step": "finetune", "train_examples": len(task.train), "dev_examples": len(task.dev), **result}
    return finish_step(step_dir, record)


def search(cfg: PipelineConfig) -> dict:
    """Step 2: configuration search with soft extract from the fine-tuned weights."""
    return search_step(cfg, prepare(cfg, ("search",))["search"])


def search_step(cfg: PipelineConfig, key: dict) -> dict:
    """Step 2 with its cache key ``key`` (``prepare``): reuses a finished step, resumes a started one; returns the step's record (``done.json``)."""
    step_dir, done = begin_step(cfg, "search", key)
    if done is not None:
        return done
    finetuned = step_folder(cfg, "finetune")
    tokenizer = load_tokenizer(finetuned)
    base = load_model(finetuned)
    labels = label_space_from_config(base.config)
    task = prepare_task(cfg, tokenizer, labels)
    epochs = cfg.epochs_for("search")
    warnings = lr_soft_warnings(cfg, len(task.train), epochs)
    for warning in warnings:
        log.warning("search: %s", warning)
    trials, lambda_search_s = [], 0.0
    lam_file = step_dir / LAMBDA  # a resumed search reuses the bisection's result
    if cfg.target_speedup is not None:
        if lam_file.is_file():
            saved = json.loads(lam_file.read_text())
            lam, trials, lambda_search_s = saved["lambda"], saved["trials"], saved["wall_s"]
        else:
            start = time.perf_counter()
            lam, trials = find_lambda(cfg, task, cfg.target_speedup, finetuned)
            lambda_search_s = time.perf_counter() - start
            write_json(lam_file, {"lambda": lam, "trials": trials, "wall_s": lambda_search_s})
    else:
        lam = cfg.lam
    log.info("search: %s retention, lambda %.3g, %d epochs, lr_bert %.3g, lr_soft %.3g", cfg.retention_mode, lam,
             epochs, cfg.lr_bert, search_lr_soft(cfg, len(task.train), epochs))
    seed_everything(cfg.seed)
    configuration, vectors, lr_soft, result = soft_search(base, task, cfg, lam, epochs, step_dir, tokenizer)
    write_json(step_dir / "retention_vectors.json", {
        "retention_mode": cfg.retention_mode, "configuration": list(configuration),
        "masses": vectors.sum(1).tolist(), "shares": vectors.mean(1).tolist(), "vectors": vectors.tolist(),
    })
    log.info("search: learned configuration %s (%s; vector ratio %.2fx at N, %.2fx over the dev set's real "
             "lengths)", list(configuration), cfg.retention_mode, vector_ratio(configuration, cfg.max_length),
             real_length_ratio(configuration, real_lengths(task.dev)))
    if _at_minimum(configuration, cfg.max_length):
        least = "f = 1/N" if cfg.retention_mode == "proportional" else "k = 1"
        warnings.append(
            f"the search ended with every layer at its minimum ({least}, [CLS] alone): lambda {lam:.3g} outweighs "
            f"the task at lr_soft {lr_soft:.3g}; the re-trained model sees [CLS] only. Lower --lambda or "
            f"--target-speedup, or --lr-soft"
        )
        log.warning("search: %s", warnings[-1])
    record = {"step": "search", "retention_mode": cfg.retention_mode, "lambda": lam, "lr_soft": lr_soft,
              "lambda_trials": trials, **({"target_ratio_basis": RATIO_BASIS[cfg.retention_mode]} if trials else {}),
              "configuration": list(configuration), **result, "lambda_search_s": lambda_search_s,
              "warnings": warnings}
    record["wall_s"] += lambda_search_s  # the step's wall time includes the lambda bisection
    return finish_step(step_dir, record)


def retrain(cfg: PipelineConfig) -> dict:
    """Step 3: hard extraction with the learned configuration, trained from the search weights."""
    return retrain_step(cfg, prepare(cfg, ("retrain",))["retrain"])


def retrain_step(cfg: PipelineConfig, key: dict) -> dict:
    """Step 3 with its cache key ``key`` (``prepare``): reuses a finished step, resumes a started one; returns the step's record (``done.json``)."""
    step_dir, done = begin_step(cfg, "retrain", key)
    if done is not None:
        return done
    configuration = need_done(cfg, "search")["configuration"]
    searched = step_folder(cfg, "search")
    tokenizer = load_tokenizer(searched)
    model = load_model(searched)
    labels = label_space_from_config(model.config)
    task = prepare_task(cfg, tokenizer, labels)
    patch(model, configuration)  # floats: proportional, the hard extract keeps per-row counts
    seed_everything(cfg.seed)
    result = train_model(model, task, cfg, step="retrain", step_dir=step_dir, epochs=cfg.epochs_for("retrain"),
                         tokenizer=tokenizer, initial_eval=True)
    lengths = real_lengths(task.dev)
    record = {"step": "retrain", "configuration": configuration, **result,
              "dev_real_lengths": {"examples": len(lengths), "mean": round(lengths.double().mean().item(), 3),
                                   "vector_ratio": real_length_ratio(configuration, lengths)}}
    return finish_step(step_dir, record)


# The steps by name, each a function of (cfg, its cache key) returning the step's record; ``run``
# calls them in ``STEPS`` order with the keys ``prepare`` computed for all three at once.
STEP_FUNCTIONS = {"finetune": finetune_step, "search": search_step, "retrain": retrain_step}


def run(cfg: PipelineConfig) -> dict:
    """All three steps (each skipped if done with the same settings), then ``export``.

    Everything is validated first (``preflight``); returns metrics.json's content.
    """
    keys = prepare(cfg, STEPS)
    if is_main_process():
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
    records = {step: STEP_FUNCTIONS[step](cfg, keys[step]) for step in STEPS}  # in order: each reads the last
    return export(cfg, records)
