"""Triton kernels for PoWER-BERT word-vector elimination, each with its eager reference.

Kept cheap and free of side effects on purpose: transformers probes for a top-level
package named ``kernels`` (Hugging Face's hub-kernels package) and may import this one.
Public names are resolved lazily from their modules, so importing ``kernels`` does not
import triton. There is deliberately no ``__version__`` here (it lives in ``powerbert``).
"""
import importlib

# public name -> module that defines it
_EXPORTS = {
    "significance": "kernels.scores",
    "significance_ref": "kernels.scores",
    "select": "kernels.topk",
    "select_ref": "kernels.topk",
    "gather": "kernels.gather_rows",
    "gather_ref": "kernels.gather_rows",
    "extract": "kernels.fused",
    "extract_ref": "kernels.fused",
    "extract_from_scores": "kernels.fused",
    "attention_with_significance": "kernels.attention",
    "attention_with_significance_ref": "kernels.attention",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
