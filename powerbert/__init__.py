"""powerbert: PoWER-BERT progressive word-vector elimination for Hugging Face encoders.

    import powerbert
    powerbert.patch(model, retention=[77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3])

The package is in rooms (the README's layout table): ``elimination/`` is what a patched forward
runs, ``training/`` the three-step pipeline, ``inputs/`` what the commands read and check; at the
top sit the front door (``front_door.py``: ``patch``/``unpatch`` on any supported model), the
sentence-transformers integration, CUDA graphs and the commands (``cli``, ``predict``,
``calibrate``, ``demo``).

This face is lazy: a public name imports its module on first use, so ``import powerbert`` and
``powerbert --help`` load neither torch nor transformers.
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "patch": "powerbert.front_door",
    "unpatch": "powerbert.front_door",
    "is_patched": "powerbert.front_door",
    "patched_retention": "powerbert.front_door",
    "patch_state": "powerbert.front_door",
    "supported_models": "powerbert.elimination.families",
    "attach_soft_extract": "powerbert.elimination.soft_extract",
    "SoftExtract": "powerbert.elimination.soft_extract",
    "validate_retention": "powerbert.elimination.retention",
    "vector_ratio": "powerbert.elimination.retention",
    "flops_ideal": "powerbert.elimination.retention",
    "CudaGraphForward": "powerbert.cuda_graph",
}

__all__ = [*_EXPORTS, "__version__"]

# Modules of the flat package before it moved into rooms -> where their code lives now. A model
# saved with ``torch.save(model)`` before the move names classes by their old module (the
# installed forwards, ``HardExtract``, ``SoftExtract``, ``TokenEmbeddingsForward``); these
# aliases keep such files loading, and old imports working.
MOVED_MODULES = {
    "powerbert.encoder": "powerbert.elimination.forwards",
    "powerbert.patch": "powerbert.elimination.hard_extract",
    "powerbert.soft_extract": "powerbert.elimination.soft_extract",
    "powerbert.families": "powerbert.elimination.families",
    "powerbert.retention": "powerbert.elimination.retention",
    "powerbert.layout": "powerbert.elimination.layout",
    "powerbert.layer": "powerbert.elimination.layer",
    "powerbert.ops": "powerbert.elimination.dispatch",
    "powerbert.sentence": "powerbert.sentence_models",
}


class _MovedModule(types.ModuleType):
    """Stands in ``sys.modules`` for a module that moved; its attributes are the new module's.

    It is registered in ``sys.modules`` only, never as an attribute of the package: pickle and
    ``import powerbert.patch`` find it there, while ``powerbert.patch`` stays the function.
    """

    def __init__(self, name: str, target: str):
        super().__init__(name, f"moved to {target}")
        self.__dict__["_target"] = target

    def __getattr__(self, name: str):
        if name.startswith("__"):  # inspect.getmodule probes every module's __file__: never import for it
            raise AttributeError(name)
        return getattr(importlib.import_module(self.__dict__["_target"]), name)

    def __dir__(self):
        return dir(importlib.import_module(self.__dict__["_target"]))


for _old, _new in MOVED_MODULES.items():
    sys.modules.setdefault(_old, _MovedModule(_old, _new))


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'powerbert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
