"""The packed (varlen) inference forward (powerbert/elimination/packed.py) and its host plan.

On a CPU the packed path runs when forced (``dispatch.use_packed(True)``), its Triton kernels
under the interpreter: the same code a CUDA fp16/bf16 model runs, but FlashAttention-2 (CUDA only)
replaced by the Triton varlen attention. Checked here: the host plan against the device-side
counts, selection and outputs against the per-sequence spec and the padded path, no host read
of a device value in any layer, and the launch budget per eliminating layer.
"""
import contextlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import BertForSequenceClassification, BertModel

import powerbert
from powerbert.elimination import dispatch, packed
from powerbert.elimination.packed_plan import keep_count_table, plan_packed
from powerbert.elimination.retention import keep_count_rows
from spec_reference import bert_layer_modules, spec_encoder
from tiny_bert import batch, build, reference_counts

# Head dimension 32: the smallest the attention kernels take.
WIDE = dict(hidden_size=64, num_attention_heads=2, intermediate_size=96)
FIXED = (9, 5, 2)
FRACTIONS = (0.7, 0.45, 0.2)
SIZES = (13, 9, 4, 1)


@contextlib.contextmanager
def packed_path(enabled=True):
    with dispatch.use_packed(enabled), dispatch.use_backend("triton" if enabled else None):
        yield


# ---------------------------------------------------------------- host plan


retentions = st.one_of(
    st.lists(st.integers(1, 300), min_size=1, max_size=12).map(lambda ks: tuple(sorted(ks, reverse=True))),
    st.lists(st.floats(0.01, 1.0), min_size=1, max_size=12).map(lambda fs: tuple(sorted(fs, reverse=True))),
)


@settings(max_examples=200, deadline=None)
@given(retention=retentions, lengths=st.lists(st.integers(0, 512), min_size=1, max_size=40),
       minimum_seed=st.integers(0, 3))
def test_host_counts_equal_device_counts(retention, lengths, minimum_seed):
    """numpy on the host and torch on the device agree exactly (float64 products and ceils)."""
    minimum = None
    if isinstance(retention[0], float) and minimum_seed:
        minimum = tuple(1 + (layer * minimum_seed) % 5 for layer in range(len(retention)))
    host = keep_count_table(retention, np.asarray(lengths), minimum)
    device = keep_count_rows(retention, torch.tensor(lengths), minimum).numpy()
    np.testing.assert_array_equal(host, device)


def test_host_counts_take_the_ceil_in_float64():
    assert keep_count_table((0.29,), np.array([100]))[0, 0] == math.ceil(0.29 * 100)
    assert keep_count_table((0.1,), np.array([30]))[0, 0] == math.ceil(0.1 * 30)


@pytest.mark.parametrize("retention", [FIXED, FRACTIONS])
def test_plan_rows_and_offsets(retention):
    mask = np.zeros((4, 13), dtype=bool)
    for row, size in enumerate((13, 0, 4, 1)):
        mask[row, 13 - size:] = True  # left padding, and one empty row
    plan = plan_packed(mask, retention)
    lengths = mask.sum(1)
    np.testing.assert_array_equal(plan.counts[0], lengths)
    np.testing.assert_array_equal(plan.counts[1:], keep_count_table(retention, lengths))
    for layer in range(len(retention) + 1):
        assert plan.cu[layer, 0] == 0 and plan.cu[layer, -1] == plan.rows[layer] == plan.counts[layer].sum()
        assert plan.max_len[layer] == max(1, plan.counts[layer].max())
    assert plan.eliminates == tuple(bool((plan.counts[i + 1] < plan.counts[i]).any()) for i in range(3))
    # entry: each row's real tokens, in order, whatever the padding side
    assert plan.entry_positions.tolist() == list(range(13)) + [9, 10, 11, 12] + [12]
    assert plan.entry_rows.tolist() == [p + 13 * r for r, n in ((0, 13), (2, 4), (3, 1))
                                        for p in range(13 - n, 13)]
    # exit: survivors in slots 0..k-1 of a [B, W] output
    counts = plan.counts[-1]
    assert plan.out_width == max(1, counts.max())
    assert plan.kept_mask.sum(1).tolist() == counts.tolist()
    for name, array in (("cu", plan.cu), ("entry_rows", plan.entry_rows), ("exit_rows", plan.exit_rows),
                        ("kept_mask", plan.kept_mask)):
        np.testing.assert_array_equal(plan.device_arrays[name].numpy(), array)


