"""CUDA graphs of the packed forward, by default: a pool keyed by shape bucket, captured lazily.

At small batches the packed forward's ~110 launches (BERT-base), not the GPU, set its time. A CUDA
graph replays them in one launch, but needs fixed shapes and fixed buffers, while the packed rows
follow each batch's lengths. So graphs are kept per **bucket** (vLLM's pattern, TensorRT's
optimisation profiles): up to ``batch`` sequences (a power of two), ``tokens`` real tokens in all
(a multiple of 128 up to 2,048, then steps of x1.25), none longer than ``length`` (a multiple of
64). A bucket's buffers and grids are sized by ``packed_plan.bucket_capacities``, which hold every
batch inside it; sequences past the batch are empty (repeated offsets), rows past the real ones
hold no sequence and are never read for one.

What runs per forward: the stock embeddings (eager), the plan's one host-to-device copy, three
copies into the graph's static inputs (packed rows, their positions, the offsets), the replay,
and the exit into the padded output layout (fresh tensors, never the graph's buffers).

* Captured lazily, the first time a bucket is met: one eager warm-up on a side stream (Triton
  compiles, cuBLAS sets up), then the capture; every graph allocates from one shared memory pool
  (only one replays at a time, and its outputs are copied out before the next).
* Bounded: at most ``max_graphs`` graphs, least recently used dropped first; batches beyond the
  largest bucket (256 sequences, 32K tokens, length 512) run eagerly (there the GPU, not the
  launches, sets the time). Memory: the graphs share one pool, which holds about what the
  largest captured bucket's forward needs (its activations are live one layer at a time), plus
  each graph's static inputs (``tokens x D`` values).
* Valid while the weights are: the stacked QKV weight is refreshed in place
  (``packed.fused_qkv``), and a graph whose layers' parameters moved (``.to()``, a new
  Parameter) is captured again.
* Off with ``powerbert.patch(..., cuda_graphs=False)``, and never under autograd, ``torch.compile``
  or another capture (the packed path itself does not run there).
"""
from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections import OrderedDict
from typing import Callable

import torch
from torch import nn

from powerbert.elimination.families import LayerParts
from powerbert.elimination.packed import fused_qkv, pack_entry, packed_layers, tree_version, unpack_exit
from powerbert.elimination.packed_plan import Bucket, Capacities, PackedPlan

MAX_BATCH = 256
TOKEN_STEP = 128
TOKEN_STEPS_UNTIL = 2048
TOKEN_GROWTH = 1.25
MAX_TOKENS = 32768
LENGTH_STEP = 64
MAX_LENGTH = 512  # the selection kernel holds a sequence in one block (kernels.launch.MAX_TRITON_N)
MAX_GRAPHS = 32


def token_bucket(tokens: int) -> int | None:
    """Real tokens rounded up to the bucket's capacity: a multiple of 128 up to 2,048, then x1.25
    steps (each a multiple of 128), None above ``MAX_TOKENS``."""
    if tokens > MAX_TOKENS:
        return None
    capacity = TOKEN_STEP * max(1, math.ceil(tokens / TOKEN_STEP))
    if capacity <= TOKEN_STEPS_UNTIL:
        return capacity
    capacity = TOKEN_STEPS_UNTIL
    while capacity < tokens:
        capacity = TOKEN_STEP * math.ceil(capacity * TOKEN_GROWTH / TOKEN_STEP)
    return min(capacity, MAX_TOKENS)


def bucket_for(batch: int, tokens: int, longest: int) -> Bucket | None:
    """The graph bucket of a batch (B sequences, ``tokens`` real tokens, the longest
    ``longest``), or None when it is beyond the largest bucket (run eagerly)."""
    if batch < 1 or batch > MAX_BATCH or longest > MAX_LENGTH:
        return None
    tokens_capacity = token_bucket(tokens)
    if tokens_capacity is None:
        return None
    batch_capacity = 1 << (batch - 1).bit_length()
    length = min(MAX_LENGTH, LENGTH_STEP * max(1, math.ceil(longest / LENGTH_STEP)))
    return Bucket(batch_capacity, tokens_capacity, length)


# ----------------------------------------------------------------------------- capture backends


class CudaCapture:
    """Warm up on a side stream, capture into one memory pool shared by every graph of the pool."""

    def __init__(self):
        self.pool = None

    def capture(self, fn: Callable[[], tuple], refill: Callable[[], None]) -> tuple[Callable[[], None], tuple]:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()  # compiles the Triton kernels and sets cuBLAS up outside the capture
        torch.cuda.current_stream().wait_stream(side)
        refill()  # the warm-up wrote into the static inputs (the layers accumulate in place)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = fn()
        return graph.replay, outputs


class EmulatedCapture:
    """What a CUDA graph does, on any device (tests): "capture" runs ``fn`` once for its output
    buffers; a replay runs it again on the static inputs and writes into those same buffers. As a
    real replay runs no Python, the stacked QKV weights are read as captured (never refreshed
    inside a replay): only what the pool refreshes before replaying counts."""

    def __init__(self):
        self.replays = 0

    def capture(self, fn: Callable[[], tuple], refill: Callable[[], None]) -> tuple[Callable[[], None], tuple]:
        outputs = fn()
        refill()

        def replay():
            self.replays += 1
            # A graph writes its buffers behind autograd's back, inference tensors included.
            with torch.inference_mode(outputs[0].is_inference()), _qkv_as_captured():
                for buffer, value in zip(outputs, fn()):
                    buffer.copy_(value)
        return replay, outputs


