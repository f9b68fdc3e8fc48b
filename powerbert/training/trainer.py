"""PoWER-BERT on ``transformers.Trainer``: the configuration search as a small Trainer subclass.

The paper's three steps in your own Trainer script (``powerbert train`` runs the same classes):

    import powerbert
    from powerbert.training.trainer import FiniteLossTrainer, SearchTrainer, task_metrics
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments("out/search", num_train_epochs=3, learning_rate=3e-5, warmup_steps=0.1,
                             eval_strategy="epoch", report_to="none")
    Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev).train()         # 1. fine-tune
    search = SearchTrainer(model=model, args=args, train_dataset=train, eval_dataset=dev,
                           max_length=64, lam=1e-3)                                          # 2. search
    search.train()
    configuration = search.detach()          # the learned (k_1, ..., k_L); the model is stock again
    powerbert.patch(model, configuration)
    Trainer(model=model, args=args, train_dataset=train, eval_dataset=dev).train()         # 3. re-train

``SearchTrainer`` adds what the search needs on top of ``Trainer`` (powerbert/ALGORITHM.md §4): it attaches
a soft extract (``powerbert.attach_soft_extract``: retention vectors r_l in [0, 1]^N, fixed or
proportional ``mode``), trains r at its own learning rate ``lr_soft`` beside the model's
``args.learning_rate`` (one AdamW, the Trainer's schedule over both), adds the regulariser
``lam * sum_l l * mass(l)`` to the training loss, and projects r onto [0, 1] after every
optimiser step (``ProjectRetention``). During ``train()`` the retention vectors are a submodule
of the model (``SOFT_MODULE``), so data-parallel training averages their gradients like the
model's, and the Trainer's checkpoints hold them (``resume_from_checkpoint`` restores r with the
optimiser); outside ``train()`` the model's ``state_dict`` is the stock one. Everything else is
the Trainer's own: logging, checkpoint rotation, gradient accumulation, mixed precision, data
parallelism (``torchrun``, ``accelerate launch``).

``FiniteLossTrainer`` (``SearchTrainer``'s base) stops with a ValueError when the training loss
becomes NaN or infinite, instead of the Trainer's default of logging past it and saving NaN
weights. ``task_metrics`` is a ``compute_metrics`` for classification (accuracy) or regression
(Pearson r, MSE).
"""
from __future__ import annotations

import math

import torch
from transformers import Trainer, TrainerCallback

from powerbert.elimination.soft_extract import SoftExtract, attach_soft_extract
from powerbert.inputs.checks import check_number
from powerbert.training.metrics import dev_metrics

# The model's submodule name for the retention vectors while SearchTrainer.train() runs.
SOFT_MODULE = "powerbert_soft_extract"

# The learning rate of the retention vectors when none is given: 3 / search steps, so that
# r can travel about 1.5 over the warm-up/decay schedule (which averages half the peak rate),
# bounded to [LR_SOFT_MIN, LR_SOFT_MAX]. Adam moves r by about lr per step whatever the size of
# its gradient, so lambda acts through the *sign* of the gradient summed over many steps: a rate
# near 1 (3 / steps on a few hundred examples) saturates r at 0 or 1 within a step or two and
# lambda stops mattering (1e-6 and 1e-3 gave the same configuration). The cap 0.05 leaves at
# least 20 peak-rate steps between r = 1 and r = 0; it is 15x the paper's largest LR_SOFT
# (2e-4 .. 3e-3 over thousands of steps, powerbert/ALGORITHM.md §4) and above the 0.024 / 0.034 that the
# reproduce study's 88-125 search steps gave. The floor 1e-3 is within the paper's range.
# On a small data set the cap leaves r near 1, and a warning says that the search had too few
# steps to learn a configuration (rather than hiding it behind a saturated one).
LR_SOFT_MIN = 1e-3
LR_SOFT_MAX = 0.05


def default_lr_soft(steps: int) -> float:
    """``lr_soft`` for a search of ``steps`` optimiser steps: 3 / steps within [1e-3, 0.05]."""
    return min(LR_SOFT_MAX, max(LR_SOFT_MIN, 3.0 / max(1, steps)))


def task_metrics(regression: bool):
    """A ``compute_metrics`` for ``Trainer``: ``{"value": accuracy}`` (classification) or
    ``{"value": Pearson r, "mse": ...}`` (regression, one output; a constant prediction's
    undefined r counts as 0), by ``powerbert.training.metrics.dev_metrics``. ``value`` is the
    dev criterion the pipeline keeps the best of."""

    def compute(prediction) -> dict:
        logits = prediction.predictions
        logits = logits[0] if isinstance(logits, tuple) else logits
        return dev_metrics(logits, prediction.label_ids, regression)

    return compute