def test_plan_for_a_head_that_reads_cls_only():
    plan = plan_packed(np.ones((3, 8), dtype=bool), FIXED, cls_only_last=True)
    assert plan.counts[-1].tolist() == [1, 1, 1] and plan.out_width == 1 and plan.exit_is_identity


# ---------------------------------------------------------------- outputs and selection


def fixed_counts(retention, length):
    return [min(k, length) for k in retention]


def per_sequence_spec(bert, inputs, retention):
    """Each row alone, unpadded, through the spec with its own keep counts."""
    layers = [bert_layer_modules(layer) for layer in bert.encoder.layer]
    outputs, positions = [], []
    for row in range(inputs["input_ids"].shape[0]):
        real = inputs["attention_mask"][row].bool()
        length = int(real.sum())
        ids, types = inputs["input_ids"][row:row + 1, real], inputs["token_type_ids"][row:row + 1, real]
        counts = (reference_counts(retention, None, length) if isinstance(retention[0], float)
                  else fixed_counts(retention, length))
        with torch.no_grad():
            hidden = bert.embeddings(input_ids=ids, token_type_ids=types)
            out, kept = spec_encoder(hidden, torch.ones(1, length), layers, counts)
        outputs.append(out[0])
        positions.append(kept[0])
    return outputs, positions


def spy_packed(monkeypatch):
    calls = []
    original = packed.packed_encoder

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr("powerbert.elimination.forwards.packed_encoder", spy)
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("retention", [FIXED, FRACTIONS], ids=["fixed", "proportional"])
def test_each_row_equals_the_row_alone_through_the_spec(retention, monkeypatch):
    calls = spy_packed(monkeypatch)
    model = build(BertModel, **WIDE)
    inputs = batch(sizes=SIZES)
    expected, positions = per_sequence_spec(model, inputs, retention)
    powerbert.patch(model, list(retention))
    with torch.no_grad(), packed_path():
        out = model(**inputs)
    assert calls, "the packed forward did not run"
    for row, (reference, kept) in enumerate(zip(expected, positions)):
        real = out.kept_mask[row]
        assert out.kept_positions[row][real].tolist() == kept  # selection exact, in order
        assert bool(real[:len(kept)].all()) and int(real.sum()) == len(kept)
        torch.testing.assert_close(out.last_hidden_state[row][real], reference, atol=1e-4, rtol=1e-4)
        assert not out.last_hidden_state[row][~real].any(), "slots without a survivor are zero"


def left_padded(inputs):
    """The same rows padded on the left, real tokens at positions 0..len-1 as on the right."""
    mask = inputs["attention_mask"]
    out = {}
    for name, tensor in inputs.items():
        rows = [torch.cat([t[m.bool().logical_not()], t[m.bool()]]) for t, m in zip(tensor, mask)]
        out[name] = torch.stack(rows)
    out["position_ids"] = (torch.cumsum(out["attention_mask"], 1) - 1).clamp(min=0)
    return out


