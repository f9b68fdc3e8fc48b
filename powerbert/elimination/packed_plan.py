"""The host plan of a packed (varlen) forward: everything that depends on the lengths alone.

Which tokens survive a layer is decided on the device (by attention); *how many* survive depends
only on each sequence's length and the retention (powerbert/ALGORITHM.md §2, §8):

* fixed:        ``k_{l,i} = min(k_l, len_i)``;
* proportional: ``k_{l,i} = min(k_{l-1,i}, max(m_l, ceil(f_l * len_i)))``, ``k_{0,i} = len_i``,
  product and ceil in float64 (the same IEEE operations as ``retention.row_keep_counts`` on the
  device, so the two agree exactly).

Tokenizers produce the lengths on the host, so the packed forward plans every layer here, in
numpy: the rows each sequence occupies before and after every layer (``cu_seqlens``), the
longest sequence of each layer (grid sizes), which layers eliminate anything, where the real
tokens sit in the padded input (either padding side) and where the survivors go in the padded
output. The integer arrays travel to the device in **one** copy (one byte buffer, viewed as
int64 / int32 / bool on arrival), and no layer reads a device value on the host after that.

Packed layout: the B sequences' rows one after the other, ``cu[l][b] .. cu[l][b+1] - 1`` for
sequence b after layer l (l = 0: the real tokens entering the first layer); a sequence keeps
its tokens in input order, [CLS] first.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np
import torch

from powerbert.elimination.retention import is_proportional


def keep_count_table(retention: Sequence, lengths: np.ndarray, minimum: Sequence[int] | None = None) -> np.ndarray:
    """Vectors each sequence keeps after each layer, in numpy on the host.

    ``retention.keep_count_rows`` on CPU tensors computes the same, but this runs on every plan
    the cache misses (ragged serving traffic misses it often): 34 us in numpy against 121 us in
    torch for B 64, 12 proportional layers on this CPU. A test holds the two equal.

    Args:
        retention: ints (fixed k_l) or floats (proportional f_l), one per layer.
        lengths: ``[B]`` integer array of real tokens per sequence.
        minimum: per-layer minimums m_l of a proportional configuration (None: all 1).

    Returns:
        ``[L, B]`` int64, equal to ``retention.keep_count_rows`` (the device-side formula) exactly.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if not is_proportional(retention):
        return np.minimum(np.asarray([int(k) for k in retention], dtype=np.int64)[:, None], lengths[None])
    length = lengths.astype(np.float64)
    keep = lengths.copy()
    rows = []
    for layer, fraction in enumerate(retention):
        m = 1 if minimum is None else minimum[layer]
        share = np.maximum(np.ceil(length * float(fraction)).astype(np.int64), m)
        keep = np.minimum(keep, share)
        rows.append(keep)
    return np.stack(rows) if rows else np.zeros((0, lengths.shape[0]), dtype=np.int64)


class LayerShapes(NamedTuple):
    """What one packed layer needs of the plan: device offsets and host sizes.

    cu_in, cu_out: ``[B + 1]`` int32 row offsets of each sequence before and after the layer.
    max_in, max_out: host ints >= the longest sequence before and after (grid sizes).
    rows_out: host int, the output buffers' rows (>= ``cu_out[B]``; more in a graph's bucket).
    eliminates: False when no sequence can drop anything here (no scores, no selection).
    """

    cu_in: torch.Tensor
    cu_out: torch.Tensor
    max_in: int
    max_out: int
    rows_out: int
    eliminates: bool


class Bucket(NamedTuple):
    """A CUDA graph's shape class: up to ``batch`` sequences, ``tokens`` real tokens in all, none
    longer than ``length``. Its capacities (``bucket_capacities``) hold every batch inside it."""

    batch: int
    tokens: int
    length: int


