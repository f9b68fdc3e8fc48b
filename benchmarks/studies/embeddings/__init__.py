"""Sentence embeddings, calibrated without labels: speed vs quality on real offline text.

``python -m benchmarks.studies.embeddings --out benchmarks/results``: for each task (movie reviews, BBC
News, and the NYT editorial and tweet snippets of the vaderSentiment sdist) the offline MiniLM
SentenceTransformer is calibrated (``powerbert.calibrate.search``) on calibration texts at several
cosine thresholds C; every chosen configuration then encodes a disjoint evaluation split, and is
scored against stock ``encode`` (which sorts by length and pads dynamically) on that split:
cosine to the stock embedding, and leave-one-out k-NN classification accuracy with the embeddings
(labels are used only here, to evaluate). Ideal speedups come with every row; wall-clock speedups
only with ``--time-rounds N`` (alternated stock / patched ``encode`` calls, same threads), which
should run on a quiet machine.
"""
