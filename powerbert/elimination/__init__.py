"""The elimination core: what a patched forward runs.

Imports only torch, transformers and ``kernels``: the family table (``families``), retention
(validation, keep counts, every ideal: ``retention``), the token layout (``layout``), the one
eliminating layer forward (``layer``), the forwards ``patch`` installs (``forwards``), the hard and
soft extracts (``hard_extract``, ``soft_extract``) and the one dispatch point into the kernels
(``dispatch``). Nothing is imported here, so ``import powerbert.elimination.retention`` stays cheap.
"""
