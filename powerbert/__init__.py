"""powerbert: PoWER-BERT progressive word-vector elimination for Hugging Face encoders.

    import powerbert
    powerbert.patch(model, retention=[77, 63, 56, 53, 43, 40, 36, 24, 18, 14, 11, 3])
"""
from powerbert.cuda_graph import CudaGraphForward
from powerbert.families import supported_models
from powerbert.patch import is_patched, patch, patch_state, patched_retention, unpatch
from powerbert.soft_extract import SoftExtract, attach_soft_extract
from powerbert.retention import flops_ideal, validate_retention, vector_ratio

__version__ = "0.1.0"

__all__ = [
    "patch",
    "unpatch",
    "is_patched",
    "patched_retention",
    "patch_state",
    "supported_models",
    "attach_soft_extract",
    "SoftExtract",
    "validate_retention",
    "vector_ratio",
    "flops_ideal",
    "CudaGraphForward",
    "__version__",
]
