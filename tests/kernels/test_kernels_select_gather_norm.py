"""Fused segmented top-k + gather + bias + LayerNorm on packed rows (kernels.select_gather_norm).

Survivor indices (the ``source`` output) must equal the reference exactly; y and y_plus agree
with the reference computed in fp64 within a per-dtype tolerance. Outputs are NaN / -1
poisoned before the kernel writes them (POWERBERT_POISON_OUTPUTS=1, also on the GPU run), so
an unwritten survivor row fails, and rows past cu_out[B] must stay untouched.

The interpreter costs ~2 ms per output row and a sort per program: the packed layouts stay
small (a few sequences of <= 40 rows; one of 128 and one of 512 with few survivors) and the
property test draws few examples.
"""
import importlib

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_inputs import nan_of
from spec_reference import spec_keep

from kernels.select_gather_norm import (MAX_ROWS, aot_calls, select_gather_norm, select_gather_norm_ref,
                                        select_gather_norm_torch)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# y, y_plus against the fp64 reference: fp32 math, then one rounding to the output dtype
# (LayerNorm outputs here reach ~|10|: half an ulp of bf16 there is 2**-5).
TOL = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1e-2, rtol=1e-2),
    torch.float64: dict(atol=1e-12, rtol=1e-12),
}
# A packed layout covering the edge cases at once: an empty sequence, a length-1 sequence,
# [CLS] alone (k = 1), keep-all (k = n), a sequence whose survivors span two programs
# (k > MAX_ROWS), and max_len_in / max_keep above every n_b / k_b.
MIXED = dict(lengths=[5, 0, 1, 17, 9, 24, 6], keeps=[3, 0, 1, 17, 1, 20, 6], max_len_in=27, max_keep=21)
NO_SELECT = dict(lengths=[5, 0, 1, 19, 2], keeps=[5, 0, 1, 19, 2], max_len_in=19, max_keep=19)
assert max(MIXED["keeps"]) > MAX_ROWS
# The module itself (its TILE_ELEMS is patched): ``import kernels.<op> as m`` would bind the op,
# which kernels/__init__ exports under the module's name.
SGN = importlib.import_module("kernels.select_gather_norm")


# +inf + -inf in a score sum is NaN by design ('specials'); the interpreter's numpy says so.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    """Poison fresh outputs on the GPU run too (the interpreter poisons anyway)."""
    monkeypatch.setenv("POWERBERT_POISON_OUTPUTS", "1")