class FiniteLossTrainer(Trainer):
    """``Trainer`` that raises ValueError as soon as the training loss is NaN or infinite.

    (``Trainer`` otherwise logs past it, ``logging_nan_inf_filter``, and saves NaN weights.)
    The check reads the loss on the host once per micro-batch.

    It also tells the Trainer that the model's loss is a mean over the batch
    (``model_accepts_loss_kwargs = False``): sequence-classification heads take ``**kwargs``, so
    the Trainer would otherwise treat their loss as a sum over ``num_items_in_batch`` and neither
    divide it by the gradient-accumulation steps nor leave it unscaled across processes (it
    multiplies it by the number of processes, which doubled the loss, and halved lambda's
    weight against it, in a 2-process run).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        loss = result[0] if return_outputs else result
        if model.training and not torch.isfinite(loss.detach()).all():
            epoch = int(self.state.epoch or 0) + 1
            raise ValueError(f"the training loss became {loss.detach().float().mean().item()} in epoch {epoch}; "
                             f"lower the learning rates ({self._rates()})")
        return result

    def _rates(self) -> str:
        return f"learning_rate {self.args.learning_rate:g}"


class ProjectRetention(TrainerCallback):
    """Projects a soft extract's retention vectors onto [0, 1] after every optimiser step."""

    def __init__(self, soft: SoftExtract):
        self.soft = soft

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.soft.project_()


class SearchTrainer(FiniteLossTrainer):
    """``Trainer`` for PoWER-BERT's configuration search (see the module docstring).

    Args:
        model: a supported model (``powerbert.supported_models()``), not patched.
        max_length: N, the padded input length the retention vectors cover (inputs longer than N
            are refused); ignored when ``soft`` is given.
        lam: regulariser weight lambda (>= 0).
        lr_soft: learning rate of the retention vectors; None: ``default_lr_soft`` of the
            run's optimiser steps (3 / steps within [1e-3, 0.05]).
        mode: ``"fixed"`` (learn slot counts k_l) or ``"proportional"`` (shares f_l of each
            sequence's real length); ignored when ``soft`` is given.
        soft: a ``SoftExtract`` already attached to ``model`` (default: attach one here).
        Everything else goes to ``Trainer`` unchanged.

    ``configuration()`` reads the configuration off the current r; ``detach()`` restores the
    stock model and returns it.
    """

    def __init__(self, model=None, args=None, *, max_length: int | None = None, lam: float = 1e-3,
                 lr_soft: float | None = None, mode: str = "fixed", soft: SoftExtract | None = None, **kwargs):
        check_number("lam", lam, 0)
        check_number("lr_soft", lr_soft, 0, low_open=True, optional=True)
        if soft is None:
            if max_length is None:
                raise ValueError("give max_length (N, the padded input length) or an attached soft extract")
            soft = attach_soft_extract(model, max_length, mode=mode)
        elif soft.model is not model:
            raise ValueError("soft is not attached to this model")
        self.soft, self.lam, self.lr_soft = soft, float(lam), lr_soft
        super().__init__(model=model, args=args, **kwargs)
        self.add_callback(ProjectRetention(soft))

    def soft_learning_rate(self) -> float:
        """``lr_soft``, or ``default_lr_soft`` of this run's optimiser steps."""
        if self.lr_soft is not None:
            return self.lr_soft
        if self.args.max_steps > 0:
            steps = self.args.max_steps
        else:
            per_step = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
            steps = math.ceil(len(self.train_dataset) / per_step) * math.ceil(self.args.num_train_epochs)
        return default_lr_soft(steps)

    def train(self, *args, **kwargs):
        # r is a submodule while training: DDP averages its gradients, checkpoints hold it.
        self.soft.to(next(p for n, p in self.model.named_parameters() if not n.startswith(SOFT_MODULE)).device)
        self.model.add_module(SOFT_MODULE, self.soft)
        try:
            return super().train(*args, **kwargs)
        finally:
            del self.model._modules[SOFT_MODULE]

    def create_optimizer(self, model=None):
        """AdamW (the Trainer's optimiser class and arguments) over three groups: the model's
        weights with and without weight decay at ``args.learning_rate``, and r at ``lr_soft``."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            soft = {id(p) for p in self.soft.parameters()}
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in soft]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                {"params": list(self.soft.parameters()), "weight_decay": 0.0, "lr": self.soft_learning_rate()},
            ]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's task loss, plus ``lam * sum_l l * mass(l)`` while training (proportional
        mode: mass at the batch's mean real length, from ``attention_mask``)."""
        loss, outputs = Trainer.compute_loss(self, model, inputs, return_outputs=True,
                                             num_items_in_batch=num_items_in_batch)
        if model.training:
            mask = inputs.get("attention_mask")
            loss = loss + self.soft.regularizer(self.lam, lengths=None if mask is None else mask.sum(dim=1))
            if not torch.isfinite(loss.detach()).all():
                epoch = int(self.state.epoch or 0) + 1
                raise ValueError(f"the training loss became {loss.detach().float().item()} in epoch {epoch}; "
                                 f"lower the learning rates ({self._rates()})")
        return (loss, outputs) if return_outputs else loss

    def _rates(self) -> str:
        return f"{super()._rates()}, lr_soft {self.soft_learning_rate():g}"

    def configuration(self) -> tuple:
        """The configuration the current r implies (ints in fixed mode, floats in proportional)."""
        return self.soft.configuration()

    def detach(self) -> tuple:
        """Detach the soft extract (the model is stock again); returns the learned configuration."""
        configuration = self.configuration()
        self.soft.detach()
        return configuration
