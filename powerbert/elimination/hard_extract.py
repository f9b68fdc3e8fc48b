"""The hard extract: word-vector elimination installed in (and removed from) a Hugging Face model.

``HardExtract`` is the layer runner of a patched model; ``install_hard_extract`` and
``remove_hard_extract`` are ``powerbert.patch`` / ``powerbert.unpatch`` for a Hugging Face model
(the front door, ``powerbert/front_door.py``, also serves sentence-transformers models). Installing replaces two things, both instance attributes (see ``encoder.py``): the ``forward`` of
the model's encoder (it runs ``layer.eliminating_layer`` over the family's layers, looked up at
every call) and the ``forward`` of its base model (it adds ``hidden_states``, ``attentions``,
``kept_mask`` and ``kept_positions`` to the output). Weights, modules and classes are untouched,
so ``state_dict``, ``save_pretrained``, ``copy.deepcopy``, ``torch.save`` and quantisation work as
on the stock model, and ``unpatch`` (which restores both attributes and the config) is exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from powerbert.elimination.forwards import (check_model_dtype, install, installed, refuse_installed, restore_attribute,
                               saved_attribute, uninstall)
from powerbert.elimination.families import LayerParts, resolve
from powerbert.elimination.layer import SELECTIONS, LayerOutput, eliminating_layer
from powerbert.elimination.retention import is_proportional, keep_counts, row_keep_counts, validate_minimum, validate_retention

CONFIG_KEY = "powerbert_retention"
SELECTION_KEY = "powerbert_selection"  # stored only for the ablation strategies
MINIMUM_KEY = "powerbert_retention_min"  # stored only when a proportional configuration has one


@dataclass
class HardExtract:
    """The layer runner of a patched model (powerbert/ALGORITHM.md §2), and what ``unpatch`` restores.

    Attributes:
        retention: (k_1, ..., k_L) ints (fixed) or (f_1, ..., f_L) floats (proportional).
        cls_only_last_layer: run the last layer for [CLS] alone (sequence-level heads).
        selection: ``"attention"``, ``"first"`` or ``"random"``.
        config_saved: ``{key: (had_it, value)}`` of the config keys patch wrote.
        static_shapes: None (auto), True or False; see ``layout.static_shapes_now``.
        minimum: per-layer minimums m_l of a proportional configuration, or None (all 1).
        cuda_graphs: the packed CUDA forward replays graphs from a pool (``packed_graphs``).
    """

    retention: tuple
    cls_only_last_layer: bool
    selection: str
    config_saved: dict[str, tuple[bool, Any]]
    static_shapes: bool | None = None
    minimum: tuple[int, ...] | None = None
    cuda_graphs: bool = True

    installed_message = (
        "model is already patched by powerbert (its encoder, possibly through the model that holds it); "
        "call powerbert.unpatch(model) first"
    )

    def check(self, count: int) -> None:
        if count != len(self.retention):
            raise RuntimeError(
                f"the model now has {count} encoder layers but was patched with a retention of "
                f"{len(self.retention)}; unpatch and patch again"
            )

    def plan(self, mask: torch.Tensor, *, static: bool) -> list | None:
        """What each layer keeps for this batch: None for a fixed configuration (``retention[l]``),
        else one entry per layer: an int (every row keeps that many: the plain top-k path) or
        ``(k_rows [B] int64, width)`` (row i keeps ``k_rows[i]``; outputs ``width`` slots).

        Dynamic layout: one host synchronisation for every layer's width. Static: the widths
        of a full-length row, so shapes depend on the input shape only.
        """
        if torch.compiler.is_exporting() and not is_proportional(self.retention):
            # Symbolic n: ``k_l >= n`` would be a guard that fixes the length. Every layer takes
            # the per-row path instead, at width sym_min(k_l, n), with no comparison.
            return [(torch.full((mask.shape[0],), k, dtype=torch.int64, device=mask.device), k)
                    for k in self.retention]
        if not is_proportional(self.retention):
            return None
        # Layers of a leading run of shares 1.0 keep every real token of every row (k = len_i):
        # an int >= n makes them run like the stock layer, fused attention and no scores.
        keep_all = next((layer for layer, share in enumerate(self.retention) if share < 1.0), len(self.retention))
        lengths = mask.sum(dim=1)
        counts = row_keep_counts(self.retention, self.minimum, lengths)  # [L, B]
        if static:
            widths = keep_counts(self.retention, mask.shape[1], self.minimum)  # a full-length row
            if torch.compiler.is_exporting():
                # A symbolic width the example input gives >= 2 would be fixed >= 2 by the
                # tracer's 0/1 specialisation; 2 slots (the second masked) hold a width of 1.
                widths = [w if isinstance(w, int) else torch.sym_max(w, 2) for w in widths]
            plan = [(counts[layer], width) for layer, width in enumerate(widths)]
        else:
            stats = torch.stack([counts.max(dim=1).values, counts.min(dim=1).values], dim=1).tolist()
            # Rows keeping the same count take the plain top-k path (no per-row bookkeeping). A
            # batch of empty rows (an all-zero mask, lengths 0) keeps 0 vectors a row but still
            # outputs one slot, masked, as a fixed configuration does: stock gives finite outputs too.
            plan = [high if high == low else (counts[layer], high)
                    for layer, (high, low) in enumerate((max(high, 1), low) for high, low in stats)]
        return [mask.shape[1]] * keep_all + plan[keep_all:]

    def packed_settings(self) -> tuple | None:
        """``(retention, minimum, cuda_graphs)`` for the packed inference forward
        (``elimination/packed.py``), or None when this runner does not take it: the Head-WS /
        Rand-WS ablations select without attention scores, and ``static_shapes=True`` promises
        outputs as wide as the input (both on the padded path)."""
        if self.selection != "attention" or self.static_shapes is True:
            return None
        # Objects pickled before cuda_graphs existed have none: graphs by default.
        return self.retention, self.minimum, getattr(self, "cuda_graphs", True)

    def keeps_everything(self, n: int) -> bool:
        """True when no layer eliminates anything for inputs ``n`` slots wide: every k_l >= n
        (fixed), or every share 1.0 (proportional: each row keeps its own length)."""
        if is_proportional(self.retention):
            return all(share >= 1.0 for share in self.retention)
        return min(self.retention) >= n

    def layer(self, index: int, count: int, parts: LayerParts, hidden: torch.Tensor, mask: torch.Tensor, *,
              padded: bool, need_probs: bool, cls_only_last: bool, plan: list | None = None,
              bias: torch.Tensor | None = None) -> LayerOutput:
        keep = self.retention[index] if plan is None else plan[index]
        return eliminating_layer(
            parts, hidden, mask, keep, padded=padded,
            cls_only=self.cls_only_last_layer and cls_only_last and index == count - 1,
            selection=self.selection, need_probs=need_probs, bias=bias,
        )



def hard_extract_of(model: nn.Module) -> HardExtract | None:
    """The ``HardExtract`` a Hugging Face ``model`` (or the model holding it) runs with, or None."""
    forward = installed(model)
    return forward.runner if forward is not None and isinstance(forward.runner, HardExtract) else None


def install_hard_extract(model: nn.Module, retention=None, *, cls_only_last_layer: bool = True,
                         selection: str | None = None, static_shapes: bool | None = None,
                         retention_min=None, cuda_graphs: bool = True) -> nn.Module:
    """``powerbert.patch`` for a Hugging Face model: every argument as there (``front_door.patch``).

    Raises:
        TypeError, ValueError, RuntimeError: as ``powerbert.patch``, before anything is changed.
    """
    family, base, cls_only_head = resolve(model)
    refuse_installed(model)
    check_model_dtype(model)
    layers = family.layers(family.encoder(base))
    config = base.config
    if retention is None:
        retention = getattr(config, CONFIG_KEY, None)
        if retention is None:
            raise ValueError(
                f"no retention given and model.config has no '{CONFIG_KEY}': pass retention=[k_1, ..., "
                f"k_{len(layers)}] or load a model saved after powerbert.patch"
            )
        if retention_min is None:
            retention_min = getattr(config, MINIMUM_KEY, None)
    retention = validate_retention(retention, len(layers), getattr(config, "max_position_embeddings", None))
    minimum = validate_minimum(retention_min, len(layers))
    if minimum is not None and not is_proportional(retention):
        raise ValueError("retention_min applies to a proportional configuration (floats); this one is fixed (ints)")
    if selection is None:
        selection = getattr(config, SELECTION_KEY, "attention")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")
    if static_shapes not in (None, True, False):
        raise TypeError(f"static_shapes must be None, True or False, got {static_shapes!r}")
    if not isinstance(cuda_graphs, bool):
        raise TypeError(f"cuda_graphs must be True or False, got {cuda_graphs!r}")

    runner = HardExtract(
        retention=retention,
        cls_only_last_layer=bool(cls_only_last_layer and cls_only_head),
        selection=selection,
        config_saved={key: saved_attribute(config, key) for key in (CONFIG_KEY, SELECTION_KEY, MINIMUM_KEY)},
        static_shapes=static_shapes,
        minimum=minimum,
        cuda_graphs=cuda_graphs,
    )
    install(model, family, base, runner, cls_only_head=runner.cls_only_last_layer)
    setattr(config, CONFIG_KEY, list(retention))
    for key, value in ((SELECTION_KEY, None if selection == "attention" else selection),
                       (MINIMUM_KEY, None if minimum is None else list(minimum))):
        if value is not None:
            setattr(config, key, value)
        elif key in config.__dict__:
            delattr(config, key)
    return model


def remove_hard_extract(model: nn.Module) -> nn.Module:
    """``powerbert.unpatch`` for a Hugging Face model: forwards and config exactly as before the patch.

    Raises:
        RuntimeError: the model is not patched.
    """
    if hard_extract_of(model) is None:
        raise RuntimeError("model is not patched by powerbert; nothing to unpatch")
    runner: HardExtract = uninstall(model).runner
    config = resolve(model)[1].config
    for key, saved in runner.config_saved.items():
        restore_attribute(config, key, saved)
    return model
