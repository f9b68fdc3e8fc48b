"""Where each supported model family keeps the pieces elimination needs.

One small description per family: how to find the base encoder model inside a head, which
module's forward runs the layers, and, for every layer application, the attention
projections, the attention output norm and the feed-forward sub-layer. ``layer.py`` holds
the one eliminating layer forward that reads these descriptions; a new family is a new
entry here, never a new copy of the forward.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class LayerParts:
    """The modules of one encoder layer application (post-norm BERT layout).

    attention:  context = softmax(q k^T * scale + mask) v over ``num_heads`` heads
                a = attn_norm(attn_dropout(attn_out(context)) + x)
    feed-forward: y = ffn_norm(ffn_dropout(ffn_out(ffn_act(ffn_in(a)))) + a)
    """

    query: nn.Linear
    key: nn.Linear
    value: nn.Linear
    num_heads: int
    probs_dropout: nn.Module
    attn_out: nn.Linear
    attn_dropout: nn.Module
    attn_norm: nn.Module
    ffn_in: nn.Linear
    ffn_act: Callable
    ffn_out: nn.Linear
    ffn_dropout: nn.Module
    ffn_norm: nn.Module


@dataclass(frozen=True)
class Family:
    """How one model family is laid out.

    Attributes:
        name: family name used in messages.
        model_types: ``config.model_type`` values of the family.
        base_classes: class names of the bare encoder models.
        head_classes: class names of supported heads, each mapped to whether the head reads
            only the first ([CLS]) vector of the last layer.
        base_attr: attribute of a head that holds the base model.
        encoder: base model -> the module whose ``forward(hidden, mask, ...)`` runs the layers.
        layers: base model -> one ``LayerParts`` per layer application (L entries).
        enter: optional ``(encoder, hidden) -> hidden`` run before the first layer.
    """

    name: str
    model_types: tuple[str, ...]
    base_classes: tuple[str, ...]
    head_classes: dict[str, bool]
    base_attr: str
    encoder: Callable[[nn.Module], nn.Module]
    layers: Callable[[nn.Module], list[LayerParts]]
    enter: Callable | None = None


def _bert_layers(base: nn.Module) -> list[LayerParts]:
    parts = []
    for layer in base.encoder.layer:
        attention = layer.attention
        parts.append(
            LayerParts(
                query=attention.self.query,
                key=attention.self.key,
                value=attention.self.value,
                num_heads=attention.self.num_attention_heads,
                probs_dropout=attention.self.dropout,
                attn_out=attention.output.dense,
                attn_dropout=attention.output.dropout,
                attn_norm=attention.output.LayerNorm,
                ffn_in=layer.intermediate.dense,
                ffn_act=layer.intermediate.intermediate_act_fn,
                ffn_out=layer.output.dense,
                ffn_dropout=layer.output.dropout,
                ffn_norm=layer.output.LayerNorm,
            )
        )
    return parts


BERT = Family(
    name="BERT",
    model_types=("bert",),
    base_classes=("BertModel",),
    head_classes={"BertForSequenceClassification": True, "BertForMultipleChoice": True},
    base_attr="bert",
    encoder=lambda base: base.encoder,
    layers=_bert_layers,
)

FAMILIES: tuple[Family, ...] = (BERT,)


def supported_models() -> list[str]:
    """Class names ``patch`` accepts, bare models first."""
    names = []
    for family in FAMILIES:
        names += list(family.base_classes) + list(family.head_classes)
    return names


def resolve(model: nn.Module) -> tuple[Family, nn.Module, bool]:
    """Find the family of ``model`` and its base encoder model.

    Returns:
        (family, base_model, cls_only_head): ``cls_only_head`` is True for heads that read only
        the [CLS] vector of the last layer (False for the bare model, whose
        ``last_hidden_state`` exposes every survivor).

    Raises:
        TypeError: the model's class or head is not supported, or it is configured as a decoder.
    """
    cls_name = type(model).__name__
    for family in FAMILIES:
        if cls_name in family.base_classes:
            base, cls_only = model, False
        elif cls_name in family.head_classes:
            base, cls_only = getattr(model, family.base_attr), family.head_classes[cls_name]
        else:
            continue
        config = base.config
        if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
            raise TypeError(
                f"{cls_name} is configured as a decoder (is_decoder/add_cross_attention); PoWER-BERT "
                f"elimination applies to bidirectional encoders only"
            )
        return family, base, cls_only
    raise TypeError(
        f"powerbert does not support {cls_name}: elimination needs a sequence-level output. "
        f"Supported models: {', '.join(supported_models())}"
    )