@pytest.mark.interpreter
def test_left_padding_equals_right_padding():
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FRACTIONS))
    inputs = batch(sizes=SIZES)
    with torch.no_grad(), packed_path():
        right = model(**inputs)
        left = model(**left_padded(inputs))
    torch.testing.assert_close(left.last_hidden_state, right.last_hidden_state, atol=1e-5, rtol=1e-5)
    offsets = inputs["attention_mask"].shape[1] - inputs["attention_mask"].sum(1, keepdim=True)
    assert torch.equal(torch.where(left.kept_mask, left.kept_positions - offsets, 0),
                       torch.where(right.kept_mask, right.kept_positions, 0))


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("retention", [FIXED, FRACTIONS], ids=["fixed", "proportional"])
def test_packed_equals_padded_path(retention, dtype):
    """The packed forward and the padded one (the CPU path) agree: selection exactly, values
    within the dtype's tolerance; a classifier head reads [CLS] alone on both."""
    model = build(BertForSequenceClassification, **WIDE).to(dtype)
    powerbert.patch(model, list(retention))
    inputs = batch(sizes=SIZES)
    with torch.no_grad():
        padded = model(**inputs, output_hidden_states=False)
        base_padded = model.bert(**inputs)
        with packed_path():
            packed_out = model(**inputs)
            base_packed = model.bert(**inputs)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(packed_out.logits, padded.logits, **tol)
    mask = base_padded.kept_mask
    width = mask.shape[1]
    assert torch.equal(base_packed.kept_mask[:, :width], mask)
    assert torch.equal(base_packed.kept_positions[:, :width][mask], base_padded.kept_positions[mask])
    torch.testing.assert_close(base_packed.last_hidden_state[:, :width][mask], base_padded.last_hidden_state[mask],
                               **tol)


@pytest.mark.interpreter
def test_cpu_mask_and_no_mask_are_taken(monkeypatch):
    calls = spy_packed(monkeypatch)
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=(13, 13))
    no_mask = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad(), packed_path():
        with_mask = model(**inputs).last_hidden_state
        without = model(**no_mask).last_hidden_state
        positional = model(inputs["input_ids"], inputs["attention_mask"], inputs["token_type_ids"]).last_hidden_state
    assert len(calls) == 3
    torch.testing.assert_close(with_mask, without)
    torch.testing.assert_close(with_mask, positional)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["hidden_states", "attentions", "grad", "train", "fp64", "ablation"])
def test_padded_path_where_packed_does_not_serve(case, monkeypatch):
    calls = spy_packed(monkeypatch)
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED), selection="first" if case == "ablation" else None)
    kwargs = {}
    if case == "hidden_states":
        kwargs["output_hidden_states"] = True
    if case == "attentions":
        model.set_attn_implementation("eager")
        kwargs["output_attentions"] = True
    if case == "train":
        model.train()
    if case == "fp64":
        model.double()
    context = torch.enable_grad() if case in ("grad", "train") else torch.no_grad()
    with context, packed_path():
        model(**batch(sizes=SIZES), **kwargs)
    assert not calls