@dataclass(frozen=True)
class Capacities:
    """Per layer boundary l = 0..L, what a bucket's buffers and grids must hold: ``rows[l]``
    packed rows, sequences of at most ``max_len[l]``; ``eliminates[l - 1]``: layer l may drop
    vectors for some batch of the bucket (the graph then selects; a batch that drops nothing
    there selects everything, the same result)."""

    rows: tuple[int, ...]
    max_len: tuple[int, ...]
    eliminates: tuple[bool, ...]


def bucket_capacities(bucket: Bucket, retention: Sequence, minimum: Sequence[int] | None = None,
                      cls_only_last: bool = False) -> Capacities:
    """Bounds on every layer's rows and longest sequence over all batches of ``bucket``.

    Fixed: ``k_{l,i} = min(k_l, len_i)``, so rows <= B k_l and lengths <= min(k_l, N).
    Proportional: ``k_{l,i} <= max(m_l, ceil(f_l len_i)) <= f_l len_i + max(m_l, 1)``, so rows
    <= ceil(f_l T) + B max(m_l, 1), and lengths <= max(m_l, ceil(f_l N)) (the count grows with
    the length). Both are also bounded by the layer before.
    """
    rows, max_len, eliminates = [bucket.tokens], [bucket.length], []
    proportional = is_proportional(retention)
    for layer, share in enumerate(retention):
        if proportional:
            m = 1 if minimum is None else minimum[layer]
            longest = min(max_len[-1], max(m, math.ceil(bucket.length * float(share))))
            total = min(rows[-1], math.ceil(bucket.tokens * float(share)) + bucket.batch * max(m, 1))
            drops = float(share) < 1.0
        else:
            longest = min(max_len[-1], int(share))
            total = min(rows[-1], bucket.batch * int(share))
            drops = longest < max_len[-1]
        if cls_only_last and layer == len(retention) - 1:
            longest, total, drops = min(longest, 1), min(total, bucket.batch), max_len[-1] > 1
        rows.append(total)
        max_len.append(max(1, longest))
        eliminates.append(drops)
    return Capacities(tuple(rows), tuple(max_len), tuple(eliminates))


@dataclass(frozen=True)
class PackedPlan:
    """A packed forward's plan for one batch, on the host (numpy) with its device copy.

    Attributes:
        batch: B. width: N, the padded input's width. num_layers: L.
        counts: ``[L + 1, B]`` int64: real tokens of each sequence entering the first layer
            (row 0) and after each layer (rows 1..L).
        cu: ``[L + 1, B + 1]`` int32 cumulative row offsets of ``counts``.
        max_len: per boundary l, the longest sequence (host ints, >= 1: they size grids).
        rows: per boundary l, the row count of the packed buffers (``cu[l][B]``, the total).
        eliminates: per layer, whether any sequence keeps fewer vectors than entered it.
        entry_rows: ``[T_0]`` int64 flat index ``b * N + j`` of each real input token, in order.
        entry_positions: ``[T_0]`` int64 input position j of each of those tokens.
        out_width: W, the padded output's width (the most survivors of any sequence, >= 1).
        exit_rows: ``[T_L]`` int64 flat index ``b * W + r`` of each survivor in the padded output.
        kept_mask: ``[B, W]`` bool, True where an output slot holds a survivor.
        device: where ``device_arrays`` live. device_arrays: name -> tensor (views of one buffer).
        bucket: the graph bucket the device arrays are padded to (``plan_packed``), or None.
    """

    batch: int
    width: int
    num_layers: int
    counts: np.ndarray
    cu: np.ndarray
    max_len: tuple[int, ...]
    rows: tuple[int, ...]
    eliminates: tuple[bool, ...]
    entry_rows: np.ndarray
    entry_positions: np.ndarray
    out_width: int
    exit_rows: np.ndarray
    kept_mask: np.ndarray
    device: torch.device
    device_arrays: dict
    bucket: Bucket | None = None

    def layer_shapes(self, cu: torch.Tensor | None = None, capacities: Capacities | None = None
                     ) -> list[LayerShapes]:
        """Each layer's :class:`LayerShapes`: this batch's exact sizes, or with ``capacities`` a
        bucket's (``cu``: the ``[L + 1, B' + 1]`` offsets to read, e.g. a graph's static copy)."""
        cu = self.device_arrays["cu"] if cu is None else cu
        sizes = self if capacities is None else capacities
        return [LayerShapes(cu[layer], cu[layer + 1], sizes.max_len[layer], sizes.max_len[layer + 1],
                            sizes.rows[layer + 1], sizes.eliminates[layer]) for layer in range(self.num_layers)]

    @property
    def exit_is_identity(self) -> bool:
        """True when every sequence fills all W output slots: the packed rows are the padded output."""
        return self.rows[-1] == self.batch * self.out_width

    @property
    def entry_is_identity(self) -> bool:
        """True when every input slot holds a real token (no padding): packing is a reshape."""
        return self.rows[0] == self.batch * self.width


