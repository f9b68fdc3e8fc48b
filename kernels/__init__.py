"""Triton kernels for PoWER-BERT word-vector elimination, each with its eager reference.

Kept cheap and free of side effects on purpose: transformers probes for a top-level
package named ``kernels`` (Hugging Face's hub-kernels package) and may import this one.
Public names are resolved lazily from their modules, so importing ``kernels`` does not
import triton. There is deliberately no ``__version__`` here (it lives in ``powerbert``).

One op per file, named after the op it exports (``significance.py`` exports ``significance``), so
a file and its op share a name: ``kernels.significance`` is always the op (the function), and the
file is ``kernels.significance`` in ``sys.modules`` (``from kernels.significance import
significance_ref``, ``importlib.import_module("kernels.significance")``). Write ``from
kernels.<op> import ...`` rather than ``import kernels.<op> as m``, which would bind the function.
"""
import importlib
import sys
import types

# public name -> module that defines it
_EXPORTS = {
    "significance": "kernels.significance",
    "significance_ref": "kernels.significance",
    "select": "kernels.select",
    "select_ref": "kernels.select",
    "onnx_tie_order": "kernels.select",
    "gather": "kernels.gather",
    "gather_ref": "kernels.gather",
    "extract": "kernels.extract",
    "extract_ref": "kernels.extract",
    "extract_from_scores": "kernels.extract",
    "attention_with_significance": "kernels.attention",
    "attention_with_significance_ref": "kernels.attention",
    "varlen_attention": "kernels.varlen_attention",
    "varlen_attention_ref": "kernels.varlen_attention",
    "lse_significance": "kernels.lse_significance",
    "lse_significance_ref": "kernels.lse_significance",
    "select_gather_norm": "kernels.select_gather_norm",
    "select_gather_norm_ref": "kernels.select_gather_norm",
}

__all__ = sorted(_EXPORTS)


class _Ops(types.ModuleType):
    """The package's module type: importing a file never hides the op it is named after.

    The import system sets ``kernels.<file>`` to the file's module after loading it; for a file
    named like its op, that attribute is left to the op (``__getattr__`` below).
    """

    def __setattr__(self, name, value):
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Ops


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