def _offsets(counts, device):
    return torch.tensor([0] + torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _partials(H, T, kind, g):
    """[H, T] float32 column sums. 'random': distinct sums; 'ties': small integers (many equal
    sums, exact in any order); 'specials': ties plus NaN of both sign bits, +-0.0 and +-inf."""
    if kind == "random":
        return torch.rand(H, T, generator=g) * 4
    p = torch.randint(0, 3, (H, T), generator=g).float()
    if kind == "specials":
        codes = torch.randint(0, 12, (H, T), generator=g)
        p = torch.where(codes == 0, nan_of(torch.float32, False), p)
        p = torch.where(codes == 1, nan_of(torch.float32, True), p)
        p = torch.where(codes == 2, -0.0, p)
        p = torch.where(codes == 3, float("-inf"), p)
        p = torch.where(codes == 4, float("inf"), p)
        p[:, 0] = nan_of(torch.float32, True)  # the first sequence's [CLS] scores NaN: still kept
    return p


def make_case(lengths, keeps, max_len_in, max_keep, *, D, dtype, device, H=3, kind="ties", select=True,
              pre=True, res=True, tail=3, row_pad=0, seed=0):
    """Keyword arguments of select_gather_norm for a packed layout. ``row_pad`` > 0: x is a
    [T, D] view of a [T, D + row_pad] tensor (row stride > D); ``tail``: extra output rows."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    x = (torch.randn(T, D + row_pad, generator=g) * 2 + 0.5).to(dtype)[:, :D]
    vec = lambda scale: (torch.randn(D, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    return dict(
        x=x.to(device), partials=_partials(H, T, kind, g).to(device) if select else None,
        cu_in=_offsets(lengths, device), cu_out=_offsets(keeps, device),
        max_len_in=max_len_in, max_keep=max_keep, out_rows=sum(keeps) + tail,
        weight=1 + vec(0.5), bias=vec(1.0), eps=1e-5, pre_bias=vec(1.0) if pre else None,
        residual_bias=vec(1.0) if res else None, select=select,
    )


def _fp64(case):
    """The case with x and the [D] vectors in float64: the reference then computes in fp64
    (partials stay float32: the same selection)."""
    out = dict(case)
    for name in ("x", "weight", "bias", "pre_bias", "residual_bias"):
        if out[name] is not None:
            out[name] = out[name].double()
    return out


def check(out, case):
    """source equal to the reference exactly (and, per sequence, to the spec's plain selection
    on the scores summed in fp32); y / y_plus within TOL of the fp64 reference; tail untouched."""
    y, y_plus, source = (None if t is None else t.cpu() for t in out)
    x = case["x"]
    D, out_rows = x.shape[1], case["out_rows"]
    ref_y, ref_plus, ref_source = (None if t is None else t.cpu() for t in select_gather_norm_ref(**_fp64(case)))
    written = int(case["cu_out"][-1])
    assert source.dtype == torch.int64 and tuple(source.shape) == (out_rows,)
    assert torch.equal(source[:written], ref_source[:written]), f"\n{source[:written]}\n!=\n{ref_source[:written]}"
    if case["select"]:
        cu_in, cu_out, p = case["cu_in"].tolist(), case["cu_out"].tolist(), case["partials"].cpu()
        for b in range(len(cu_in) - 1):
            s = p[0, cu_in[b]:cu_in[b + 1]]
            for h in range(1, p.shape[0]):
                s = s + p[h, cu_in[b]:cu_in[b + 1]]
            kb = cu_out[b + 1] - cu_out[b]
            got = (source[cu_out[b]:cu_out[b + 1]] - cu_in[b]).tolist()
            assert got == (spec_keep(s, kb) if kb else []), (b, got)
    assert y.dtype == x.dtype and tuple(y.shape) == (out_rows, D)
    torch.testing.assert_close(y[:written].double(), ref_y[:written], **TOL[x.dtype])
    if case["residual_bias"] is None:
        assert y_plus is None
    else:
        assert y_plus.dtype == x.dtype and tuple(y_plus.shape) == (out_rows, D)
        torch.testing.assert_close(y_plus[:written].double(), ref_plus[:written], **TOL[x.dtype])
    # rows past cu_out[B] are not written: still poisoned
    assert torch.isnan(y[written:]).all() and (source[written:] == -1).all()
    if y_plus is not None:
        assert torch.isnan(y_plus[written:]).all()


# ----------------------------------------------------------------------------- Triton vs reference


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,D", [("random", 40), ("ties", 33), ("specials", 33)])
def test_select_matches_reference(kind, D, dtype, device):
    case = make_case(**MIXED, D=D, dtype=dtype, device=device, kind=kind)
    check(select_gather_norm(**case, backend="triton"), case)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_select_is_identity_gather(dtype, device):
    case = make_case(**NO_SELECT, D=40, dtype=dtype, device=device, select=False)
    out = select_gather_norm(**case, backend="triton")
    check(out, case)
    written = int(case["cu_out"][-1])
    assert torch.equal(out[2][:written].cpu(), torch.arange(written))


@pytest.mark.parametrize("select", [True, False])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_positions_are_carried(select, backend, device):
    """With ``positions``, ``source`` holds each survivor's entry of it (strided positions too):
    the input position a packed row carries through the layers, at no launch of its own."""
    if backend == "triton" and device == "cpu" and not os.environ.get("TRITON_INTERPRET"):
        pytest.skip("Triton on CPU needs the interpreter")
    case = make_case(**(MIXED if select else NO_SELECT), D=33, dtype=torch.float16, device=device, select=select)
    T_in = case["x"].shape[0]
    g = torch.Generator().manual_seed(7)
    positions = torch.randint(0, 10_000, (2 * T_in,), generator=g).to(device)[::2]  # stride 2
    _, _, rows = select_gather_norm(**case, backend=backend)
    y, _, carried = select_gather_norm(**case, positions=positions, backend=backend)
    written = int(case["cu_out"][-1])
    assert torch.equal(carried[:written], positions[rows[:written]])
    ref = select_gather_norm_ref(**case, positions=positions)[2]
    assert torch.equal(carried[:written].cpu(), ref[:written].cpu())


@pytest.mark.parametrize("pre,res", [(False, False), (True, False), (False, True)])
def test_bias_variants(pre, res, device):
    case = make_case(**MIXED, D=33, dtype=torch.bfloat16, device=device, pre=pre, res=res)
    check(select_gather_norm(**case, backend="triton"), case)


def test_non_contiguous_inputs(device):
    """x with a row stride > D, partials a transposed view, a strided weight, an fp32 bias."""
    case = make_case(**MIXED, D=33, dtype=torch.float16, device=device, row_pad=7, kind="ties")
    assert case["x"].stride() == (40, 1)
    case["partials"] = case["partials"].t().contiguous().t()
    assert case["partials"].stride() == (1, 3)
    case["weight"] = torch.stack([case["weight"], case["weight"] * 0], dim=1)[:, 0]
    assert case["weight"].stride() == (2,)
    case["bias"] = case["bias"].float()  # the affine may have another float dtype than x
    check(select_gather_norm(**case, backend="triton"), case)


@pytest.mark.parametrize("tile_elems", [64, 128, 2048])
def test_row_tiles(tile_elems, monkeypatch, device):
    """Rows normalised 1, 2 and 32 at a time (TILE = tile_elems // BLOCK_D, BLOCK_D = 64 here):
    several tiles per program, the last one partial."""
    monkeypatch.setattr(SGN, "TILE_ELEMS", tile_elems)
    case = make_case(**MIXED, D=33, dtype=torch.float32, device=device, kind="specials")
    check(select_gather_norm(**case, backend="triton"), case)


def test_bert_width(device):
    """D = 768 (BLOCK_D 1024, tiles of 4 rows), with a row stride > D."""
    case = make_case([9, 5, 1], [7, 5, 1], 9, 7, D=768, dtype=torch.bfloat16, device=device, row_pad=32)
    check(select_gather_norm(**case, backend="triton"), case)


def test_long_sequences(device):
    """The BERT-base length: a 128-row selection block, 77 survivors over five programs."""
    case = make_case([128, 100], [77, 3], 128, 77, D=24, dtype=torch.float32, device=device, H=2, kind="ties")
    check(select_gather_norm(**case, backend="triton"), case)


def test_max_selection_block(device):
    """max_len_in = 512, the largest selection block; few survivors (one program per sequence)."""
    case = make_case([512, 300], [4, 2], 512, 4, D=8, dtype=torch.float32, device=device, H=2, kind="specials")
    check(select_gather_norm(**case, backend="triton"), case)


def test_nothing_to_select(device):
    """No sequence, only empty sequences, or no output capacity: nothing launches, nothing fails."""
    for lengths, keeps, max_keep in (([], [], 0), ([0, 0], [0, 0], 0), ([0, 0], [0, 0], 4)):
        case = make_case(lengths, keeps, 8, max_keep, D=8, dtype=torch.float32, device=device, tail=2)
        y, y_plus, source = select_gather_norm(**case, backend="triton")
        assert tuple(y.shape) == (2, 8) and tuple(y_plus.shape) == (2, 8) and tuple(source.shape) == (2,)
        assert torch.isnan(y).all() and (source == -1).all()


def test_poisoning_catches_an_unwritten_row(device):
    """The checks fail when one survivor row is left as the poison left it."""
    case = make_case(**NO_SELECT, D=8, dtype=torch.float32, device=device, select=False)
    y, y_plus, source = select_gather_norm(**case, backend="triton")
    y[3] = float("nan")
    with pytest.raises(AssertionError):
        check((y, y_plus, source), case)


# ----------------------------------------------------------------------------- torch path


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "specials"])
def test_torch_path_matches_reference(kind, dtype):
    for layout, select in ((MIXED, True), (NO_SELECT, False)):
        for pre, res in ((True, True), (False, False)):
            case = make_case(**layout, D=33, dtype=dtype, device="cpu", kind=kind, select=select, pre=pre, res=res)
            check(select_gather_norm(**case, backend="torch"), case)
            check(select_gather_norm(**case), case)  # auto on CPU = torch path


def test_torch_path_long_sequence():
    case = make_case([700, 3], [300, 2], 700, 300, D=16, dtype=torch.float32, device="cpu", kind="specials")
    check(select_gather_norm(**case, backend="torch"), case)
    check(select_gather_norm_torch(*[case[k] for k in (
        "x", "partials", "cu_in", "cu_out", "max_len_in", "max_keep", "out_rows", "weight", "bias", "eps",
        "pre_bias", "residual_bias", "select")]), case)


def test_reference_semantics():
    """The reference on a hand-made case: summed scores, [CLS] forced, ties low, NaN last."""
    nan = float("nan")
    x = torch.arange(12, dtype=torch.float64).view(6, 2) * torch.tensor([1.0, -1.0], dtype=torch.float64)
    partials = torch.tensor([[0.0, 1.0, 2.0, 1.0, 5.0, nan], [0.0, 1.0, 0.0, 1.0, -5.0, 9.0]])
    w, b = torch.ones(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
    cu_in, cu_out = torch.tensor([0, 4, 6], dtype=torch.int32), torch.tensor([0, 2, 3], dtype=torch.int32)
    y, y_plus, source = select_gather_norm_ref(x, partials, cu_in, cu_out, max_len_in=4, max_keep=2, out_rows=4,
                                               weight=w, bias=b, eps=0.0, residual_bias=w)
    # sequence 0 scores [0, 2, 2, 2] -> [CLS] and j = 1 (tie to the lower j); sequence 1: [0, NaN] -> [CLS]
    assert source.tolist() == [0, 1, 4, -1]
    assert y[:3].tolist() == [[1.0, -1.0]] * 3 and y_plus[:3].tolist() == [[2.0, 0.0]] * 3
    assert torch.isnan(y[3]).all()


# ----------------------------------------------------------------------------- property test


@st.composite
def packed_cases(draw):
    B = draw(st.integers(1, 4))
    lengths = draw(st.lists(st.integers(0, 20), min_size=B, max_size=B))
    keeps = [draw(st.integers(1, n)) if n else 0 for n in lengths]
    select = draw(st.booleans())
    if not select:
        keeps = list(lengths)
    max_len_in = max(lengths) + draw(st.integers(0, 3))
    max_keep = max(keeps) + draw(st.integers(0, 3))
    case = make_case(lengths, keeps, max_len_in, max_keep, D=draw(st.sampled_from([8, 33])),
                     dtype=draw(st.sampled_from(DTYPES)), device="cpu", H=draw(st.integers(1, 3)),
                     kind=draw(st.sampled_from(["random", "ties", "specials"])), select=select,
                     pre=draw(st.booleans()), res=draw(st.booleans()), tail=draw(st.integers(0, 2)),
                     row_pad=draw(st.sampled_from([0, 3])), seed=draw(st.integers(0, 2 ** 31 - 1)))
    return case


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(packed_cases())
def test_property_triton_and_torch_match_reference(case):
    check(select_gather_norm(**case, backend="triton"), case)
    check(select_gather_norm(**case, backend="torch"), case)


# ----------------------------------------------------------------------------- errors


def _base():
    return make_case(**MIXED, D=8, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("change,error,message", [
    (dict(x=torch.zeros(4, 8, dtype=torch.int32)), TypeError, "x has unsupported dtype int32"),
    (dict(x=torch.zeros(62, 8, 1)), ValueError, r"x must be 2-D \[T_in, D\]"),
    (dict(x=torch.zeros(8, 62).t()), ValueError, "x must have unit stride in its last dim"),
    (dict(partials=None), ValueError, "partials is required when select=True"),
    (dict(partials=torch.zeros(3, 61)), ValueError, r"partials must be \[H, T_in\] = \[H >= 1, 62\]"),
    (dict(partials=torch.zeros(3, 62, dtype=torch.float16)), TypeError, "partials must be float32, got float16"),
    (dict(cu_in=torch.zeros(8, dtype=torch.int64)), TypeError, "cu_in must be int32, got int64"),
    (dict(cu_out=torch.zeros(8, dtype=torch.float32)), TypeError, "cu_out must be int32, got float32"),
    (dict(cu_in=torch.zeros(2, 4, dtype=torch.int32)), ValueError, r"cu_in must be 1-D \[B \+ 1\]"),
    (dict(cu_in=torch.zeros(0, dtype=torch.int32)), ValueError, r"cu_in must be 1-D \[B \+ 1\]"),
    (dict(cu_out=torch.zeros(5, dtype=torch.int32)), ValueError, r"cu_out must have the B \+ 1 = 8 entries"),
    (dict(cu_in=torch.zeros(8, dtype=torch.int32, device="meta")), ValueError, "cu_in must be on x's device cpu"),
    (dict(max_len_in=600), ValueError, r"backend='triton' needs max_len_in in \[0, 512\]"),
    (dict(max_len_in=27.0), TypeError, "max_len_in must be a Python int"),
    (dict(max_keep=torch.tensor(21)), TypeError, "max_keep must be a Python int"),
    (dict(out_rows=-1), ValueError, "out_rows must be a Python int >= 0, got -1"),
    (dict(weight=torch.ones(9)), ValueError, r"weight must have shape \[D\] = \[8\]"),
    (dict(bias=torch.zeros(8, dtype=torch.int64)), TypeError, "bias has unsupported dtype int64"),
    (dict(pre_bias=torch.zeros(1, 8)), ValueError, r"pre_bias must have shape \[D\] = \[8\]"),
    (dict(residual_bias=torch.zeros(8, device="meta")), ValueError, "residual_bias must be on x's device cpu"),
    (dict(eps=-1.0), ValueError, "eps must be a real number >= 0"),
    (dict(select=1), TypeError, "select must be a bool"),
    (dict(x=torch.zeros(62, 8, dtype=torch.float64)), TypeError,
     "backend='triton' does not support x of dtype float64"),
])
def test_errors(change, error, message):
    case = {**_base(), **change}
    with pytest.raises(error, match=message):
        select_gather_norm(**case, backend="triton")


def test_errors_backend_and_long_selection_on_torch_path():
    case = _base()
    with pytest.raises(ValueError, match="backend must be one of"):
        select_gather_norm(**case, backend="Triton")
    # the torch path has no selection block: any max_len_in (and select=False ignores partials)
    select_gather_norm(**{**case, "max_len_in": 600})
    select_gather_norm(**{**make_case(**NO_SELECT, D=8, dtype=torch.float32, device="cpu", select=False),
                          "partials": "unused", "max_len_in": 10 ** 6})


# ----------------------------------------------------------------------------- ahead-of-time


def test_aot_calls_name_every_variant():
    names = [name for module, name, _ in aot_calls(90)]
    assert names == [f"{v}[{d}]" for d in ("float32", "float16", "bfloat16")
                     for v in ("select_gather_norm", "gather_norm")]
    assert {module for module, _, _ in aot_calls(80)} == {"kernels.select_gather_norm"}