@pytest.mark.interpreter
def test_fused_qkv_follows_weight_changes():
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=SIZES)
    with torch.no_grad(), packed_path():
        before = model(**inputs).last_hidden_state
        model.encoder.layer[0].attention.self.key.weight.mul_(1.5)  # in place: _version changes
        after = model(**inputs).last_hidden_state
    with torch.no_grad():
        padded = model(**inputs)
    assert not torch.allclose(before, after)
    mask = padded.kept_mask
    torch.testing.assert_close(after[:, :mask.shape[1]][mask], padded.last_hidden_state[mask], atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- no host synchronisation


class _FailOnDataDependent(TorchDispatchMode):
    """Fails on ops whose output shape or value needs a device value on the host (nonzero,
    masked_select, unique, item, ...)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _Interpreter.inside and (torch.Tag.dynamic_output_shape in func.tags
                                        or torch.Tag.data_dependent_output in func.tags):
            raise AssertionError(f"data-dependent op in a packed layer: {func}")
        return func(*args, **(kwargs or {}))


class _Interpreter:
    """Marks when the Triton interpreter runs a kernel: its numpy bridging is not the model's work."""
    inside = False

    @classmethod
    @contextlib.contextmanager
    def watching(cls, monkeypatch, on_launch=None):
        from triton.runtime.interpreter import InterpretedFunction

        original = InterpretedFunction.run

        def run(self, *args, **kwargs):
            if on_launch is not None:
                on_launch(self)
            cls.inside, before = True, cls.inside
            try:
                return original(self, *args, **kwargs)
            finally:
                cls.inside = before

        monkeypatch.setattr(InterpretedFunction, "run", run)
        yield


def _host_read(name):
    def refuse(self, *args, **kwargs):
        if not _Interpreter.inside:
            raise AssertionError(f"Tensor.{name} in a packed layer (a host synchronisation on CUDA)")
        return getattr(torch.Tensor, f"_packed_test_{name}")(self, *args, **kwargs)
    return refuse


@pytest.mark.interpreter
@pytest.mark.parametrize("retention", [FIXED, FRACTIONS], ids=["fixed", "proportional"])
def test_no_layer_reads_a_device_value(retention, monkeypatch):
    model = build(BertForSequenceClassification, **WIDE)
    powerbert.patch(model, list(retention))
    inputs = batch(sizes=SIZES)
    original = packed.packed_encoder
    ran = []

    def guarded(*args, **kwargs):
        reads = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")
        with monkeypatch.context() as m:
            for name in reads:
                m.setattr(torch.Tensor, f"_packed_test_{name}", getattr(torch.Tensor, name), raising=False)
                m.setattr(torch.Tensor, name, _host_read(name))
            with _FailOnDataDependent():
                out = original(*args, **kwargs)
        ran.append(1)
        return out

    monkeypatch.setattr("powerbert.elimination.forwards.packed_encoder", guarded)
    with torch.no_grad(), packed_path(), _Interpreter.watching(monkeypatch):
        model(**inputs)
    assert ran


# ---------------------------------------------------------------- launch budget


class _CountKernels(TorchDispatchMode):
    """Counts aten ops that launch work (not views, not allocations), outside the interpreter."""

    FREE = {"empty", "empty_strided", "detach", "lift_fresh", "_unsafe_view", "alias"}

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not _Interpreter.inside and not func.is_view and name not in self.FREE:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def count_layer_launches(model, inputs, monkeypatch):
    """Per packed layer call: (aten ops, Triton launches, whether it eliminated)."""
    monkeypatch.setattr("kernels.launch.poison_outputs", lambda: False)  # the tests' NaN fills
    original = packed.packed_layer
    layers = []

    def counted(parts, x, shapes, positions):
        triton_launches = []
        with _Interpreter.watching(monkeypatch, on_launch=triton_launches.append), _CountKernels() as mode:
            out = original(parts, x, shapes, positions)
        layers.append((list(mode.ops), len(triton_launches), shapes.eliminates))
        return out

    with torch.no_grad(), packed_path():
        model(**inputs)  # once uncounted: builds the per-layer stacked QKV weights (cached)
        monkeypatch.setattr(packed, "packed_layer", counted)
        model(**inputs)
    return layers


@pytest.mark.interpreter
@pytest.mark.parametrize("retention", [FIXED, FRACTIONS], ids=["fixed", "proportional"])
def test_launch_budget_per_layer(retention, monkeypatch):
    model = build(BertForSequenceClassification, **WIDE)
    powerbert.patch(model, list(retention))
    layers = count_layer_launches(model, batch(sizes=SIZES), monkeypatch)
    assert len(layers) == len(retention)
    for ops, triton_launches, eliminates in layers:
        total = len(ops) + triton_launches
        budget = packed.LAUNCHES_PER_ELIMINATING_LAYER if eliminates else packed.LAUNCHES_PER_KEEPING_LAYER
        assert total <= budget, f"{total} launches ({ops} + {triton_launches} Triton) > {budget}"
    assert any(eliminates for *_, eliminates in layers)


# Launches of a forward outside its layers: the embeddings (3 lookups, 2 adds, LayerNorm: 6), the
# entry packing (1), the exit into the padded layout (up to 4) and a pooler + classifier (up to 5).
LAUNCHES_OUTSIDE_LAYERS = 16


@pytest.mark.interpreter
@pytest.mark.parametrize("cls", [BertForSequenceClassification, BertModel], ids=["classifier", "bare"])
@pytest.mark.parametrize("retention", [FIXED, FRACTIONS], ids=["fixed", "proportional"])
def test_launch_budget_per_forward(retention, cls, monkeypatch):
    """A whole forward: at most 9 launches per layer plus LAUNCHES_OUTSIDE_LAYERS, and nothing
    that reads a device value (transformers is handed no mask: its ``.all()`` is gone)."""
    monkeypatch.setattr("kernels.launch.poison_outputs", lambda: False)
    model = build(cls, **WIDE)
    powerbert.patch(model, list(retention))
    inputs = batch(sizes=SIZES)
    triton_launches = []
    with torch.no_grad(), packed_path():
        model(**inputs)  # builds the stacked QKV weights
        with _Interpreter.watching(monkeypatch, on_launch=triton_launches.append), _CountKernels() as mode:
            model(**inputs)
    total = len(mode.ops) + len(triton_launches)
    budget = len(retention) * packed.LAUNCHES_PER_ELIMINATING_LAYER + LAUNCHES_OUTSIDE_LAYERS
    assert total <= budget, f"{total} launches ({mode.ops} + {len(triton_launches)} Triton) > {budget}"
    assert not {"_local_scalar_dense", "all", "any", "nonzero", "item"} & set(mode.ops), mode.ops


# ---------------------------------------------------------------- on a GPU (skipped here)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_flash_attention_lse_matches_the_triton_varlen_kernel(dtype):
    """FlashAttention-2's varlen lse is [H, T], natural log, as the significance kernel reads it."""
    from kernels.varlen_attention import varlen_attention

    torch.manual_seed(0)
    lengths = [128, 77, 1, 33]
    cu = torch.tensor([0] + list(np.cumsum(lengths)), dtype=torch.int32, device="cuda")
    qkv = torch.randn(sum(lengths), 3, 12, 64, device="cuda", dtype=dtype)
    q, k, v = qkv.unbind(1)
    assert dispatch.flash_attention_serves(q)
    out, lse = dispatch.varlen_attention(q, k, v, cu, max(lengths))
    out_ref, lse_ref = varlen_attention(q, k, v, cu, max(lengths), backend="triton")
    assert lse.shape == lse_ref.shape == (12, sum(lengths))
    torch.testing.assert_close(lse, lse_ref, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(out.float(), out_ref.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("retention", [(40, 30, 20, 10), (0.7, 0.5, 0.3, 0.1)], ids=["fixed", "proportional"])
def test_packed_on_cuda_equals_padded_path(retention, dtype, graphs, monkeypatch):
    """The default CUDA path is the packed one (FlashAttention-2), replayed from the graph pool
    unless ``cuda_graphs=False``; it agrees with the padded path."""
    calls = spy_packed(monkeypatch)
    if graphs:
        pool_run = packed_graphs.GraphPool.run
        monkeypatch.setattr(packed_graphs.GraphPool, "run",
                            lambda self, *a, **k: calls.append(1) or pool_run(self, *a, **k))
    config = dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, num_hidden_layers=4,
                  max_position_embeddings=128)
    model = build(BertModel, **config).to("cuda", dtype)
    powerbert.patch(model, list(retention), cuda_graphs=graphs)
    inputs = batch(sizes=(64, 50, 17, 3, 1), length=64)
    cuda_inputs = {name: t.cuda() for name, t in inputs.items()}
    with torch.no_grad():
        default = model(**dict(cuda_inputs, attention_mask=inputs["attention_mask"]))  # CPU mask: no sync
        default_cuda = model(**cuda_inputs)
        with dispatch.use_packed(False):
            padded = model(**cuda_inputs)
    assert len(calls) == 2
    mask = padded.kept_mask
    width = mask.shape[1]
    torch.testing.assert_close(default.last_hidden_state, default_cuda.last_hidden_state)
    assert torch.equal(default.kept_mask[:, :width].cpu(), mask.cpu())
    agree = (default.kept_positions[:, :width][mask] == padded.kept_positions[mask]).float().mean().item()
    assert agree > 0.97, f"selection agrees on {agree:.1%} of survivors (near-ties in half precision aside)"
    same = (default.kept_positions[:, :width] == padded.kept_positions).all(1) & mask.any(1)
    torch.testing.assert_close(default.last_hidden_state[:, :width][same], padded.last_hidden_state[same],
                               atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- the graph pool


from powerbert.elimination import packed_graphs  # noqa: E402
from powerbert.elimination.packed_plan import Bucket, bucket_capacities  # noqa: E402


def test_token_buckets_grow_and_hold():
    previous = 0
    for tokens in range(1, packed_graphs.MAX_TOKENS + 1, 37):
        capacity = packed_graphs.token_bucket(tokens)
        assert capacity >= tokens and capacity % packed_graphs.TOKEN_STEP == 0 and capacity >= previous
        previous = capacity
    assert packed_graphs.token_bucket(packed_graphs.MAX_TOKENS + 1) is None
    assert packed_graphs.token_bucket(1) == 128 and packed_graphs.token_bucket(2049) == 2560


def test_bucket_for_and_its_limits():
    assert packed_graphs.bucket_for(3, 200, 100) == Bucket(4, 256, 128)
    assert packed_graphs.bucket_for(1, 1, 1) == Bucket(1, 128, 64)
    assert packed_graphs.bucket_for(257, 300, 10) is None  # beyond the largest batch bucket
    assert packed_graphs.bucket_for(8, 100, 513) is None   # beyond the selection kernel's block
    assert packed_graphs.bucket_for(0, 0, 0) is None


@settings(max_examples=300, deadline=None)
@given(retention=retentions, lengths=st.lists(st.integers(0, 512), min_size=1, max_size=64),
       minimum_seed=st.integers(0, 3), cls_only=st.booleans())
def test_bucket_capacities_hold_every_batch_of_their_bucket(retention, lengths, minimum_seed, cls_only):
    minimum = None
    if isinstance(retention[0], float) and minimum_seed:
        minimum = tuple(1 + (layer * minimum_seed) % 5 for layer in range(len(retention)))
    bucket = packed_graphs.bucket_for(len(lengths), sum(lengths), max(lengths))
    assert bucket is not None
    mask = np.arange(512)[None, :] < np.asarray(lengths)[:, None]
    plan = plan_packed(mask, retention, minimum=minimum, cls_only_last=cls_only, bucket=bucket)
    capacities = bucket_capacities(bucket, retention, minimum, cls_only)
    for layer in range(len(retention) + 1):
        assert plan.rows[layer] <= capacities.rows[layer], layer
        assert plan.max_len[layer] <= capacities.max_len[layer], layer
    for layer, eliminates in enumerate(plan.eliminates):
        assert capacities.eliminates[layer] or not eliminates, layer
    cu = plan.device_arrays["cu"].numpy()
    assert cu.shape == (len(retention) + 1, bucket.batch + 1)
    np.testing.assert_array_equal(cu[:, :len(lengths) + 1], plan.cu)
    assert (cu[:, len(lengths):] == plan.cu[:, -1:]).all(), "sequences past the batch are empty"


@contextlib.contextmanager
def emulated_graph_path():
    with packed_path(), packed_graphs.emulate_graphs() as emulator:
        yield emulator


def pool_of(model):
    return packed_graphs.pool_for(model.bert.encoder if hasattr(model, "bert") else model.encoder)


@pytest.mark.interpreter
@pytest.mark.parametrize("retention", [FIXED, FRACTIONS], ids=["fixed", "proportional"])
def test_graph_replays_equal_the_eager_packed_forward(retention):
    """Through the pool (graph semantics emulated: static inputs read at replay, outputs written
    into the captured buffers), every batch gives what the eager packed forward gives, batches of
    one bucket share one graph, and outputs are fresh tensors."""
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(retention))
    batches = [batch(sizes=SIZES), batch(sizes=(13, 2, 7, 3, 1), seed=2), batch(sizes=(5, 12, 13, 3), seed=3)]
    with torch.no_grad():
        with packed_path():
            eager = [model(**inputs) for inputs in batches]
        with emulated_graph_path() as emulator:
            graphed = [model(**inputs) for inputs in batches]
            first_again = model(**batches[0])
    pool = pool_of(model)
    assert emulator.replays == 4
    assert len(pool.graphs) == 2  # (13, 9, 4, 1) and (5, 12, 13, 3) share Bucket(4, 128, 64); 5 rows: 8
    for want, got in zip(eager, graphed):
        torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state)
        assert torch.equal(got.kept_mask, want.kept_mask) and torch.equal(got.kept_positions, want.kept_positions)
    # a later replay of the same graph does not touch what an earlier call returned
    torch.testing.assert_close(graphed[0].last_hidden_state, eager[0].last_hidden_state)
    torch.testing.assert_close(first_again.last_hidden_state, eager[0].last_hidden_state)


@pytest.mark.interpreter
def test_graph_replays_see_weights_written_in_place():
    """A replay runs no Python: the pool refreshes the stacked QKV weight (in place, at the address
    the graph holds) before replaying, so an in-place write since the capture is seen."""
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=SIZES)
    with torch.no_grad(), emulated_graph_path():
        model(**inputs)  # captured
        model.encoder.layer[0].attention.self.query.weight.mul_(1.7)  # same address, new version
        graphed = model(**inputs).last_hidden_state
    with torch.no_grad(), packed_path():
        eager = model(**inputs).last_hidden_state
    torch.testing.assert_close(graphed, eager)


