"""``patch`` / ``unpatch``: swap word-vector elimination into a Hugging Face model in place.

Patching replaces one thing: the ``forward`` of the model's encoder (the module that runs
the layer stack), by an instance attribute that runs ``layer.eliminating_layer`` over the
family's layers. Weights, modules and the class are untouched, so ``state_dict``,
``save_pretrained`` and ``unpatch`` (which deletes that attribute, or restores whatever
instance attribute was there) are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

from powerbert.families import Family, LayerParts, resolve
from powerbert.layer import SELECTIONS, eliminating_layer
from powerbert.retention import validate_retention

CONFIG_KEY = "powerbert_retention"
SELECTION_KEY = "powerbert_selection"  # stored only for the ablation strategies
_STATE_ATTR = "_powerbert_patch_state"
_MISSING = object()


@dataclass
class _PatchState:
    encoder: nn.Module
    original_forward: Any  # the encoder's own instance attribute ``forward``, or _MISSING
    config_retention: Any  # config.powerbert_retention before patching, or _MISSING
    config_selection: Any  # config.powerbert_selection before patching, or _MISSING
    retention: tuple[int, ...]
    cls_only_last_layer: bool
    selection: str


def key_mask(attention_mask: torch.Tensor | None, hidden: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Recover the ``[B, n]`` key padding mask from the mask transformers hands the encoder.

    Args:
        attention_mask: None (no padding), ``[B, n]`` 0/1, or ``[B, 1, n|1, n]`` as built by
            ``create_bidirectional_mask``: bool (True = attend, sdpa) or float (0 = attend,
            dtype min = masked, eager).
        hidden: ``[B, n, D]`` embeddings (for shape and device).

    Returns:
        ``(mask [B, n] bool, padded)``; ``padded`` is False only when no mask was given.
    """
    batch, length = hidden.shape[:2]
    if attention_mask is None:
        return torch.ones(batch, length, dtype=torch.bool, device=hidden.device), False
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(
            f"powerbert needs a tensor attention mask, got {type(attention_mask).__name__}; "
            f"load the model with attn_implementation='sdpa' or 'eager'"
        )
    if attention_mask.dim() == 4:
        # Every query row of a bidirectional mask is the same key mask; row 0 is [CLS].
        row = attention_mask[:, 0, 0, :]
        mask = row if row.dtype == torch.bool else row == 0
    elif attention_mask.dim() == 2:
        mask = attention_mask != 0
    else:
        raise ValueError(f"attention mask of shape {tuple(attention_mask.shape)} is neither [B, n] nor [B, 1, n, n]")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention mask covers shape {tuple(mask.shape)}, the input is {(batch, length)}")
    return mask, True


def encoder_forward(family: Family, encoder: nn.Module, layers: list[LayerParts], layer_fn):
    """Build a replacement ``encoder.forward`` that runs ``layer_fn`` over the family's layers.

    ``layer_fn(index, parts, hidden [B, n, D], mask [B, n] bool, padded) -> (hidden, mask)``;
    patch (hard extract) and soft extract differ only there.
    """

    def forward(hidden_states, attention_mask=None, *args, **kwargs):
        mask, padded = key_mask(attention_mask, hidden_states)
        hidden = family.enter(encoder, hidden_states) if family.enter is not None else hidden_states
        for index, parts in enumerate(layers):
            hidden, mask = layer_fn(index, parts, hidden, mask, padded)
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden)

    return forward


def is_patched(model: nn.Module) -> bool:
    """True if ``powerbert.patch`` has been applied to ``model`` and not undone."""
    return hasattr(model, _STATE_ATTR)