@contextlib.contextmanager
def _qkv_as_captured():
    """Inside the block ``packed.fused_qkv`` returns the cached tensors as they are (a graph
    holds their addresses and reads whatever they hold), without checking the parameters."""
    from powerbert.elimination import packed

    refresh = packed.fused_qkv
    packed.fused_qkv = packed.cached_qkv
    try:
        yield
    finally:
        packed.fused_qkv = refresh


_emulated: EmulatedCapture | None = None


@contextlib.contextmanager
def emulate_graphs():
    """Inside the block, packed forwards on any device use graph pools with
    :class:`EmulatedCapture` (how CPU tests run the pool's bookkeeping); yields the emulator."""
    global _emulated
    previous, _emulated = _emulated, EmulatedCapture()
    try:
        yield _emulated
    finally:
        _emulated = previous


def graphs_serve(device: torch.device) -> bool:
    """Whether a packed forward on ``device`` may replay a graph: CUDA, not capturing already,
    or anywhere under :func:`emulate_graphs`."""
    if _emulated is not None:
        return True
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


# ----------------------------------------------------------------------------- the pool


class _Graph:
    """One captured bucket: its static inputs, its outputs, its replay and what it was captured with."""

    def __init__(self, x: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, stamp: tuple):
        self.x, self.positions, self.cu, self.stamp = x, positions, cu, stamp
        self.replay: Callable[[], None] | None = None
        self.outputs: tuple | None = None


class GraphPool:
    """The packed forward's graphs for one encoder (``pool_for``), at most ``max_graphs``, LRU."""

    def __init__(self, max_graphs: int = MAX_GRAPHS):
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.failed: set[tuple] = set()
        self.cuda = CudaCapture()

    def run(self, layers: list[LayerParts], hidden: torch.Tensor, plan: PackedPlan, capacities: Capacities,
            settings: tuple) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The packed encoder for this batch through its bucket's graph (captured now if new);
        None when the bucket's capture failed before (the caller runs eagerly).

        Args:
            layers: the encoder's layers. hidden: ``[B, N, D]`` embeddings. plan: planned for
                ``plan.bucket``. capacities: ``bucket_capacities`` of that bucket. settings: what
                else the graph depends on (retention, minimum, cls_only), part of its key.

        Returns:
            As ``packed.packed_encoder``: fresh tensors.
        """
        key = (plan.bucket, hidden.dtype, hidden.device, hidden.shape[-1], settings)
        if key in self.failed:
            return None
        device = torch.cuda.device(hidden.device) if hidden.is_cuda else contextlib.nullcontext()
        with device:  # streams, graphs and pools on the model's GPU, whichever is current
            return self._run(key, layers, hidden, plan, capacities)

    def _run(self, key, layers, hidden, plan, capacities):
        stamp = _parameter_stamp(layers)
        graph = self.graphs.get(key)
        if graph is not None and graph.stamp != stamp:
            del self.graphs[key]  # parameters moved: the captured pointers are stale
            graph = None
        new = graph is None
        for parts in layers:
            # Built before a capture (outside it), refreshed in place before every replay: a
            # weight written since the capture reaches the graph, which holds these addresses.
            fused_qkv(parts)
        if new:
            bucket = plan.bucket
            # Normal tensors even under inference_mode: later calls outside it copy into them.
            with torch.inference_mode(False):
                graph = _Graph(torch.zeros(bucket.tokens, hidden.shape[-1], dtype=hidden.dtype, device=hidden.device),
                               torch.zeros(bucket.tokens, dtype=torch.int64, device=hidden.device),
                               torch.zeros(plan.num_layers + 1, bucket.batch + 1, dtype=torch.int32,
                                           device=hidden.device),
                               stamp)
        refill = lambda: _fill(graph, hidden, plan)  # noqa: E731
        refill()
        if new:
            shapes = plan.layer_shapes(graph.cu, capacities)
            run = lambda: packed_layers(layers, graph.x, graph.positions, shapes)  # noqa: E731
            capture = _emulated if _emulated is not None else self.cuda
            try:
                graph.replay, graph.outputs = capture.capture(run, refill)
            except Exception as error:  # a capture that fails leaves the eager path, which works
                self.failed.add(key)
                warnings.warn(f"powerbert: CUDA graph capture failed for {plan.bucket} ({error}); "
                              f"this bucket runs eagerly", RuntimeWarning, stacklevel=3)
                return None
            self.graphs[key] = graph
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        graph.replay()
        x, positions = graph.outputs
        return unpack_exit(x, positions, plan, fresh=True)


def _fill(graph: _Graph, hidden: torch.Tensor, plan: PackedPlan) -> None:
    """Copy this batch into the graph's static inputs: its packed rows, positions and offsets."""
    arrays = plan.device_arrays
    pack_entry(hidden, plan, out=graph.x[:plan.rows[0]])
    graph.positions.copy_(arrays["entry_positions"])
    graph.cu.copy_(arrays["cu"])


def _parameter_stamp(layers: list[LayerParts]) -> tuple:
    """What a graph's captured addresses depend on: no module or Parameter registered anywhere
    since (``packed.tree_version``), and the storage of the first and last layers' weights
    (``.to()`` moves every parameter without registering one). Values written in place need no
    new graph: a replay reads them."""
    return (tree_version(), len(layers), layers[0].query.weight.data_ptr(), layers[-1].ffn_out.weight.data_ptr())


_POOLS: "weakref.WeakKeyDictionary[nn.Module, GraphPool]" = weakref.WeakKeyDictionary()


def pool_for(encoder: nn.Module) -> GraphPool:
    """The graph pool of ``encoder`` (created on first use; never pickled or copied with the model:
    a deep copy gets a pool of its own)."""
    pool = _POOLS.get(encoder)
    if pool is None:
        pool = _POOLS[encoder] = GraphPool()
    return pool