@pytest.mark.interpreter
def test_graph_pool_is_bounded_and_follows_the_weights(monkeypatch):
    model = build(BertForSequenceClassification, **WIDE)
    powerbert.patch(model, list(FIXED))
    pool = pool_of(model)
    monkeypatch.setattr(pool, "max_graphs", 2)
    with torch.no_grad(), emulated_graph_path():
        for rows in (1, 2, 3, 5):  # four batch buckets: 1, 2, 4, 8
            model(**batch(sizes=(13,) * rows))
        assert [key[0].batch for key in pool.graphs] == [4, 8]  # least recently used dropped
        inputs = batch(sizes=SIZES)
        model(**inputs)
        layer = model.bert.encoder.layer[1]
        layer.attention.self.value.weight.mul_(0.5)  # in place: the stacked QKV is refreshed in place
        layer.intermediate.dense.weight = torch.nn.Parameter(layer.intermediate.dense.weight * 2)  # moved
        graphed = model(**inputs).logits
    with torch.no_grad():
        padded = model(**inputs).logits
    torch.testing.assert_close(graphed, padded, atol=1e-4, rtol=1e-4)


@pytest.mark.interpreter
def test_cuda_graphs_false_runs_eagerly(monkeypatch):
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED), cuda_graphs=False)
    runs = []
    monkeypatch.setattr(packed_graphs.GraphPool, "run", lambda *a, **k: runs.append(1))
    with torch.no_grad(), emulated_graph_path():
        model(**batch(sizes=SIZES))
    assert not runs
    with pytest.raises(TypeError, match="cuda_graphs"):
        powerbert.patch(build(BertModel, **WIDE), list(FIXED), cuda_graphs="yes")


