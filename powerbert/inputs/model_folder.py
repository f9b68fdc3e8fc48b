"""A Hugging Face model folder: read its config, check it before anything loads it, load it.

``check_model_dir`` is the one check of a folder (config, supported architecture, weights,
tokenizer files, N within its positions) that the pre-flight checks, ``load_model`` and
``load_tokenizer`` share; every failure is a one-line SystemExit or ValueError.
``load_for_calibration`` loads what ``powerbert calibrate`` compares: a sentence-transformers
model or a sequence classifier.
"""
from __future__ import annotations

import json
from pathlib import Path

from powerbert.inputs import examples as D
from powerbert.inputs.checks import check_int

# The N a model was trained at, recorded in its config (``evaluate`` reads it back).
MAX_LENGTH_KEY = "powerbert_max_length"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
VOCABULARY_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                    "tokenizer.model")


def supported_model_types() -> list[str]:
    """Every ``model_type`` (as in ``config.json``) that a family in ``powerbert.elimination.families`` covers."""
    from powerbert.elimination.families import FAMILIES  # torch: only once a folder is checked

    return [t for family in FAMILIES for t in family.model_types]


def read_model_config(path) -> dict:
    """``config.json`` of a model folder as a dict (SystemExit / ValueError with a one-line message)."""
    if path is None:
        raise SystemExit("no model folder given: pass --model DIR (a local Hugging Face model folder)")
    path = Path(path)
    if not path.is_dir():
        raise SystemExit(f"model folder not found: {path}")
    file = path / "config.json"
    if not file.is_file():
        raise SystemExit(f"{path} is not a Hugging Face model folder (no config.json)")
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as error:
        raise ValueError(f"{file} is not a readable JSON file ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file} holds a {type(config).__name__}, not a model configuration")
    return config


def max_positions(config: dict) -> int | None:
    """Input length N a model accepts: ``max_position_embeddings``, less RoBERTa's offset.

    RoBERTa and XLM-R number positions from ``pad_token_id + 1`` (2 with their usual pad id 1),
    so 514 position embeddings hold 512 tokens.
    """
    positions = config.get("max_position_embeddings")
    if not isinstance(positions, int):
        return None
    if config.get("model_type") in ("roberta", "xlm-roberta"):
        pad = config.get("pad_token_id")
        positions -= (pad if isinstance(pad, int) else 1) + 1
    return positions


def default_max_length(config: dict) -> int:
    """N to run a saved model at when none is given: the N it was trained at
    (``powerbert_max_length``), else 128 or the model's positions if fewer."""
    return config.get(MAX_LENGTH_KEY) or min(128, max_positions(config) or 128)


def check_model_dir(path, *, max_length: int | None = None, weights: bool = True, tokenizer: bool = True) -> Path:
    """Check a model folder before anything loads it; returns it as a Path.

    Checks: the folder and its ``config.json`` exist; its ``model_type`` is one powerbert
    supports; weights (``WEIGHT_FILES``) and tokenizer files (``VOCABULARY_FILES``, or any
    ``*.model``) are there; ``max_length`` fits its positions (``max_positions``).

    Raises:
        SystemExit (missing folder or config.json) or ValueError, each with a one-line message.
    """
    config = read_model_config(path)
    path = Path(path)
    model_type = config.get("model_type")
    if model_type not in supported_model_types():
        raise ValueError(f"powerbert does not support model_type {model_type!r} ({path / 'config.json'}); "
                         f"supported: {', '.join(supported_model_types())}")
    if config.get("is_decoder") or config.get("add_cross_attention"):
        raise ValueError(f"{path / 'config.json'} configures a decoder (is_decoder/add_cross_attention); "
                         f"PoWER-BERT elimination applies to bidirectional encoders only")
    if weights and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ValueError(f"{path} holds no model weights (none of {', '.join(WEIGHT_FILES)})")
    if tokenizer and not (any((path / name).is_file() for name in VOCABULARY_FILES) or any(path.glob("*.model"))):
        raise ValueError(f"{path} holds no tokenizer files (none of {', '.join(VOCABULARY_FILES)}); "
                         f"copy the pretrained model's tokenizer files into it")
    check_max_length(config, max_length, path)
    return path


def check_max_length(config: dict, max_length: int | None, where) -> None:
    """The one check of N against a model: an int >= 2 ([CLS] and one token) within its positions
    (``max_positions``); None passes. ``where`` names the model in the message (its folder).

    Raises:
        ValueError: one line naming the limit.
    """
    check_int("max_length (--max-length)", max_length, 2, optional=True)
    limit = max_positions(config)
    if max_length is not None and limit is not None and max_length > limit:
        raise ValueError(f"max_length (--max-length) {max_length} exceeds the {limit} positions of the model "
                         f"in {where} (max_position_embeddings {config['max_position_embeddings']}); "
                         f"use at most {limit}")


def load_model(path, labels: D.LabelSpace | None = None, max_length: int | None = None):
    """A sequence-classification model from a local folder (offline), configured for ``labels``.

    Raises:
        ValueError: the folder fails ``check_model_dir``, cannot be loaded, or holds a model
            powerbert does not support (one-line messages).
    """
    from transformers import AutoModelForSequenceClassification

    from powerbert.elimination.families import resolve

    path = check_model_dir(path, tokenizer=False)
    kwargs = {"local_files_only": True}
    if labels is not None:
        kwargs["num_labels"] = labels.num_labels
        kwargs["problem_type"] = "regression" if labels.regression else "single_label_classification"
        kwargs["ignore_mismatched_sizes"] = True  # a checkpoint's head for another label set is re-initialised
        if not labels.regression:
            kwargs["id2label"] = dict(enumerate(labels.names))
            kwargs["label2id"] = {name: i for i, name in enumerate(labels.names)}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load the model in {path}: {_one_line(error)}") from None
    try:
        resolve(model)  # fail early, with the list of supported models
    except TypeError as error:
        raise ValueError(f"{path}: {error}") from None
    if max_length is not None:
        setattr(model.config, MAX_LENGTH_KEY, max_length)
    return model


def label_space_from_config(config) -> D.LabelSpace:
    """The label space a saved model was configured for (by ``load_model``): its
    ``problem_type`` and ``id2label``."""
    if getattr(config, "problem_type", None) == "regression":
        return D.LabelSpace(regression=True)
    return D.LabelSpace(regression=False, names=tuple(config.id2label[i] for i in range(config.num_labels)))


def load_tokenizer(path):
    """The tokenizer of a local model folder (offline).

    Raises:
        ValueError: the folder fails ``check_model_dir`` or its tokenizer cannot be loaded
            (one-line messages).
    """
    from transformers import AutoTokenizer

    path = check_model_dir(path, weights=False)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load the tokenizer in {path}: {_one_line(error)}") from None


def _one_line(error) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines) or type(error).__name__


def load_for_calibration(path, *, device: str | None = None, max_length: int | None = None):
    """``(model, tokenizer)`` from a local folder: a sentence-transformers folder (``modules.json``)
    or a plain encoder folder as a ``SentenceTransformer`` (mean pooling), or a sequence classifier
    (``*ForSequenceClassification`` in ``config.json``'s ``architectures``) with its tokenizer."""
    import torch

    path = check_model_dir(path, max_length=max_length)
    config = read_model_config(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    architectures = config.get("architectures") or []
    if not (path / "modules.json").is_file() and any(a.endswith("ForSequenceClassification") for a in architectures):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device).eval()
        return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError(f"{path} is an embedding model: calibrating it needs sentence-transformers "
                         f"(pip install sentence-transformers)") from None
    return SentenceTransformer(str(path), device=device, local_files_only=True), None
