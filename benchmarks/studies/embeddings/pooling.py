"""Mean pooling of the survivors alone, or of every token's last vector (``pool_eliminated``)?

    python -m benchmarks.studies.embeddings.pooling --model data/all-mpnet-base-v2 \\
        --out benchmarks/results/embeddings_pooling_mpnet.md

Issue 22, item 4: a patched ``SentenceTransformer`` mean-pools its last layer's survivors; with
``powerbert.patch(..., pool_eliminated=True)`` it pools every real token's last vector instead
(an eliminated token's vector as it entered the layer that dropped it), at the same work. For
each configuration of the calibration family (``powerbert.calibrate.family_configuration``:
``f_l = a * (b / a) ** ((l - 1) / (L - 1))``), both poolings' cosine to the stock embedding on the
same movie-review sentences (seeded sample), no re-training: mean, 5th percentile and minimum.
The same configuration does the same work either way, so this is accuracy at equal speed.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

from benchmarks.studies.data import labelled_texts
from powerbert.inputs.files import write_text_atomic

SHARES = ((1.0, 0.7), (1.0, 0.5), (0.9, 0.5), (0.8, 0.3), (0.7, 0.2), (0.6, 0.1))


def main(argv=None) -> int:
    from sentence_transformers import SentenceTransformer

    import powerbert
    from powerbert.calibrate import family_configuration

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a SentenceTransformer folder")
    parser.add_argument("--out", required=True, help="the Markdown report (a .json beside it)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--texts", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    examples = labelled_texts("movie_reviews", Path(args.data_dir))
    random.Random(args.seed).shuffle(examples)
    texts = [text for text, _ in examples[:args.texts]]
    model = SentenceTransformer(args.model, device="cpu")
    layers = model[0].auto_model.config.num_hidden_layers

    def encode():
        return model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False)

    stock = encode()
    rows = []
    for a, b in SHARES:
        retention = list(family_configuration(a, b, layers))
        for pool in (False, True):
            powerbert.patch(model, retention, pool_eliminated=pool)
            try:
                cosine = (encode() * stock).sum(1).double()
            finally:
                powerbert.unpatch(model)
            rows.append(dict(a=a, b=b, retention=retention, pooling="every token's last vector" if pool else "survivors",
                             cosine_mean=float(cosine.mean()), cosine_p05=float(torch.quantile(cosine, 0.05)),
                             cosine_min=float(cosine.min())))
            print(rows[-1], flush=True)
    out = Path(args.out)
    lines = ["# Pooling of a patched SentenceTransformer: survivors or every token's last vector", "",
             f"`python -m benchmarks.studies.embeddings.pooling --model {args.model}`: {len(texts)} movie-review "
             f"sentences (seed {args.seed}), cosine of each embedding to stock's, no re-training; "
             f"{layers} layers. Same configuration, same work.", "",
             "| a | b | configuration | pooling | cosine mean | p05 | min |", "|---:|---:|---|---|---:|---:|---:|"]
    lines += [f"| {r['a']:g} | {r['b']:g} | {tuple(r['retention'])} | {r['pooling']} | {r['cosine_mean']:.4f} | "
              f"{r['cosine_p05']:.4f} | {r['cosine_min']:.4f} |" for r in rows]
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps({"model": args.model, "texts": len(texts), "rows": rows},
                                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
