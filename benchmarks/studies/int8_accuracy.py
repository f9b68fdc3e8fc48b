"""What int8 costs on top of elimination: test accuracy of saved classifiers in fp32 and int8,
torch and ONNX Runtime.

    python -m benchmarks.studies.int8_accuracy --model work/mr/finetune --model work/mr \\
        --data data/mr_test.csv --out benchmarks/results/int8_accuracy.md

For each model folder (patched from its ``config.json`` when it holds ``powerbert_retention``, as
``powerbert evaluate`` runs it): torch fp32, torch int8 (``torch.ao.quantization.quantize_dynamic``)
of every ``nn.Linear`` ("all") and with the first layer's FFN output projection kept fp32 (the
library's default, ``powerbert.deployment.first_ffn_out``), ONNX Runtime fp32 and the same two
int8 variants (``powerbert export``, ``--quantize int8`` with and without ``--int8-all``). Texts are sorted by length and batched with dynamic padding; the accuracy is
over every row of ``--data``, with its delta to the first model's torch fp32 in points, and the
agreement of each variant's predictions with that model's own torch fp32.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig

from powerbert.deployment import export_onnx, quantize_torch_int8
from powerbert.inputs import examples as D
from powerbert.inputs.files import write_text_atomic
from powerbert.inputs.model_folder import label_space_from_config, load_model, load_tokenizer
from powerbert.front_door import patch

VARIANTS = ("torch fp32", "torch int8 all", "torch int8", "ORT fp32", "ORT int8 all", "ORT int8")
# "int8" without "all": the first layer's FFN output projection stays fp32 (the library's default)
WORK = Path(__file__).resolve().parents[2] / "work" / "int8-accuracy-onnx"  # the exported files (ignored by git)
BATCH = 64


def predictions(model_dir: Path, texts: list[str], work: Path, max_length: int,
                batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """``{variant: [rows] int64 predicted class}`` for every variant (``VARIANTS``) of one model
    folder, in batches of ``batch_size`` texts (dynamic int8 scales follow the batch)."""
    import onnxruntime as ort

    tokenizer = load_tokenizer(model_dir)
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    batches = [(order[s:s + batch_size], tokenizer([texts[i] for i in order[s:s + batch_size]], padding=True,
                                                     truncation=True, max_length=max_length, return_tensors="pt"))
               for s in range(0, len(texts), batch_size)]
    model = load_model(model_dir).eval()
    if getattr(model.config, "powerbert_retention", None) is not None:
        patch(model)
    out = {}
    for name, m in (("torch fp32", model), ("torch int8 all", quantize_torch_int8(model, int8_all=True)),
                    ("torch int8", quantize_torch_int8(model))):
        pred = np.zeros(len(texts), dtype=np.int64)
        with torch.inference_mode():
            for index, batch in batches:
                pred[index] = m(**batch).logits.argmax(-1).numpy()
        out[name] = pred
    work.mkdir(parents=True, exist_ok=True)
    for name, quantize, int8_all in (("ORT fp32", None, False), ("ORT int8 all", "int8", True), ("ORT int8", "int8", False)):
        path = work / f"{model_dir.name}-{name.replace(' ', '-')}.onnx"
        summary = export_onnx(model_dir, path, quantize=quantize, overwrite=True, int8_all=int8_all)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        pred = np.zeros(len(texts), dtype=np.int64)
        for index, batch in batches:
            logits = session.run(None, {k: batch[k].numpy() for k in summary["inputs"]})[0]
            pred[index] = logits.argmax(-1)
        out[name] = pred
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a classifier folder (repeat)")
    parser.add_argument("--data", required=True, help="labelled test rows (.csv/.tsv/.jsonl)")
    parser.add_argument("--out", required=True, help="the Markdown report (a .json is written beside it)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=BATCH, help=f"texts per batch (default {BATCH})")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    torch.set_num_threads(args.threads)
    examples = D.load_examples(args.data)
    out = Path(args.out)
    rows, reference = [], None
    for folder in map(Path, args.model):
        config = AutoConfig.from_pretrained(folder, local_files_only=True)  # the labels, without the weights
        targets = label_space_from_config(config).encode(examples.labels, examples.where).numpy()
        preds = predictions(folder, examples.texts, WORK, args.max_length, args.batch_size)
        config = getattr(config, "powerbert_retention", None)
        for variant in VARIANTS:
            accuracy = float((preds[variant] == targets).mean())
            reference = accuracy if reference is None else reference
            rows.append(dict(model=str(folder), configuration=config, variant=variant, accuracy=accuracy,
                             delta_points=100 * (accuracy - reference),
                             agreement_with_fp32=float((preds[variant] == preds["torch fp32"]).mean())))
    lines = ["# Test accuracy: fp32 and int8, torch and ONNX Runtime", "",
             f"`python -m benchmarks.studies.int8_accuracy` on {len(examples)} rows of `{args.data}`, batches of "
             f"{args.batch_size} texts sorted by characters; delta in points "
             f"to the first model's torch fp32; agreement = predictions equal to the same model's torch fp32. "
             "int8 all: every projection in int8; int8: the first layer's FFN output projection kept fp32 "
             "(the library's default).", "",
             "| model | configuration | variant | accuracy | delta | agreement with its fp32 |",
             "|---|---|---|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['configuration'] or 'stock'} | {r['variant']} | {100 * r['accuracy']:.2f} | "
              f"{r['delta_points']:+.2f} | {100 * r['agreement_with_fp32']:.1f}% |" for r in rows]
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