def host_mask(attention_mask, batch: int, width: int) -> np.ndarray:
    """The ``[B, N]`` key mask as a numpy bool array on the host.

    ``attention_mask``: None (no padding) or a ``[B, N]`` tensor / array, nonzero = real token. A
    CUDA tensor costs one device-to-host read (the one synchronisation of a forward that was not
    given its mask on the CPU).
    """
    if attention_mask is None:
        return np.ones((batch, width), dtype=bool)
    if isinstance(attention_mask, torch.Tensor):
        attention_mask = attention_mask.detach().to("cpu").numpy()
    mask = np.asarray(attention_mask) != 0
    if mask.shape != (batch, width):
        raise ValueError(f"attention_mask has shape {mask.shape}, the input is {(batch, width)}")
    return mask


def plan_packed(mask: np.ndarray, retention: Sequence, *, minimum: Sequence[int] | None = None,
                cls_only_last: bool = False, device: torch.device | str = "cpu",
                bucket: Bucket | None = None) -> PackedPlan:
    """Plan a packed forward for a batch and copy its integer arrays to ``device`` in one copy.

    Args:
        mask: ``[B, N]`` numpy bool, True for real tokens (any padding side); see :func:`host_mask`.
        retention: the patched model's retention (ints or floats, one per layer).
        minimum: per-layer minimums of a proportional configuration, or None.
        cls_only_last: the caller reads only [CLS] of the last layer (a sequence-level head): the
            last layer keeps [CLS] alone (its attention still sees every survivor of the layer before).
        device: where the packed forward runs. A CUDA copy is made from pinned memory with
            ``non_blocking=True`` (no host synchronisation).
        bucket: the CUDA graph's :class:`Bucket` this batch runs in, or None (eager): the device
            ``cu`` then has ``bucket.batch + 1`` columns (sequences past B are empty) and
            ``entry_positions`` ``bucket.tokens`` entries (zeros past T_0), the shapes of the
            graph's static inputs.

    Returns:
        The :class:`PackedPlan`.
    """
    mask = np.asarray(mask, dtype=bool)
    batch, width = mask.shape
    lengths = mask.sum(axis=1).astype(np.int64)
    counts = np.concatenate([lengths[None], keep_count_table(retention, lengths, minimum)])
    if cls_only_last and len(retention):
        counts[-1] = np.minimum(counts[-1], 1)
    num_layers = counts.shape[0] - 1
    cu = np.zeros((num_layers + 1, batch + 1), dtype=np.int32)
    np.cumsum(counts, axis=1, out=cu[:, 1:])
    rows = tuple(int(r) for r in cu[:, -1])
    max_len = tuple(max(1, int(c.max())) if batch else 1 for c in counts)
    eliminates = tuple(bool((counts[layer + 1] < counts[layer]).any()) for layer in range(num_layers))

    batch_index, position = np.nonzero(mask)  # row-major: each row's real tokens in input order
    entry_rows = (batch_index * width + position).astype(np.int64)
    entry_positions = position.astype(np.int64)
    out_width = max(1, int(counts[-1].max())) if batch else 1
    slot = np.arange(out_width)
    kept_mask = slot[None, :] < counts[-1][:, None]
    out_batch, out_slot = np.nonzero(kept_mask)
    exit_rows = (out_batch * out_width + out_slot).astype(np.int64)

    device_cu, device_positions = cu, entry_positions
    if bucket is not None:
        if batch > bucket.batch or rows[0] > bucket.tokens or max_len[0] > bucket.length:
            raise ValueError(f"batch of {batch} sequences, {rows[0]} tokens, longest {max_len[0]} is outside {bucket}")
        device_cu = np.concatenate([cu, np.repeat(cu[:, -1:], bucket.batch - batch, axis=1)], axis=1)
        device_positions = np.zeros(bucket.tokens, dtype=np.int64)
        device_positions[:rows[0]] = entry_positions
    arrays = {"entry_rows": entry_rows, "entry_positions": device_positions, "exit_rows": exit_rows,
              "cu": device_cu, "kept_mask": kept_mask}
    device_arrays = _to_device(arrays, torch.device(device))
    return PackedPlan(batch=batch, width=width, num_layers=num_layers, counts=counts, cu=cu, max_len=max_len,
                      rows=rows, eliminates=eliminates, entry_rows=entry_rows, entry_positions=entry_positions,
                      out_width=out_width, exit_rows=exit_rows, kept_mask=kept_mask, device=torch.device(device),
                      device_arrays=device_arrays, bucket=bucket)


