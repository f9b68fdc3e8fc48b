"""Pre-flight checks: everything a pipeline run needs, checked before any training.

``preflight`` checks the settings (``PipelineConfig.check``: finite, in range; under ``torchrun``,
a batch size the processes divide), the output
folder (``check_output``: not a file, not the model folder), the model folder
(``model_folder.check_model_dir``: config, supported architecture, weights, tokenizer files, N
within its positions), the data (``load_data``: format, finite labels; classification or
regression from the whole label column), the tokenizer against the data, the retention mode of
a ``retrain`` against what the search learned, and the step cache (``step_cache``: a step made
with other settings is refused unless ``overwrite``). Each failure
is a ValueError or SystemExit with a one-line message; nothing is written.
"""
from __future__ import annotations

from pathlib import Path

from powerbert.inputs import examples as D
from powerbert.inputs.files import check_output as check_output_path
from powerbert.training.distributed import check_devices, per_process_batch
from powerbert.inputs.model_folder import check_model_dir, load_tokenizer
from powerbert.training.config import STEPS, PipelineConfig
from powerbert.elimination.retention import is_proportional
from powerbert.training.step_cache import METRICS, expected_keys, need_done, stale_message, stale_step, step_folder


def check_output(cfg: PipelineConfig) -> None:
    """``cfg.output`` must be a folder (or creatable as one) that is not the model folder
    (``powerbert.inputs.files.check_output``).

    Steps write ``<output>/<step>/`` and the export copies the model into ``<output>/``, so
    neither may be ``cfg.model``; a folder holding some other model (a ``config.json`` but no
    step folders) is refused too, as the export would overwrite it.
    """
    out = check_output_path(cfg.output, folder=True, inputs={"--model": cfg.model})
    if cfg.model is not None:
        model = Path(cfg.model).resolve()
        if model in [(out / step).resolve() for step in STEPS]:
            raise ValueError(f"output {out} (--output) would overwrite the model folder {cfg.model} (--model); "
                             f"choose another output folder")
    if (out / "config.json").is_file() and not (out / METRICS).is_file() and not any(
            (out / step).is_dir() for step in STEPS):
        raise ValueError(f"output {out} (--output) holds a model that powerbert did not write (config.json "
                         f"without step folders); the export would overwrite it: choose another output folder")


def check_search_mode(cfg: PipelineConfig, search: dict) -> None:
    """The re-training runs what the search learned: its configuration's kind (ints: fixed,
    floats: proportional) must be ``cfg.retention_mode``."""
    learned = "proportional" if is_proportional(search["configuration"]) else "fixed"
    if learned != cfg.retention_mode:
        raise ValueError(
            f"{step_folder(cfg, 'search')} learned a {learned} configuration {search['configuration']}, but "
            f"--retention-mode is {cfg.retention_mode}: retrain with --retention-mode {learned}, or run search "
            f"again with --retention-mode {cfg.retention_mode}"
        )


def load_data(cfg: PipelineConfig) -> tuple[D.Examples, D.Examples | None]:
    """(the whole --data file, the --dev file or None), checked row by row (``data.load_examples``)."""
    train = D.load_examples(cfg.data, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    dev = None
    if cfg.dev is not None:
        dev = D.load_examples(cfg.dev, cfg.text_column, cfg.text_pair_column, cfg.label_column)
    return train, dev


def preflight(cfg: PipelineConfig, steps=STEPS) -> dict[str, dict]:
    """Validate everything ``steps`` need before any training; returns each step's cache key.

    Checks the settings (``cfg.check``), the output folder (``check_output``), the model folder
    (``check_model_dir``: ``cfg.model`` for finetune, else the previous step's folder), the data
    (format, labels, the label space of the whole column), the tokenizer against the data, and
    the cache: a finished or started step whose key differs raises unless ``cfg.overwrite``.
    Nothing is written.

    Args:
        steps: consecutive names from ``STEPS``, in order.

    Raises:
        ValueError or SystemExit with a one-line message.
    """
    steps = tuple(steps)
    cfg.check()
    per_process_batch(cfg.batch_size)  # a data-parallel run splits each batch over its processes
    check_devices()
    check_output(cfg)
    first = steps[0]
    if first == "finetune":
        model_dir = check_model_dir(cfg.model, max_length=cfg.max_length)
    else:
        before = STEPS[STEPS.index(first) - 1]
        record = need_done(cfg, before)
        model_dir = check_model_dir(step_folder(cfg, before), max_length=cfg.max_length)
        if first == "retrain":
            check_search_mode(cfg, record)
    train, dev = load_data(cfg)
    if first == "finetune":
        D.infer_label_space([train] + ([] if dev is None else [dev]), cfg.task)
        D.check_tokenizer_fits(load_tokenizer(model_dir), train, model_dir)
    keys = expected_keys(cfg, steps)
    stale = stale_step(cfg, keys)
    if stale is not None and not cfg.overwrite:
        raise ValueError(stale_message(cfg, *stale))
    return keys
