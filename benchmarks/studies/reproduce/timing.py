"""Timed inference passes over a test split.

Two ways to batch the same examples with one fixed batch size:

- ``padded``: the split in its fixed order, every input padded to N (the paper's setting);
- ``dynamic``: sorted by length (stable), each batch cut to its longest input (the honest
  baseline: a stock model then never computes on padding beyond its batch's longest input).

Every candidate (a model and a batching) first makes one untimed pass, which warms it up and
gives its predictions (seeded, so Rand-WS is reproducible). Then ``rounds`` rounds each time one
full pass of every candidate, the order rotated by one every round, so slow drift of the
machine's load spreads over all candidates instead of favouring whoever runs first. Reported:
the median pass time, with every individual time.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field

import torch


@dataclass
class Candidate:
    name: str
    model: torch.nn.Module
    batching: str  # "padded" | "dynamic"
    predictions: torch.Tensor | None = None
    times: list[float] = field(default_factory=list)


def make_batches(dataset, batch_size: int, batching: str):
    """``[(index [b], inputs dict)]`` covering the dataset once.

    Args:
        dataset: ``TensorDataset(input_ids [M, N], attention_mask [M, N], token_type_ids [M, N], targets [M])``
            right-padded to N (``powerbert.inputs.examples.encode``).
    """
    ids, mask, types, _ = dataset.tensors
    lengths = mask.sum(1)
    if batching == "padded":
        order = torch.arange(len(ids))
    elif batching == "dynamic":
        order = torch.sort(lengths, stable=True).indices
    else:
        raise ValueError(f"batching must be 'padded' or 'dynamic', got {batching!r}")
    batches = []
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        width = ids.shape[1] if batching == "padded" else int(lengths[index].max())
        batches.append((index, {"input_ids": ids[index, :width].contiguous(),
                                "attention_mask": mask[index, :width].contiguous(),
                                "token_type_ids": types[index, :width].contiguous()}))
    return batches


@torch.inference_mode()
def run_pass(model, batches, size: int) -> torch.Tensor:
    """Predicted class ``[M]`` int64 of one pass, in dataset order."""
    accepts_types = "token_type_ids" in inspect.signature(model.forward).parameters
    out = torch.empty(size, dtype=torch.long)
    for index, inputs in batches:
        if not accepts_types:
            inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}
        out[index] = model(**inputs).logits.argmax(-1)
    return out


def measure(candidates: list[Candidate], dataset, batch_size: int, rounds: int, seed: int = 0, log=None) -> None:
    """Fill every candidate's ``predictions`` and ``times`` (seconds per full pass)."""
    batches = {b: make_batches(dataset, batch_size, b) for b in ("padded", "dynamic")}
    size = len(dataset)
    for c in candidates:
        torch.manual_seed(seed)
        c.predictions = run_pass(c.model, batches[c.batching], size)
    for r in range(rounds):
        shift = r % len(candidates)
        for c in candidates[shift:] + candidates[:shift]:
            torch.manual_seed(seed)
            start = time.perf_counter()
            run_pass(c.model, batches[c.batching], size)
            c.times.append(time.perf_counter() - start)
        if log is not None:
            log.info("timing round %d/%d: %s", r + 1, rounds,
                     ", ".join(f"{c.name} {c.times[-1]:.2f}s" for c in candidates))


def padding_stats(dataset, batch_size: int) -> dict:
    """Real tokens vs tokens computed on, for both batchings (how much padding N adds)."""
    lengths = dataset.tensors[1].sum(1)
    n = dataset.tensors[0].shape[1]
    real = int(lengths.sum())
    dynamic = sum(int(lengths[index].max()) * len(index) for index, _ in make_batches(dataset, batch_size, "dynamic"))
    return {"real_tokens": real, "padded_tokens": n * len(lengths), "dynamic_tokens": dynamic,
            "mean_length": real / len(lengths), "truncated_fraction": float((lengths == n).double().mean())}
