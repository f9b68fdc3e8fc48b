"""A patched model's forward captured once in a CUDA graph and replayed for inputs of one shape.

At small batches a patched BERT launches a few hundred kernels per forward (per layer: the
projections, the attention + significance kernel, selection, gather, the FFN), and their launch
cost, not the GPU, sets the time. A CUDA graph replays all of them in one launch. This needs the
static layout (``powerbert/elimination/layout.py``: the input's shape kept, no host synchronisation): warm-up
and capture run with ``static_shapes=True`` whatever the model was patched with, so the Triton
kernels compile for the captured shapes before capture starts.

    graph = powerbert.CudaGraphForward(model, input_ids=ids, attention_mask=mask)   # capture
    logits = graph(input_ids=other_ids, attention_mask=other_mask).logits           # replay

Inputs of a replay must have the captured shapes, dtypes and device (pad batches to the captured
``[B, N]``: the static layout moves each row's real tokens first and masks the rest). Outputs are
the graph's own buffers: the next replay overwrites them, so clone what you keep. Only CUDA; a
stock model can be captured the same way (the baseline of ``benchmarks/test_bench_peers.py``):
captured without an ``attention_mask``, it runs FlashAttention-2 as it does eagerly
(:func:`no_mask_built_under_capture`).

A patched model on CUDA in fp16/bf16 replays graphs on its own by default (the packed forward's
pool, ``powerbert/elimination/packed_graphs.py``: any batch, one graph per shape bucket); this
class is the one-shape building block, and captures the padded static layout.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn


@contextlib.contextmanager
def no_mask_built_under_capture():
    """While a model given no attention mask is captured: no mask built, as in eager.

    transformers (5.17) ``masking_utils._ignore_bidirectional_mask_sdpa`` declines to skip the
    mask whenever a CUDA stream is capturing (it could not read a real mask's values there), even
    when there is no mask to read, and builds an expanded ``[B, 1, N, N]`` mask whose last
    dimension has stride 0: no fused SDPA kernel takes it, and SDPA ran its math backend (69.8 ms
    against 15.6 ms eager, BERT-base B64 N512 fp16, H200). With no padding mask there is nothing
    to read: skip, as eager does. A no-op where transformers has no such function.
    """
    from transformers import masking_utils

    original = getattr(masking_utils, "_ignore_bidirectional_mask_sdpa", None)
    if original is None:
        yield
        return

    def skip_when_absent(padding_mask, *args, **kwargs):
        return padding_mask is None or original(padding_mask, *args, **kwargs)

    masking_utils._ignore_bidirectional_mask_sdpa = skip_when_absent
    try:
        yield
    finally:
        masking_utils._ignore_bidirectional_mask_sdpa = original


@contextlib.contextmanager
def _static_layout(model: nn.Module):
    """``static_shapes=True`` on a patched model for the duration; stock models pass through."""
    from powerbert.front_door import is_patched, patch_state

    if not is_patched(model):
        yield
        return
    state = patch_state(model)
    saved = state.static_shapes
    state.static_shapes = True
    try:
        yield
    finally:
        state.static_shapes = saved


class CudaGraphForward:
    """``model(**inputs)`` captured in a ``torch.cuda.CUDAGraph``.

    Args:
        model: a CUDA model in eval mode, patched by ``powerbert.patch`` or stock.
        warmup: eager forwards before capture, on a side stream (compiles, allocator, cuBLAS).
        **inputs: the example batch, keyword tensors as the model takes them (``input_ids``
            ``[B, N]`` int64, ``attention_mask`` ``[B, N]``, ...), all on CUDA. Their shapes,
            dtypes and device are the only ones a replay accepts.

    Raises:
        ValueError: no inputs, a non-tensor or non-CUDA input, a model in training mode, or
            ``warmup`` < 1.
    """

    def __init__(self, model: nn.Module, *, warmup: int = 3, **inputs: torch.Tensor):
        if model.training:
            raise ValueError("CudaGraphForward needs the model in eval mode (call model.eval())")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if not inputs:
            raise ValueError("CudaGraphForward needs the example inputs as keyword tensors (input_ids=..., ...)")
        for name, tensor in inputs.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"input {name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.device.type != "cuda":
                raise ValueError(f"input {name} must be on a CUDA device (CUDA graphs), got {tensor.device}")
        self.model = model
        self.inputs = {name: tensor.clone() for name, tensor in inputs.items()}
        self.graph = torch.cuda.CUDAGraph()
        unmasked = no_mask_built_under_capture() if "attention_mask" not in inputs else contextlib.nullcontext()
        with _static_layout(model), unmasked, torch.no_grad():
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    model(**self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(self.graph):
                self.outputs = model(**self.inputs)

    def __call__(self, **inputs: torch.Tensor):
        """Copy ``inputs`` into the captured buffers, replay, return the captured outputs."""
        if set(inputs) != set(self.inputs):
            raise ValueError(f"inputs must be exactly the captured ones {sorted(self.inputs)}, got {sorted(inputs)}")
        for name, tensor in inputs.items():
            static = self.inputs[name]
            if tensor.shape != static.shape or tensor.dtype != static.dtype or tensor.device != static.device:
                raise ValueError(f"input {name} must be {tuple(static.shape)} {static.dtype} on {static.device} as "
                                 f"captured, got {tuple(tensor.shape)} {tensor.dtype} on {tensor.device}")
            static.copy_(tensor)
        self.graph.replay()
        return self.outputs
