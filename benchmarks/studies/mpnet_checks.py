"""``patch`` / ``unpatch`` on the real all-mpnet-base-v2 weights (issue 22), not only tiny configs.

    python -m benchmarks.studies.mpnet_checks --out benchmarks/results/mpnet_real_weights.md

After ``make mpnet``. On real sentences, for ``AutoModel`` (``MPNetModel``), ``MPNetForSequenceClassification``
(a seeded random head on the real encoder) and the ``SentenceTransformer`` folder itself:

- keep-all retention equals stock (largest absolute difference of the outputs, fp32);
- with elimination (fixed and proportional): a padded batch equals each text alone (per-row
  selection does not depend on batch-mates; largest difference), and left padding equals right
  padding (MPNet numbers positions after its padding id, so the stock model agrees with itself);
- ``unpatch`` gives the stock outputs back bit for bit.

Each number is written with the tolerance it is held to; the command exits 1 if one fails.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from powerbert.inputs.files import write_text_atomic

TEXTS = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "A tedious, overlong mess that never finds its footing and wastes a fine cast.",
    "Stocks fell sharply on Monday after the central bank raised interest rates again, the third rise this year.",
    "ok",
    "Great acting, weak script.",
]
FIXED = [40, 36, 32, 28, 24, 20, 16, 12, 10, 8, 6, 4]
PROPORTIONAL = [1.0, 0.9, 0.8, 0.7, 0.6, 0.55, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25]
TOLERANCE = {"keep-all vs stock": 1e-4, "batch vs each text alone": 1e-4, "left vs right padding": 1e-4,
             "unpatch vs stock": 0.0}


def main(argv=None) -> int:
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer, MPNetForSequenceClassification

    import powerbert
    from powerbert.inputs.mpnet_weights import mpnet_folder

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    folder = str(mpnet_folder(Path(args.data_dir)))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    models = {"MPNetModel (AutoModel)": AutoModel.from_pretrained(folder).eval(),
              "MPNetForSequenceClassification": MPNetForSequenceClassification.from_pretrained(folder, num_labels=3).eval()}
    sentence = SentenceTransformer(folder, device="cpu")

    def hf_out(model, texts, side="right"):
        tokenizer.padding_side = side
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        tokenizer.padding_side = "right"
        with torch.no_grad():
            out = model(**batch)
        if hasattr(out, "logits"):
            return out.logits
        # bare: survivors in input order per row (kept_mask), mean-pooled so rows of any width compare
        hidden = out.last_hidden_state
        mask = out["kept_mask"] if "kept_mask" in out else batch["attention_mask"].bool()
        return (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)

    def st_out(model, texts, side="right"):
        model.tokenizer.padding_side = side
        try:
            return model.encode(texts, convert_to_tensor=True, batch_size=len(texts))
        finally:
            model.tokenizer.padding_side = "right"

    rows = []

    def check(name, what, retention, value):
        rows.append(dict(model=name, check=what, retention=retention, max_abs_diff=float(value),
                         tolerance=TOLERANCE[what], ok=float(value) <= TOLERANCE[what]))
        print(rows[-1], flush=True)

    subjects = [(name, model, hf_out) for name, model in models.items()] + [("SentenceTransformer", sentence, st_out)]
    for name, model, run in subjects:
        stock = run(model, TEXTS)
        powerbert.patch(model, [1.0] * 12)
        check(name, "keep-all vs stock", "keep-all", (run(model, TEXTS) - stock).abs().max())
        powerbert.unpatch(model)
        for label, retention in (("fixed", FIXED), ("proportional", PROPORTIONAL)):
            powerbert.patch(model, retention)
            batch = run(model, TEXTS)
            alone = torch.cat([run(model, [text]) for text in TEXTS])
            check(name, "batch vs each text alone", label, (batch - alone).abs().max())
            check(name, "left vs right padding", label, (run(model, TEXTS, "left") - batch).abs().max())
            powerbert.unpatch(model)
        check(name, "unpatch vs stock", "after unpatch", (run(model, TEXTS) - stock).abs().max())
    lines = ["# patch / unpatch on the real all-mpnet-base-v2 weights", "",
             f"`python -m benchmarks.studies.mpnet_checks` on {len(TEXTS)} sentences; fixed {tuple(FIXED)}, "
             f"proportional {tuple(PROPORTIONAL)}; fp32, CPU. Bare model: mean of each row's survivors "
             "(its `last_hidden_state` holds survivors); classifier: logits of a seeded random 3-class head; "
             "SentenceTransformer: `encode`.", "",
             "| model | check | retention | max abs diff | tolerance | ok |", "|---|---|---|---:|---:|---|"]
    lines += [f"| {r['model']} | {r['check']} | {r['retention']} | {r['max_abs_diff']:.2e} | {r['tolerance']:g} | "
              f"{'yes' if r['ok'] else '**no**'} |" for r in rows]
    out = Path(args.out)
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
