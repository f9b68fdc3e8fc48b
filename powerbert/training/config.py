"""The settings of a pipeline run: ``PipelineConfig`` and the names of its three steps.

Only settings live here (and ``PipelineConfig.check``, which validates them one by one), so that
the pre-flight checks, the step cache and the pipeline itself can all read a configuration
without importing each other. See ``powerbert.training.steps`` for what the settings do.
"""
from __future__ import annotations

from dataclasses import dataclass

from powerbert.inputs import examples as D
from powerbert.inputs.checks import check_int, check_number

# The pipeline's steps, in the order they run; each writes ``<output>/<step>/``.
STEPS = ("finetune", "search", "retrain")
# What the search learns and the re-training runs (``soft_extract.MODES``): slot counts (ints,
# powerbert/ALGORITHM.md §3) or shares of each sequence's length (floats, §8).
RETENTION_MODES = ("fixed", "proportional")
# The default of ``PipelineConfig.retention_mode`` and ``--retention-mode``. Fixed, from a small
# experiment (movie reviews, MiniLM-L6, lambda 1e-3 / 3e-3 / 1e-2, both modes from one fine-tune;
# README "Learn a configuration"): with batches in data order (padded to their longest) the fixed
# configurations were more accurate *and* faster than the proportional ones at every lambda;
# with length-sorted batches the proportional ones were faster at every lambda but less accurate,
# and about as accurate at equal speed. Proportional pays where batches hold similar lengths
# (sorted batching, batch size 1).
DEFAULT_RETENTION_MODE = "fixed"


@dataclass
class PipelineConfig:
    """Every setting of a pipeline run (the CLI flags map one to one).

    ``task``: ``"auto"`` (the whole label column decides, ``data.infer_label_space``),
    ``"classification"`` or ``"regression"``. ``retention_mode``: ``"fixed"`` (the search
    learns ints k_l, the same for every sequence) or ``"proportional"`` (floats f_l, a share of
    each sequence's real length). ``overwrite``: recompute steps whose cached settings differ
    instead of stopping (see the module docstring).
    """

    data: str
    output: str
    model: str | None = None  # pretrained HF folder (needed by finetune)
    dev: str | None = None
    dev_fraction: float = 0.1
    text_column: str | None = None
    text_pair_column: str | None = None
    label_column: str | None = None
    task: str = "auto"
    max_length: int = 64
    epochs: int = 3
    finetune_epochs: int | None = None
    search_epochs: int | None = None
    retrain_epochs: int | None = None
    batch_size: int = 32
    lr_bert: float = 3e-5
    lr_soft: float | None = None
    lam: float | None = 1e-3
    target_speedup: float | None = None
    retention_mode: str = DEFAULT_RETENTION_MODE
    target_trials: int = 5
    target_subset: int = 512
    warmup: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_train_examples: int | None = None
    max_dev_examples: int | None = None
    seed: int = 0
    progress: bool = True
    overwrite: bool = False

    def epochs_for(self, step: str) -> int:
        """Epochs of ``step`` (one of ``STEPS``): its own ``<step>_epochs`` if set, else ``epochs``."""
        value = getattr(self, f"{step}_epochs")
        return self.epochs if value is None else value

    def check(self) -> None:
        """Raise ValueError naming the first bad setting and its accepted range."""

        check_int("max_length", self.max_length, 2)
        check_int("epochs", self.epochs, 1)
        check_int("batch_size", self.batch_size, 1)
        for step in STEPS:
            check_int(f"{step}_epochs", getattr(self, f"{step}_epochs"), 0, optional=True)
        check_int("target_trials", self.target_trials, 1)
        check_int("target_subset", self.target_subset, 1)
        check_int("max_train_examples", self.max_train_examples, 1, optional=True)
        check_int("max_dev_examples", self.max_dev_examples, 1, optional=True)
        check_int("seed", self.seed, 0, high=2**32 - 1)  # numpy's seed range
        if self.dev is None:
            check_number("dev_fraction", self.dev_fraction, 0, low_open=True, high=1, high_open=True)
        check_number("lr_bert", self.lr_bert, 0, low_open=True)
        check_number("lr_soft", self.lr_soft, 0, low_open=True, optional=True)
        check_number("target_speedup", self.target_speedup, 1, optional=True)
        if self.target_speedup is None:
            if self.lam is None:
                raise ValueError("give lambda (lam) or target_speedup")
            check_number("lambda", self.lam, 0)
        check_number("warmup", self.warmup, 0, high=1, high_open=True)
        check_number("weight_decay", self.weight_decay, 0)
        check_number("max_grad_norm", self.max_grad_norm, 0)
        if self.retention_mode not in RETENTION_MODES:
            raise ValueError(f"retention_mode must be one of {', '.join(RETENTION_MODES)}, got {self.retention_mode!r}")
        if self.task not in D.TASKS:
            raise ValueError(f"task must be one of {', '.join(D.TASKS)}, got {self.task!r}")
        if not self.data:
            raise ValueError("no data file given")
        if not self.output:
            raise ValueError("no output folder given")
