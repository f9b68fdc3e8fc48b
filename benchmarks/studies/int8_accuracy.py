"""What int8 costs on top of elimination: test accuracy of saved classifiers in fp32 and int8,
torch and ONNX Runtime.

    python -m benchmarks.studies.int8_accuracy --model work/mr/finetune --model work/mr \\
        --data data/mr_test.csv --out benchmarks/results/int8_accuracy.md

For each model folder (patched from its ``config.json`` when it holds ``powerbert_retention``, as
``powerbert evaluate`` runs it): torch fp32, torch int8 (``torch.ao.quantization.quantize_dynamic``)
of every ``nn.Linear`` ("all") and with the outlier input channels of the FFN output projections
split off in fp32 (the library's default, ``powerbert.deployment.split_outlier_channels``), ONNX
Runtime fp32 and the same two int8 variants (``powerbert export``, ``--quantize int8`` with and
without ``--int8-all``). Texts are sorted by token count and batched with dynamic padding
(``--batch-size``, one or several sizes); the accuracy is over every row of ``--data``, with its delta to the first model's torch fp32 in points, and the
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
# "int8" without "all": the FFN outlier channels split off in fp32 (the library's default)
WORK = Path(__file__).resolve().parents[2] / "work" / "int8-accuracy-onnx"  # the exported files (ignored by git)
BATCH = 64


def torch_classes(model):
    """``batch -> [rows] int64 predicted class`` of a torch classifier (a tokenizer's dict batch)."""
    def classes(batch):
        with torch.inference_mode():
            return model(**batch).logits.argmax(-1).numpy()
    return classes


def ort_classes(session, inputs):
    """``batch -> [rows] int64 predicted class`` of an ONNX Runtime session taking ``inputs``."""
    return lambda batch: session.run(None, {k: batch[k].numpy() for k in inputs})[0].argmax(-1)


def predictions(model_dir: Path, texts: list[str], work: Path, max_length: int,
                batch_sizes=(BATCH,)) -> dict[tuple[str, int], np.ndarray]:
    """``{(variant, batch size): [rows] int64 predicted class}`` for every variant (``VARIANTS``)
    of one model folder and every batch size: texts sorted by token count (longest first, as
    the deploy benchmark does), each batch padded to its longest (dynamic int8 scales follow the batch)."""
    import onnxruntime as ort

    tokenizer = load_tokenizer(model_dir)
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    batchings = {size: [(order[s:s + size], tokenizer([texts[i] for i in order[s:s + size]], padding=True,
                                                       truncation=True, max_length=max_length, return_tensors="pt"))
                        for s in range(0, len(texts), size)] for size in batch_sizes}
    model = load_model(model_dir).eval()
    if getattr(model.config, "powerbert_retention", None) is not None:
        patch(model)
    runners = {"torch fp32": torch_classes(model),
               "torch int8 all": torch_classes(quantize_torch_int8(model, int8_all=True)),
               "torch int8": torch_classes(quantize_torch_int8(model))}
    work.mkdir(parents=True, exist_ok=True)
    for name, quantize, int8_all in (("ORT fp32", None, False), ("ORT int8 all", "int8", True), ("ORT int8", "int8", False)):
        path = work / f"{model_dir.parent.name}-{model_dir.name}-{name.replace(' ', '-')}.onnx"  # unique per model
        summary = export_onnx(model_dir, path, quantize=quantize, overwrite=True, int8_all=int8_all)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        runners[name] = ort_classes(session, summary["inputs"])
    out = {}
    for name, classes in runners.items():
        for size, batches in batchings.items():
            pred = np.zeros(len(texts), dtype=np.int64)
            for index, batch in batches:
                pred[index] = classes(batch)
            out[name, size] = pred
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="a classifier folder (repeat)")
    parser.add_argument("--data", required=True, help="labelled test rows (.csv/.tsv/.jsonl)")
    parser.add_argument("--out", required=True, help="the Markdown report (a .json is written beside it)")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, nargs="+", default=[BATCH],
                        help=f"texts per batch; several sizes: one row per variant and size (default {BATCH})")
    args = parser.parse_args(argv)
    if min(args.batch_size) < 1:
        parser.error(f"--batch-size must be >= 1, got {min(args.batch_size)}")
    torch.set_num_threads(args.threads)
    examples = D.load_examples(args.data)
    out = Path(args.out)
    rows, reference = [], None
    for folder in map(Path, args.model):
        config = AutoConfig.from_pretrained(folder, local_files_only=True)  # the labels, without the weights
        targets = label_space_from_config(config).encode(examples.labels, examples.where).numpy()
        preds = predictions(folder, examples.texts, WORK, args.max_length, tuple(args.batch_size))
        config = getattr(config, "powerbert_retention", None)
        for variant in VARIANTS:
            for size in args.batch_size:
                accuracy = float((preds[variant, size] == targets).mean())
                reference = accuracy if reference is None else reference  # the first model's torch fp32
                rows.append(dict(model=str(folder), configuration=config, variant=variant, batch_size=size,
                                 accuracy=accuracy, delta_points=100 * (accuracy - reference),
                                 agreement_with_fp32=float((preds[variant, size] == preds["torch fp32", size]).mean())))
    lines = ["# Test accuracy: fp32 and int8, torch and ONNX Runtime", "",
             f"`python -m benchmarks.studies.int8_accuracy` on {len(examples)} rows of `{args.data}`, batches of "
             f"{' / '.join(map(str, args.batch_size))} texts sorted by token count, each padded to its longest; "
             "delta in points to the first model's torch fp32; agreement = predictions equal to the same model's "
             "torch fp32 at the same batch size. int8 all: every projection in int8 whole; int8: the outlier input "
             "channels of the FFN output projections split off in fp32 (the library's default, "
             "`powerbert.deployment.split_outlier_channels`).", "",
             "| model | configuration | variant | batch | accuracy | delta | agreement with its fp32 |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['configuration'] or 'stock'} | {r['variant']} | {r['batch_size']} | "
              f"{100 * r['accuracy']:.2f} | {r['delta_points']:+.2f} | {100 * r['agreement_with_fp32']:.1f}% |"
              for r in rows]
    write_text_atomic(out, "\n".join(lines) + "\n")
    write_text_atomic(out.with_suffix(".json"), json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
