"""What ``powerbert calibrate`` compares a patched model with the stock one on.

``EmbeddingTarget``: a ``SentenceTransformer``, scored per text by the cosine similarity of its
embedding to the stock embedding. ``ClassifierTarget``: a Hugging Face sequence classifier, scored
per text 1 where the predicted class is unchanged, else 0. Both run texts as ``encode`` runs them
(sorted by length, batches padded to their longest) and give the lengths and order the ideals need.
"""
from __future__ import annotations

import numpy as np
import torch

from powerbert.elimination.families import resolve
from powerbert.sentence_models import hf_model, is_sentence_model


class EmbeddingTarget:
    """A ``SentenceTransformer``: per-text score = cosine similarity to the stock embedding."""

    metric = "cosine"

    def __init__(self, model, batch_size: int = 32):
        self.model = model
        self.batch_size = batch_size
        self.hf = hf_model(model)

    @property
    def max_length(self) -> int:
        """N: the tokens ``encode`` keeps of a text."""
        return self.model.max_seq_length

    def outputs(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, batch_size=self.batch_size, convert_to_tensor=True,
                                 normalize_embeddings=True, show_progress_bar=False).float().cpu()

    @staticmethod
    def scores(stock: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        return (stock * patched).sum(dim=1).clamp(-1.0, 1.0)

    def lengths(self, texts: list[str]) -> list[int]:
        lengths = []
        for start in range(0, len(texts), 256):
            features = self.model.preprocess(texts[start:start + 256])
            lengths += features["attention_mask"].sum(dim=1).tolist()
        return lengths

    def order(self, texts: list[str]) -> np.ndarray:
        """The order ``encode`` runs texts in (its own sort key: longest first by characters)."""
        return np.argsort([-len(text) for text in texts])


class ClassifierTarget:
    """A Hugging Face sequence classifier: per-text score = 1 if the predicted class is unchanged.

    Texts run like ``encode`` runs them: sorted by length, in batches padded to their longest.
    """

    metric = "agreement"

    def __init__(self, model, tokenizer, batch_size: int = 32, max_length: int | None = None):
        if getattr(model.config, "num_labels", 0) < 2:
            raise ValueError("calibrating a classifier compares predicted classes: the model needs num_labels >= 2 "
                             f"(it has {getattr(model.config, 'num_labels', None)})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or min(getattr(tokenizer, "model_max_length", 512), 512)
        self.hf = model

    def _encode(self, texts):
        return self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")

    def outputs(self, texts: list[str]) -> torch.Tensor:
        order = self.order(texts)
        device = next(self.model.parameters()).device
        predictions = torch.empty(len(texts), dtype=torch.long)
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                index = order[start:start + self.batch_size]
                inputs = self._encode([texts[i] for i in index]).to(device)
                predictions[torch.as_tensor(index)] = self.model(**inputs).logits.argmax(dim=-1).cpu()
        return predictions

    @staticmethod
    def scores(stock: torch.Tensor, patched: torch.Tensor) -> torch.Tensor:
        return (stock == patched).float()

    def lengths(self, texts: list[str]) -> list[int]:
        return [len(ids) for ids in self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]]

    def order(self, texts: list[str]) -> np.ndarray:
        return np.argsort([-len(text) for text in texts])


def target_for(model, tokenizer=None, *, batch_size: int = 32, max_length: int | None = None):
    """The comparison for ``model``: embeddings (SentenceTransformer) or predictions (classifier)."""
    if is_sentence_model(model):
        if type(model).__name__ == "CrossEncoder":
            raise TypeError("calibrate compares embeddings (SentenceTransformer) or predicted classes "
                            "(a Hugging Face sequence classifier); a CrossEncoder's scores are neither")
        if max_length is not None:
            model.max_seq_length = max_length
        return EmbeddingTarget(model, batch_size)
    _, base, cls_only = resolve(model)
    if base is model or not cls_only:
        raise TypeError(f"calibrate needs a SentenceTransformer or a sequence classifier, got {type(model).__name__}; "
                        f"wrap a bare encoder in a SentenceTransformer (mean pooling)")
    if tokenizer is None:
        raise ValueError("calibrating a classifier needs its tokenizer")
    return ClassifierTarget(model, tokenizer, batch_size, max_length)


def num_layers(target) -> int:
    """Layer applications of the model ``target`` compares (one retention entry each)."""
    family, base, _ = resolve(target.hf)
    return len(family.layers(family.encoder(base)))