# numpy dtype -> torch dtype of the views made on the device
_TORCH_DTYPES = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32, np.dtype(bool): torch.bool}


def _to_device(arrays: dict, device: torch.device) -> dict:
    """One byte buffer holding every array (8-byte aligned sections), copied once, viewed back."""
    layout, offset = {}, 0
    for name, array in arrays.items():
        layout[name] = (offset, array.shape, array.dtype)
        offset += math.ceil(array.nbytes / 8) * 8
    pinned = device.type == "cuda"
    blob = torch.empty(max(offset, 8), dtype=torch.uint8, pin_memory=pinned)
    host = blob.numpy()
    for name, array in arrays.items():
        start = layout[name][0]
        host[start:start + array.nbytes] = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    on_device = blob.to(device, non_blocking=True) if device.type != "cpu" else blob
    views = {}
    for name, (start, shape, dtype) in layout.items():
        size = int(np.prod(shape)) * dtype.itemsize
        views[name] = on_device[start:start + size].view(_TORCH_DTYPES[dtype]).view(shape)
    return views


# Recent plans by everything they depend on: serving repeats batch shapes (equal lengths, the same
# texts), and a plan found here costs a hash of the mask instead of ~0.2 ms of numpy and a copy.
PLAN_CACHE_SIZE = 64
_PLANS: "OrderedDict[tuple, PackedPlan]" = OrderedDict()


def plan_packed_cached(mask: np.ndarray, retention: Sequence, *, minimum: Sequence[int] | None = None,
                       cls_only_last: bool = False, device: torch.device | str = "cpu",
                       bucket: Bucket | None = None) -> PackedPlan:
    """:func:`plan_packed`, the last ``PLAN_CACHE_SIZE`` plans kept (least recently used dropped).

    A plan is never written after it is made (its device arrays are only read; the packed forward
    returns a copy of its kept mask), so one plan serves every batch with the same mask.
    """
    mask = np.ascontiguousarray(mask, dtype=bool)
    key = (mask.shape, mask.tobytes(), tuple(retention), None if minimum is None else tuple(minimum),
           bool(cls_only_last), str(torch.device(device)), bucket)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = plan_packed(mask, retention, minimum=minimum, cls_only_last=cls_only_last,
                                         device=device, bucket=bucket)
        while len(_PLANS) > PLAN_CACHE_SIZE:
            _PLANS.popitem(last=False)
    _PLANS.move_to_end(key)
    return plan