def test_capture_failure_falls_back_to_eager(monkeypatch):
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=SIZES)

    def broken(self, fn, refill):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(packed_graphs.EmulatedCapture, "capture", broken)
    with torch.no_grad(), emulated_graph_path(), pytest.warns(RuntimeWarning, match="runs eagerly"):
        graphed = model(**inputs)
    with torch.no_grad(), packed_path():
        eager = model(**inputs)
    torch.testing.assert_close(graphed.last_hidden_state, eager.last_hidden_state)


@pytest.mark.interpreter
@pytest.mark.parametrize("first", ["inference_mode", "no_grad"])
def test_inference_mode_and_no_grad_calls_mix(first):
    """Caches and static buffers made under one mode serve calls under the other (a weight
    refresh in between): they are normal tensors, never inference tensors."""
    modes = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad}
    second = "no_grad" if first == "inference_mode" else "inference_mode"
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=SIZES)
    with packed_graphs.emulate_graphs(), packed_path():
        with modes[first]():
            model(**inputs)
        with torch.no_grad():
            model.encoder.layer[0].attention.self.query.weight.mul_(1.1)
        with modes[second]():
            graphed = model(**inputs).last_hidden_state.clone()
    with torch.no_grad(), packed_path():
        eager = model(**inputs).last_hidden_state
    torch.testing.assert_close(graphed, eager)


