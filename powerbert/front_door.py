"""The front door: ``powerbert.patch`` / ``powerbert.unpatch`` on any supported model, in place.

A sentence-transformers ``SentenceTransformer`` or ``CrossEncoder`` goes to
``powerbert/sentence_models.py``, which patches the Hugging Face model inside it; any other model
to the hard extract (``powerbert/elimination/hard_extract.py``). Patching replaces two instance
attributes (``powerbert/elimination/forwards.py``): the ``forward`` of the model's encoder and that
of its base model. Weights, modules and classes are untouched, so ``state_dict``,
``save_pretrained``, ``copy.deepcopy``, ``torch.save`` and quantisation work as on the stock model,
and ``unpatch`` (which restores both attributes and the config) is exact.
"""
from __future__ import annotations

from torch import nn

from powerbert import sentence_models
from powerbert.elimination.hard_extract import HardExtract, hard_extract_of, install_hard_extract, remove_hard_extract


def is_patched(model: nn.Module) -> bool:
    """True if ``powerbert.patch`` has been applied to ``model`` (or the model holding it) and not undone."""
    if sentence_models.is_sentence_model(model):
        return sentence_models.is_sentence_patched(model)
    return hard_extract_of(model) is not None


def patch(model: nn.Module, retention=None, *, cls_only_last_layer: bool = True,
          selection: str | None = None, static_shapes: bool | None = None, retention_min=None,
          pool_eliminated: bool | None = None, cuda_graphs: bool = True) -> nn.Module:
    """Make ``model`` eliminate word vectors (PoWER-BERT), in place.

    Args:
        model: a supported Hugging Face model (``powerbert.supported_models()``), any
            ``attn_implementation``; it is modified in place. A sentence-transformers
            ``SentenceTransformer`` or ``CrossEncoder`` holding one is patched through it
            (``powerbert/sentence_models.py``).
        retention: one entry per encoder layer, non-increasing. Ints >= 1 (fixed):
            ``retention[l]`` word vectors survive layer ``l + 1``'s attention in every sequence.
            Floats in (0, 1] (proportional, powerbert/ALGORITHM.md §8): sequence i keeps
            ``min(k_{l-1,i}, max(m_l, ceil(f_l * len_i)))`` of its len_i real tokens. None reads
            ``model.config.powerbert_retention`` (stored by an earlier patch + ``save_pretrained``).
        retention_min: proportional only: the per-layer minimum m_l, an int >= 1 or one per
            layer (default 1). None reads ``model.config.powerbert_retention_min`` if present.
        cls_only_last_layer: for heads that read only [CLS] (sequence classification, multiple
            choice), compute the last layer for [CLS] alone. Lossless; ignored for bare models,
            whose ``last_hidden_state`` returns the k_L survivors.
        selection: ``"attention"`` (PoWER-BERT, the default) or the paper's ablations
            ``"first"`` (Head-WS) and ``"random"`` (Rand-WS). None reads
            ``model.config.powerbert_selection`` if present, else ``"attention"``. An ablation
            strategy is stored in the config (``powerbert_selection``) so it survives
            ``save_pretrained``.
        static_shapes: the token layout (``powerbert/elimination/layout.py``). Every layout moves each row's
            real tokens to the front (left padding works like right padding). Dynamic
            (``False``) also drops the columns that are padding in every row, so inputs padded
            to ``max_length`` cost what dynamically padded ones cost, at one host
            synchronisation per forward and output lengths that follow the batch. Static
            (``True``) keeps the input's shape: no synchronisation, for CUDA graphs and
            ``torch.compile``. None (default, CPU and CUDA): dynamic, static while
            ``torch.compile`` traces or a CUDA graph is captured.
        pool_eliminated: ``SentenceTransformer`` only: the pooling reads every real token's last
            vector (an eliminated token's as it entered the layer that dropped it) instead of the
            survivors alone; the same work, more of the text in the embedding. Stored in the
            config (``powerbert_pool_eliminated``) so it survives ``model.save``; None reads it
            from there (default False).
        cuda_graphs: on CUDA in fp16/bf16, inference runs the packed (varlen) forward
            (``powerbert/elimination/packed.py``) and replays it from a pool of CUDA graphs,
            one per shape bucket, captured the first time a bucket is met
            (``powerbert/elimination/packed_graphs.py``). False runs the packed forward eagerly.

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
    options = dict(cls_only_last_layer=cls_only_last_layer, selection=selection, static_shapes=static_shapes,
                   retention_min=retention_min, cuda_graphs=cuda_graphs)
    if sentence_models.is_sentence_model(model):
        return sentence_models.patch_sentence(model, retention, pool_eliminated=pool_eliminated, **options)
    if pool_eliminated:
        raise TypeError(f"pool_eliminated is for a SentenceTransformer's pooling; {type(model).__name__} has none")
    return install_hard_extract(model, retention, **options)


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch`` exactly: the encoder's and base model's forwards and the config as before.

    ``model`` may be the patched model or the base model inside it.

    Raises:
        RuntimeError: the model is not patched.
    """
    if sentence_models.is_sentence_model(model):
        return sentence_models.unpatch_sentence(model)
    return remove_hard_extract(model)


def patch_state(model: nn.Module) -> HardExtract:
    """What a patched model runs with (``.retention``, ``.selection``, ``.cls_only_last_layer``)."""
    if sentence_models.is_sentence_model(model):
        return sentence_models.sentence_patch_state(model)
    state = hard_extract_of(model)
    if state is None:
        raise RuntimeError("model is not patched by powerbert")
    return state


def patched_retention(model: nn.Module) -> tuple:
    """The retention configuration a patched model runs with."""
    return patch_state(model).retention
