"""The studies that train or calibrate models (the timing suites sit in ``benchmarks/`` itself).

``reproduce/`` is the paper's accuracy/speed trade-off (``make reproduce``), ``embeddings/`` the
sentence-embedding curve; ``data.py`` is the one module that fetches and parses their offline data.
"""