def patch(model: nn.Module, retention=None, *, cls_only_last_layer: bool = True,
          selection: str | None = None) -> nn.Module:
    """Make ``model`` eliminate word vectors (PoWER-BERT), in place.

    Args:
        model: a supported Hugging Face model (``powerbert.supported_models()``), any
            ``attn_implementation``; it is modified in place.
        retention: one int per encoder layer, non-increasing, each >= 1: ``retention[l]`` word
            vectors survive layer ``l + 1``'s attention. None reads
            ``model.config.powerbert_retention`` (stored by an earlier patch + ``save_pretrained``).
        cls_only_last_layer: for heads that read only [CLS] (sequence classification, multiple
            choice), compute the last layer for [CLS] alone. Lossless; ignored for bare models,
            whose ``last_hidden_state`` returns the k_L survivors.
        selection: ``"attention"`` (PoWER-BERT, the default) or the paper's ablations
            ``"first"`` (Head-WS) and ``"random"`` (Rand-WS). None reads
            ``model.config.powerbert_selection`` if present, else ``"attention"``. An ablation
            strategy is stored in the config (``powerbert_selection``) so it survives
            ``save_pretrained``.

    Returns:
        The same ``model``. ``model.config.powerbert_retention`` holds the configuration, so
        ``save_pretrained`` writes it to ``config.json``.

    Raises:
        TypeError: unsupported model or head, or a malformed retention.
        ValueError: retention of the wrong length, k < 1, growing, or missing when None.
        RuntimeError: the model is already patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch expects a transformers model, got {type(model).__name__}")
    if is_patched(model):
        raise RuntimeError("model is already patched by powerbert; call powerbert.unpatch(model) first")
    family, base, cls_only_head = resolve(model)
    layers = family.layers(base)
    config = base.config
    if retention is None:
        retention = getattr(config, CONFIG_KEY, None)
        if retention is None:
            raise ValueError(
                f"no retention given and model.config has no '{CONFIG_KEY}': pass retention=[k_1, ..., "
                f"k_{len(layers)}] or load a model saved after powerbert.patch"
            )
    retention = validate_retention(retention, len(layers), getattr(config, "max_position_embeddings", None))
    if selection is None:
        selection = getattr(config, SELECTION_KEY, "attention")
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}, got {selection!r}")

    encoder = family.encoder(base)
    state = _PatchState(
        encoder=encoder,
        original_forward=encoder.__dict__.get("forward", _MISSING),
        config_retention=config.__dict__.get(CONFIG_KEY, _MISSING),
        config_selection=config.__dict__.get(SELECTION_KEY, _MISSING),
        retention=retention,
        cls_only_last_layer=cls_only_last_layer and cls_only_head,
        selection=selection,
    )
    last = len(layers) - 1

    def eliminate(index, parts, hidden, mask, padded):
        return eliminating_layer(
            parts, hidden, mask, state.retention[index], padded=padded,
            cls_only=state.cls_only_last_layer and index == last, selection=state.selection,
        )

    encoder.forward = encoder_forward(family, encoder, layers, eliminate)
    setattr(config, CONFIG_KEY, list(retention))
    if selection != "attention":
        setattr(config, SELECTION_KEY, selection)
    elif SELECTION_KEY in config.__dict__:
        delattr(config, SELECTION_KEY)
    object.__setattr__(model, _STATE_ATTR, state)
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch`` exactly: the encoder's forward and ``config.powerbert_retention`` as before.

    Raises:
        RuntimeError: the model is not patched.
    """
    if not is_patched(model):
        raise RuntimeError("model is not patched by powerbert; nothing to unpatch")
    state: _PatchState = getattr(model, _STATE_ATTR)
    if state.original_forward is _MISSING:
        del state.encoder.forward
    else:
        state.encoder.forward = state.original_forward
    config = resolve(model)[1].config
    for key, before in ((CONFIG_KEY, state.config_retention), (SELECTION_KEY, state.config_selection)):
        if before is not _MISSING:
            setattr(config, key, before)
        elif key in config.__dict__:
            delattr(config, key)
    object.__delattr__(model, _STATE_ATTR)
    return model


def patch_state(model: nn.Module) -> _PatchState:
    """What a patched model runs with (``.retention``, ``.selection``, ``.cls_only_last_layer``)."""
    if not is_patched(model):
        raise RuntimeError("model is not patched by powerbert")
    return getattr(model, _STATE_ATTR)


def patched_retention(model: nn.Module) -> tuple[int, ...]:
    """The retention configuration a patched model runs with."""
    return patch_state(model).retention
