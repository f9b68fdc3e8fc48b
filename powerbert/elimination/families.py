"""Where each supported model family keeps the pieces elimination needs.

One small description per family: how to find the base encoder model inside a head, which
module's forward runs the layers, and, for every layer application, the attention
projections, the attention output norm and the feed-forward sub-layer. ``layer.py`` holds
the one eliminating layer forward that reads these descriptions; a new family is a new
entry here, never a new copy of the forward.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling


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
    # The stock layer module these parts belong to: its ``gradient_checkpointing`` flag and
    # ``_gradient_checkpointing_func`` (set by ``model.gradient_checkpointing_enable()``) apply.
    module: nn.Module | None = None


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
        layers: that encoder module -> one ``LayerParts`` per layer application (L entries).
            Called at every forward, so modules swapped after patching (quantisation,
            adapters) are the ones that run.
        enter: optional ``(encoder, hidden) -> hidden`` run before the first layer.
        position_bias: optional ``(encoder, positions [B, n] int64) -> [B | 1, H, n, n]``, the
            bias every layer adds to its scaled attention logits, from the original positions
            of the vectors that enter it (MPNet's relative-position bias); called per layer.
        base_forward: optional ``(base, **inputs) -> ModelOutput``, run instead of the base
            model's stock forward where that forward does not pass its keyword arguments on to
            the encoder (which is how ``forwards.BaseForward`` reaches it).
        heads_pass_kwargs: whether the heads pass their keyword arguments on to the base model
            (how a [CLS]-only head tells the encoder its last layer may shrink to [CLS]).
    """

    name: str
    model_types: tuple[str, ...]
    base_classes: tuple[str, ...]
    head_classes: dict[str, bool]
    base_attr: str
    encoder: Callable[[nn.Module], nn.Module]
    layers: Callable[[nn.Module], list[LayerParts]]
    enter: Callable | None = None
    position_bias: Callable | None = None
    base_forward: Callable | None = None
    heads_pass_kwargs: bool = True


# Stands in for a dropout a family does not have at that place (ALBERT's FFN output,
# DistilBERT's attention output), so every family fits the one LayerParts layout.
_NO_DROPOUT = nn.Identity()


def _bert_layer_parts(layer: nn.Module) -> LayerParts:
    """BERT layout, shared by RoBERTa, XLM-RoBERTa and ELECTRA (their layers are copies of it)."""
    attention = layer.attention
    return LayerParts(
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
        module=layer,
    )


def _bert_layers(encoder: nn.Module) -> list[LayerParts]:
    return [_bert_layer_parts(layer) for layer in encoder.layer]


def _albert_layer_parts(layer: nn.Module) -> LayerParts:
    # AlbertLayer: full_layer_layer_norm(ffn_output(act(ffn(a))) + a), no dropout on the FFN output.
    attention = layer.attention
    return LayerParts(
        query=attention.query,
        key=attention.key,
        value=attention.value,
        num_heads=attention.num_attention_heads,
        probs_dropout=attention.attention_dropout,
        attn_out=attention.dense,
        attn_dropout=attention.output_dropout,
        attn_norm=attention.LayerNorm,
        ffn_in=layer.ffn,
        ffn_act=layer.activation,
        ffn_out=layer.ffn_output,
        ffn_dropout=_NO_DROPOUT,
        ffn_norm=layer.full_layer_layer_norm,
        module=layer,
    )


def _albert_layers(encoder: nn.Module) -> list[LayerParts]:
    """One entry per layer *application*: ``num_hidden_layers * inner_group_num``.

    ALBERT shares weights: application ``i`` of ``num_hidden_layers`` runs every inner layer of
    group ``int(i / (num_hidden_layers / num_hidden_groups))`` (the index AlbertTransformer
    computes). The same modules recur, but each application gets its own retention entry.
    """
    config = encoder.config
    groups = encoder.albert_layer_groups
    parts = []
    for i in range(config.num_hidden_layers):
        group = groups[int(i / (config.num_hidden_layers / config.num_hidden_groups))]
        parts += [_albert_layer_parts(layer) for layer in group.albert_layers]
    return parts


def _distilbert_layers(encoder: nn.Module) -> list[LayerParts]:
    # TransformerBlock: sa_layer_norm(out_lin(attention) + x), no dropout on the attention output;
    # the extract goes after sa_layer_norm, then output_layer_norm(dropout(lin2(act(lin1(a)))) + a).
    parts = []
    for block in encoder.layer:
        attention, ffn = block.attention, block.ffn
        parts.append(
            LayerParts(
                query=attention.q_lin,
                key=attention.k_lin,
                value=attention.v_lin,
                num_heads=attention.n_heads,
                probs_dropout=attention.dropout,
                attn_out=attention.out_lin,
                attn_dropout=_NO_DROPOUT,
                attn_norm=block.sa_layer_norm,
                ffn_in=ffn.lin1,
                ffn_act=ffn.activation,
                ffn_out=ffn.lin2,
                ffn_dropout=ffn.dropout,
                ffn_norm=block.output_layer_norm,
                module=block,
            )
        )
    return parts


