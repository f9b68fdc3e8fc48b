"""sentence-transformers models: ``powerbert.patch`` on a ``SentenceTransformer`` or a ``CrossEncoder``.

Both hold one (or, under a ``Router``, several) ``Transformer`` modules around a Hugging Face model;
patching patches that model (``powerbert.patch``, so ``config.json`` keeps ``powerbert_retention``
through ``model.save``) and, for sentence embeddings, the module's ``forward``:

* ``SentenceTransformer``: the Hugging Face model is a bare encoder (``BertModel``, ...) whose
  ``last_hidden_state`` becomes the survivors of the last layer. ``TokenEmbeddingsForward``
  (installed as the ``Transformer`` module's instance ``forward``) hands the next modules the
  survivors as ``token_embeddings`` and the survivor mask (``kept_mask``) as ``attention_mask``:
  the ``Pooling`` module's mean, CLS and max read exactly the real survivors, and
  ``encode(..., output_value="token_embeddings")`` returns each text's survivors. The input
  positions of the survivors are in ``features["kept_positions"]``. Pooling modes that depend on
  where a token sits or on how many tokens the text has (``lasttoken``, ``weightedmean``,
  ``mean_sqrt_len_tokens``) and modules that align token vectors with ``input_ids`` (``WordWeights``,
  ``LSTM``, ...) are refused at patch time. With ``pool_eliminated`` the module hands on, instead,
  every real token's last vector (the base model's ``last_vectors``: an eliminated token's vector
  as it entered the layer that dropped it) with the input mask, so the pooling sees the whole text
  at no extra work; the choice is kept in the Hugging Face config (``POOL_ELIMINATED_KEY``).
* ``CrossEncoder``: the model is a sequence-classification head reading [CLS]; its logits keep
  their shape, so patching the head is all it takes (its last layer runs for [CLS] alone).

Nothing here imports ``sentence_transformers`` at module import: ``is_sentence_model`` looks at
class names, so ``powerbert.patch`` can dispatch on any model without it installed.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from powerbert.elimination.families import resolve
from powerbert.elimination.forwards import LAST_VECTORS_KWARG, restore_attribute, saved_attribute
from powerbert.elimination.hard_extract import hard_extract_of, install_hard_extract, remove_hard_extract

SENTENCE_PACKAGE = "sentence_transformers"
KINDS = {"SentenceTransformer": "embedding", "CrossEncoder": "cross-encoder"}
# What a Transformer module must be configured to run for the patched forward to stand in for it.
TEXT_MODALITY = {"embedding": ("forward", "last_hidden_state", "token_embeddings"),
                 "cross-encoder": ("forward", "logits", "scores")}
POOLING_MODES = ("mean", "cls", "max")
# Modules that may follow the Transformer of a patched SentenceTransformer: they read the sentence
# embedding, or token embeddings through their mask only.
FOLLOWERS = ("Pooling", "Normalize", "Dense", "Dropout", "LayerNorm", "Router", "Asym")
POOL_ELIMINATED_KEY = "powerbert_pool_eliminated"  # in the Hugging Face config, only while True


def _sentence_class(model) -> str | None:
    for klass in type(model).__mro__:
        if klass.__name__ in KINDS and klass.__module__.startswith(SENTENCE_PACKAGE + "."):
            return klass.__name__
    return None


def is_sentence_model(model) -> bool:
    """True for a ``sentence_transformers`` ``SentenceTransformer`` or ``CrossEncoder`` (or a subclass)."""
    return _sentence_class(model) is not None


def _transformer_modules(model: nn.Module) -> list[nn.Module]:
    from sentence_transformers.base.modules import Transformer

    return [module for module in model.modules() if isinstance(module, Transformer)]


def _check_modality(module, kind: str) -> None:
    method, output, module_output = TEXT_MODALITY[kind]
    config = getattr(module, "modality_config", None) or {}
    text = config.get("text", {})
    found = (text.get("method"), text.get("method_output_name"), getattr(module, "module_output_name", None))
    if set(config) != {"text"} or found != (method, output, module_output):
        raise TypeError(
            f"powerbert patches a text-only Transformer module that runs model.{method} and reads {output!r} "
            f"into {module_output!r}; this one has modality_config {config} and module_output_name "
            f"{found[2]!r}"
        )


def _check_followers(model: nn.Module, transformers: list[nn.Module]) -> list[nn.Module]:
    """The Pooling modules of an embedding model; TypeError for a module that cannot read survivors."""
    inside = {id(m) for transformer in transformers for m in transformer.modules()}
    poolings = []
    for name, module in model.named_modules():
        if id(module) in inside or module is model or not type(module).__module__.startswith(SENTENCE_PACKAGE + "."):
            continue
        kind = type(module).__name__
        if kind == "Pooling":
            modes = (module.pooling_mode,) if isinstance(module.pooling_mode, str) else tuple(module.pooling_mode)
            bad = [mode for mode in modes if mode not in POOLING_MODES]
            if bad:
                raise TypeError(
                    f"Pooling mode {bad[0]!r} depends on token positions or on the text's token count, which "
                    f"elimination changes; a patched SentenceTransformer pools with {', '.join(POOLING_MODES)}"
                )
            poolings.append(module)
        elif kind not in FOLLOWERS:
            raise TypeError(
                f"module {name} ({kind}) reads token embeddings in ways elimination breaks; a patched "
                f"SentenceTransformer supports Transformer followed by {', '.join(FOLLOWERS)}"
            )
    return poolings


def _model_input_names(model: nn.Module) -> frozenset[str]:
    """The named parameters of the Hugging Face model class's ``forward`` (``input_ids``,
    ``attention_mask``, ...): the features the patched forward passes on (sentence-transformers'
    bookkeeping such as ``modality`` or ``prompt_length`` is not among them)."""
    parameters = inspect.signature(type(model).forward).parameters.values()
    return frozenset(p.name for p in parameters
                     if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))


class TokenEmbeddingsForward:
    """``Transformer.forward`` of a patched ``SentenceTransformer``: the survivors and their mask.

    Writes ``features["token_embeddings"]`` = ``[B, k, D]`` survivors of the last layer (real
    tokens first, in input order), ``features["attention_mask"]`` = ``[B, k]`` survivor mask (the
    input mask's dtype), ``features["kept_positions"]`` = ``[B, k]`` their input positions.

    With ``pool_eliminated``: ``token_embeddings`` = ``[B, n, D]`` every input position's last
    vector (zeros at padding) and ``attention_mask`` the input mask; ``kept_positions`` as above.

    A picklable object, not a closure (like ``encoder.EncoderForward``). Attributes:
        module: the ``Transformer`` module. poolings: the model's ``Pooling`` modules (for
        ``include_prompt``). saved_forward: ``(had_one, value)``, what ``unpatch`` restores.
        pool_eliminated: see above. saved_config: ``(had_one, value)`` of the config key.
    """

    def __init__(self, module: nn.Module, poolings: list[nn.Module], saved_forward: tuple[bool, Any],
                 pool_eliminated: bool = False, saved_config: tuple[bool, Any] = (False, None)):
        self.module = module
        self.poolings = poolings
        self.saved_forward = saved_forward
        self.pool_eliminated = pool_eliminated
        self.saved_config = saved_config

    def __call__(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        if features.get("modality", "text") != "text":
            raise ValueError(f"a patched SentenceTransformer encodes text only, got modality {features['modality']!r}")
        model = self.module.model
        names = _model_input_names(model)
        inputs = {key: value for key, value in {**features, **kwargs}.items() if key in names and key != "return_dict"}
        input_mask = inputs.get("attention_mask")
        pool_all = getattr(self, "pool_eliminated", False)  # objects pickled before it existed: False
        out = model(**inputs, return_dict=True, **({LAST_VECTORS_KWARG: True} if pool_all else {}))
        mask = out["kept_mask"]
        if pool_all:
            vectors = out["last_vectors"]
            mask = (torch.ones(vectors.shape[:2], dtype=torch.bool, device=vectors.device) if input_mask is None
                    else input_mask.bool())
        else:
            vectors = out["last_hidden_state"]
        prompt_length = features.get("prompt_length")
        if prompt_length is not None and self._excludes_prompt() and not pool_all:
            mask = self._drop_prompt(mask, out["kept_positions"], input_mask, prompt_length)
            features["prompt_length"] = 0  # done here: Pooling would count slots, not input positions
        features[self.module.module_output_name] = vectors
        features["attention_mask"] = mask.to(torch.int64 if input_mask is None else input_mask.dtype)
        features["kept_positions"] = out["kept_positions"]
        if getattr(model.config, "output_hidden_states", False) and out.get("hidden_states") is not None:
            features["all_layer_embeddings"] = out["hidden_states"]
        return features

    def _excludes_prompt(self) -> bool:
        flags = {bool(pooling.include_prompt) for pooling in self.poolings}
        if len(flags) > 1:
            raise ValueError("Pooling modules disagree on include_prompt; a patched model needs one setting")
        return flags == {False}

    @staticmethod
    def _drop_prompt(mask, positions, input_mask, prompt_length) -> torch.Tensor:
        """Survivors whose token is one of the first ``prompt_length`` real tokens are not pooled
        (what ``Pooling(include_prompt=False)`` does to the stock mask, on survivors)."""
        length = int(prompt_length[0]) if isinstance(prompt_length, torch.Tensor) else int(prompt_length)
        if input_mask is None:
            rank = positions
        else:  # a token's rank among its row's real tokens, any padding side
            rank = torch.gather(input_mask.long().cumsum(dim=1) - 1, 1, positions)
        return mask & (rank >= length)


def _patched_transformers(model: nn.Module) -> list[nn.Module]:
    return [module for module in _transformer_modules(model) if hard_extract_of(module.model) is not None]


def patch_sentence(model: nn.Module, retention=None, *, pool_eliminated: bool | None = None, **options) -> nn.Module:
    """``powerbert.patch`` for a ``SentenceTransformer`` or ``CrossEncoder`` (see the module docstring).

    Every ``Transformer`` module's Hugging Face model is patched with ``retention`` and
    ``options`` (``powerbert.patch``'s keywords); None reads each model's ``config.json``
    (``powerbert_retention``, written by ``model.save`` after an earlier patch).
    ``pool_eliminated`` (embeddings only): pool every real token's last vector (see
    ``TokenEmbeddingsForward``); None reads ``POOL_ELIMINATED_KEY`` from the config.

    Raises:
        TypeError: no Transformer module, a model or module elimination does not support
            (bare encoders for embeddings, [CLS] heads for cross-encoders), or a pooling mode
            that depends on token positions. RuntimeError: already patched. ValueError: as
            ``powerbert.patch``.
    """
    kind = KINDS[_sentence_class(model)]
    modules = _transformer_modules(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} holds no sentence_transformers Transformer module to patch")
    if _patched_transformers(model):
        raise RuntimeError("model is already patched by powerbert; call powerbert.unpatch(model) first")
    poolings = _check_followers(model, modules) if kind == "embedding" else []
    if pool_eliminated and kind != "embedding":
        raise TypeError("pool_eliminated is for a SentenceTransformer's pooling; a CrossEncoder reads [CLS] alone")
    for module in modules:
        _check_modality(module, kind)
        _, base, cls_only = resolve(module.model)
        if kind == "embedding" and base is not module.model:
            raise TypeError(f"a SentenceTransformer's Transformer must hold a bare encoder model, got "
                            f"{type(module.model).__name__}")
        if kind == "cross-encoder" and not cls_only:
            raise TypeError(f"a CrossEncoder's model must be a head that reads [CLS] alone (sequence "
                            f"classification), got {type(module.model).__name__}")
    done = []
    try:
        for module in modules:
            install_hard_extract(module.model, retention, **options)
            done.append(module)
            if kind == "embedding":
                config = module.model.config
                saved_config = saved_attribute(config, POOL_ELIMINATED_KEY)
                pool = bool(saved_config[1]) if pool_eliminated is None else bool(pool_eliminated)
                if pool:
                    setattr(config, POOL_ELIMINATED_KEY, True)
                elif saved_config[0]:
                    delattr(config, POOL_ELIMINATED_KEY)
                module.forward = TokenEmbeddingsForward(module, poolings, saved_attribute(module, "forward"),
                                                        pool_eliminated=pool, saved_config=saved_config)
    except BaseException:
        for module in done:
            _unpatch_module(module)
        raise
    return model


def _unpatch_module(module: nn.Module) -> None:
    forward = module.__dict__.get("forward")
    if isinstance(forward, TokenEmbeddingsForward):
        restore_attribute(module, "forward", forward.saved_forward)
        # (objects pickled before saved_config existed never set the key)
        restore_attribute(module.model.config, POOL_ELIMINATED_KEY, getattr(forward, "saved_config", (False, None)))
    remove_hard_extract(module.model)


def unpatch_sentence(model: nn.Module) -> nn.Module:
    """Undo ``patch_sentence`` exactly: every Transformer module's forward and model as before."""
    modules = _patched_transformers(model)
    if not modules:
        raise RuntimeError("model is not patched by powerbert; nothing to unpatch")
    for module in modules:
        _unpatch_module(module)
    return model


def is_sentence_patched(model: nn.Module) -> bool:
    return bool(_patched_transformers(model))


def sentence_patch_state(model: nn.Module):
    """The ``HardExtract`` of the (first) patched Transformer module's model."""
    modules = _patched_transformers(model)
    if not modules:
        raise RuntimeError("model is not patched by powerbert")
    return hard_extract_of(modules[0].model)


def hf_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside a sentence-transformers model (the first Transformer module's)."""
    modules = _transformer_modules(model)
    if not modules:
        raise TypeError(f"{type(model).__name__} holds no sentence_transformers Transformer module")
    return modules[0].model