# ---------------------------------------------------------------- every family


def _family_build(name, head):
    from test_families import CASES, build as build_family

    wide = (dict(dim=64, n_heads=2, hidden_dim=96) if name == "distilbert"
            else dict(hidden_size=64, num_attention_heads=2, intermediate_size=96))
    case = CASES[name]
    return build_family(name, case.head if head else None, **wide)


@pytest.mark.interpreter
@pytest.mark.parametrize("head", [False, True], ids=["base", "classifier"])
@pytest.mark.parametrize("name", ["albert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet"])
def test_every_family_packed_equals_padded(name, head, monkeypatch):
    """Each family takes the packed forward (MPNet, whose position bias needs the padded layout,
    does not) and gives what the padded forward gives: survivors exactly, values within fp32
    tolerance, classifier logits too."""
    from test_families import batch as family_batch

    calls = spy_packed(monkeypatch)
    model = _family_build(name, head)
    powerbert.patch(model, [0.7, 0.45, 0.2])
    inputs = family_batch(sizes=SIZES)
    with torch.no_grad():
        padded = model(**inputs)
        with packed_path():
            packed_out = model(**inputs)
    assert bool(calls) == (name != "mpnet")
    if head:
        torch.testing.assert_close(packed_out.logits, padded.logits, atol=1e-4, rtol=1e-4)
        return
    mask = padded.kept_mask
    width = mask.shape[1]
    assert torch.equal(packed_out.kept_mask[:, :width], mask)
    assert torch.equal(packed_out.kept_positions[:, :width][mask], padded.kept_positions[mask])
    torch.testing.assert_close(packed_out.last_hidden_state[:, :width][mask], padded.last_hidden_state[mask],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.interpreter
def test_parameters_made_under_inference_mode():
    """A model built (loaded) under inference_mode has inference-tensor parameters, which keep no
    version counter: the stacked-QKV cache still works."""
    with torch.inference_mode():
        model = build(BertModel, **WIDE)
        powerbert.patch(model, list(FIXED))
        inputs = batch(sizes=SIZES)
        with packed_path():
            packed_out = model(**inputs)
        padded = model(**inputs)
    mask = padded.kept_mask
    torch.testing.assert_close(packed_out.last_hidden_state[:, :mask.shape[1]][mask], padded.last_hidden_state[mask],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.interpreter
def test_caches_follow_replaced_modules_and_outputs_are_the_callers(monkeypatch):
    """The per-encoder layer cache notices a replaced Linear (any registration anywhere), a
    quantised one leaves the packed path, and a returned kept mask is the caller's to change
    (the cached plan keeps its own)."""
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=SIZES)
    with torch.no_grad(), packed_path():
        first = model(**inputs)
        first.kept_mask.fill_(False)
        value = model.encoder.layer[1].attention.self.value
        swapped = torch.nn.Linear(value.in_features, value.out_features)
        model.encoder.layer[1].attention.self.value = swapped
        second = model(**inputs)
    with torch.no_grad():
        padded = model(**inputs)
    mask = padded.kept_mask
    assert torch.equal(second.kept_mask[:, :mask.shape[1]], mask)
    torch.testing.assert_close(second.last_hidden_state[:, :mask.shape[1]][mask], padded.last_hidden_state[mask],
                               atol=1e-4, rtol=1e-4)
    calls = spy_packed(monkeypatch)
    with torch.no_grad(), packed_path():
        model(**inputs)
    assert calls
    model.encoder.layer[1].attention.self.value = torch.ao.nn.quantized.dynamic.Linear(
        swapped.in_features, swapped.out_features)
    calls.clear()
    with torch.no_grad(), packed_path():
        model(**inputs)
    assert not calls, "a quantised Linear keeps the padded path"


@pytest.mark.interpreter
def test_a_batch_without_real_tokens_keeps_the_padded_forward(monkeypatch):
    calls = spy_packed(monkeypatch)
    model = build(BertModel, **WIDE)
    powerbert.patch(model, list(FIXED))
    inputs = batch(sizes=(0, 0))
    with torch.no_grad(), packed_path():
        out = model(**inputs)
    assert not calls and not out.kept_mask.any() and torch.isfinite(out.last_hidden_state).all()
    with torch.no_grad(), packed_path():
        model(**batch(sizes=(0, 5)))  # one empty row among real ones: packed
    assert calls