def _albert_enter(encoder: nn.Module, hidden):
    # AlbertTransformer projects the embeddings (embedding_size -> hidden_size) before layer 1.
    return encoder.embedding_hidden_mapping_in(hidden)


# Heads below map to True only where the classifier reads position 0 of the last layer and
# nothing else: BERT/ALBERT pool ``sequence_output[:, 0]``, the RoBERTa/ELECTRA classification
# heads take ``features[:, 0, :]``, DistilBERT's heads ``hidden_state[:, 0]``.
BERT = Family(
    name="BERT",
    model_types=("bert",),
    base_classes=("BertModel",),
    head_classes={"BertForSequenceClassification": True, "BertForMultipleChoice": True},
    base_attr="bert",
    encoder=lambda base: base.encoder,
    layers=_bert_layers,
)

ALBERT = Family(
    name="ALBERT",
    model_types=("albert",),
    base_classes=("AlbertModel",),
    head_classes={"AlbertForSequenceClassification": True, "AlbertForMultipleChoice": True},
    base_attr="albert",
    encoder=lambda base: base.encoder,
    layers=_albert_layers,
    enter=_albert_enter,
)

ROBERTA = Family(
    name="RoBERTa",
    model_types=("roberta", "xlm-roberta"),
    base_classes=("RobertaModel", "XLMRobertaModel"),
    head_classes={
        "RobertaForSequenceClassification": True, "RobertaForMultipleChoice": True,
        "XLMRobertaForSequenceClassification": True, "XLMRobertaForMultipleChoice": True,
    },
    base_attr="roberta",
    encoder=lambda base: base.encoder,
    layers=_bert_layers,
)

DISTILBERT = Family(
    name="DistilBERT",
    model_types=("distilbert",),
    base_classes=("DistilBertModel",),
    head_classes={"DistilBertForSequenceClassification": True, "DistilBertForMultipleChoice": True},
    base_attr="distilbert",
    encoder=lambda base: base.transformer,
    layers=_distilbert_layers,
)

# ElectraForMultipleChoice is left out: its ElectraSequenceSummary reads position 0 only when
# config.summary_type == "first" (the default, but "mean"/"last"/"cls_index" read other rows).
ELECTRA = Family(
    name="ELECTRA",
    model_types=("electra",),
    base_classes=("ElectraModel",),
    head_classes={"ElectraForSequenceClassification": True},
    base_attr="electra",
    encoder=lambda base: base.encoder,
    layers=_bert_layers,
)

def _mpnet_layer_parts(layer: nn.Module) -> LayerParts:
    # MPNetLayer: the output projection ``o`` sits in the self-attention module, its dropout and
    # LayerNorm in MPNetAttention; the FFN is BERT's.
    attention = layer.attention
    return LayerParts(
        query=attention.attn.q,
        key=attention.attn.k,
        value=attention.attn.v,
        num_heads=attention.attn.num_attention_heads,
        probs_dropout=attention.attn.dropout,
        attn_out=attention.attn.o,
        attn_dropout=attention.dropout,
        attn_norm=attention.LayerNorm,
        ffn_in=layer.intermediate.dense,
        ffn_act=layer.intermediate.intermediate_act_fn,
        ffn_out=layer.output.dense,
        ffn_dropout=layer.output.dropout,
        ffn_norm=layer.output.LayerNorm,
        module=layer,
    )


def _mpnet_layers(encoder: nn.Module) -> list[LayerParts]:
    return [_mpnet_layer_parts(layer) for layer in encoder.layer]


@functools.lru_cache(maxsize=None)
def _stock_bucket_count(encoder_class: type) -> int:
    # MPNetEncoder.forward calls compute_position_bias(hidden) with its default num_buckets (32),
    # whatever config.relative_attention_num_buckets says: the patched model uses what stock uses.
    return inspect.signature(encoder_class.compute_position_bias).parameters["num_buckets"].default


def _mpnet_position_bias(encoder: nn.Module, positions):
    """MPNet's relative-position bias over the vectors alive in a layer: ``positions [B, n]``
    int64 (their slots in the input, as stock counts them) -> ``[B | 1, H, n, n]``, entry
    ``[b, h, i, j]`` = ``relative_attention_bias(bucket(pos_j - pos_i))[h]``.

    Stock computes it once from slot indices, ``arange(n)``; after elimination the survivors'
    original positions take their place, so every pair keeps the offset it had in the input.
    Rows that share one position vector (no padding, nothing eliminated yet: an expanded
    ``arange``) get one ``[1, H, n, n]`` bias.
    """
    if positions.shape[0] > 1 and positions.stride(0) == 0:
        positions = positions[:1]
    relative = positions[:, None, :] - positions[:, :, None]  # [B, n_q, n_k]: key minus query, as stock
    buckets = encoder.relative_position_bucket(relative, num_buckets=_stock_bucket_count(type(encoder)))
    return encoder.relative_attention_bias(buckets).permute(0, 3, 1, 2)


def _mpnet_base_forward(base: nn.Module, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                        return_dict=True, output_hidden_states=False, output_attentions=False, **encoder_kwargs):
    """MPNetModel.forward with the keyword arguments passed on to the encoder (stock drops them).

    The mask goes to the encoder as given (``[B, n]``): the patched encoder reads the key mask
    itself, so stock's ``[B, 1, n, n]`` expansion is skipped. ``BaseForward`` asks for no
    hidden states or attentions from here (it fills them) and returns a dict.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("You have to specify exactly one of input_ids or inputs_embeds")
    embedding_output = base.embeddings(input_ids=input_ids, position_ids=position_ids, inputs_embeds=inputs_embeds)
    sequence_output = base.encoder(embedding_output, attention_mask=attention_mask, **encoder_kwargs)[0]
    pooled_output = base.pooler(sequence_output) if base.pooler is not None else None
    return BaseModelOutputWithPooling(last_hidden_state=sequence_output, pooler_output=pooled_output)


# MPNetForMultipleChoice classifies the pooler output, which reads position 0 only;
# MPNetForSequenceClassification's MPNetClassificationHead takes ``features[:, 0, :]``. Both
# call the base model without their **kwargs, so the [CLS]-only flag cannot reach the encoder:
# the last layer runs on every survivor (k_L vectors instead of 1; the outputs are the same).
MPNET = Family(
    name="MPNet",
    model_types=("mpnet",),
    base_classes=("MPNetModel",),
    head_classes={"MPNetForSequenceClassification": True, "MPNetForMultipleChoice": True},
    base_attr="mpnet",
    encoder=lambda base: base.encoder,
    layers=_mpnet_layers,
    position_bias=_mpnet_position_bias,
    base_forward=_mpnet_base_forward,
    heads_pass_kwargs=False,
)

FAMILIES: tuple[Family, ...] = (BERT, ALBERT, ROBERTA, DISTILBERT, ELECTRA, MPNET)


def supported_models() -> list[str]:
    """Class names ``patch`` accepts, bare models first."""
    names = []
    for family in FAMILIES:
        names += list(family.base_classes) + list(family.head_classes)
    return names


def family_named(name: str) -> Family:
    """The family called ``name`` (``Family.name``); patched models store the name, not the
    description, so that they pickle."""
    for family in FAMILIES:
        if family.name == name:
            return family
    raise KeyError(f"no model family named {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


# Wrappers that hold a model without being one: the attribute that holds the model, and the
# call that reaches it, for the error message.
_WRAPPERS = (("module", "model.module"), ("_orig_mod", "model._orig_mod"))


def _supported_class(model: nn.Module) -> tuple[Family, type, bool] | None:
    """The first supported class in ``type(model).__mro__``: (family, class, is_head)."""
    for klass in type(model).__mro__:
        for family in FAMILIES:
            if klass.__name__ in family.base_classes and klass.__module__.startswith("transformers."):
                return family, klass, False
            if klass.__name__ in family.head_classes and klass.__module__.startswith("transformers."):
                return family, klass, True
    return None


def resolve(model: nn.Module) -> tuple[Family, nn.Module, bool]:
    """Find the family of ``model`` and its base encoder model.

    Subclasses of supported classes are accepted. A subclass of a head that overrides
    ``forward`` may read more than [CLS], so it is not treated as a [CLS]-only head.

    Returns:
        (family, base_model, cls_only_head): ``cls_only_head`` is True for heads that read only
        the [CLS] vector of the last layer (False for the bare model, whose
        ``last_hidden_state`` exposes every survivor).

    Raises:
        TypeError: the model's class or head is not supported (a wrapper such as
            ``DataParallel`` is named, with the attribute that holds the model), or it is
            configured as a decoder.
    """
    cls_name = type(model).__name__
    found = _supported_class(model)
    if found is None:
        for attr, access in _WRAPPERS:
            inner = getattr(model, attr, None)
            if isinstance(inner, nn.Module) and _supported_class(inner) is not None:
                raise TypeError(
                    f"{cls_name} wraps the model: patch the model itself, powerbert.patch({access}, ...) "
                    f"(or patch before wrapping)"
                )
        raise TypeError(
            f"powerbert does not support {cls_name}: elimination needs a sequence-level output. "
            f"Supported models: {', '.join(supported_models())}"
        )
    family, klass, is_head = found
    if is_head:
        base = getattr(model, family.base_attr)
        cls_only = family.head_classes[klass.__name__] and type(model).forward is klass.forward
    else:
        base, cls_only = model, False
    config = base.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        raise TypeError(
            f"{cls_name} is configured as a decoder (is_decoder/add_cross_attention); PoWER-BERT "
            f"elimination applies to bidirectional encoders only"
        )
    return family, base, cls_only
