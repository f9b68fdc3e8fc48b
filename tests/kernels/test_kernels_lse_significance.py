"""Per-head significance partials of packed attention from q, k and lse (kernels/lse_significance.py).

Runs the Triton kernel under TRITON_INTERPRET=1 on CPU tensors (set by conftest.py), or compiled
on CUDA with POWERBERT_TEST_GPU=1. lse is built here with torch (logsumexp of the explicit
per-sequence logits), so these tests need no other kernel. Shapes stay small: every program
instance costs the interpreter about a millisecond.
"""
import importlib
import math

import pytest
import torch

from kernel_inputs import poisoned, raises_one_line  # noqa: F401 (poisoned: a fixture)
from kernels import launch
from kernels.lse_significance import aot_calls, lse_significance, lse_significance_ref
from kernels.significance import significance_ref

# The file, not the op it is named after (kernels.lse_significance is the function).
lse_mod = importlib.import_module("kernels.lse_significance")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# q and k are cast to the dtype first and the fp64 reference reads those same rounded values and
# the same fp32 lse, so what is left is the fp32 logits, exp2 and column sums: one tolerance for
# all dtypes (the interpreter stays under 1.5e-6 relative; the rest is room for the GPU's
# approximate exp2 and accumulation order). atol covers the partials that underflow towards 0.
TOL = {
    torch.float32: dict(rtol=5e-5, atol=1e-7),
    torch.float16: dict(rtol=5e-5, atol=1e-7),
    torch.bfloat16: dict(rtol=5e-5, atol=1e-7),
}


def make_packed(lengths, H, d, dtype, device, tail=0, layout="fused", scale=None):
    """q, k [T, H, d] in ``dtype``, lse [H, T] fp32, cu_seqlens int32, max_seqlen: sequences of
    ``lengths`` packed back to back, then ``tail`` capacity rows of no sequence, NaN in q, k
    and lse (they must never be read).

    layout "fused": q, k views of one [T, 3, H, d] projection (strides (3·H·d, d, 1));
    "contiguous": [T, H, d]; "head_major": [H, T, d] memory viewed as [T, H, d].
    """
    T = sum(lengths) + tail
    if layout == "fused":
        x = (torch.randn(T, 3, H, d) * 1.5).to(dtype)
        x[sum(lengths):] = float("nan")
        q, k = x[:, 0], x[:, 1]
    else:
        q, k = ((torch.randn(T, H, d) * 1.5).to(dtype) for _ in range(2))
        for t in (q, k):
            t[sum(lengths):] = float("nan")
        if layout == "head_major":
            q, k = (t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k))
    cu = torch.tensor([0] + torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32)
    lse = explicit_lse(q, k, cu, scale)
    return q.to(device), k.to(device), lse.to(device), cu.to(device), max(lengths, default=0)


def explicit_logits(q, k, start, end, scale=None):
    """[H, n, n] fp64 logits of one sequence (query i, key j)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    qs, ks = q[start:end].double().transpose(0, 1), k[start:end].double().transpose(0, 1)
    return torch.matmul(qs, ks.transpose(-1, -2)) * scale


def explicit_lse(q, k, cu, scale=None):
    """[H, T] fp32 natural-log row log-sum-exp per sequence (FlashAttention's softmax_lse); NaN on
    rows of no sequence."""
    T, H, _ = q.shape
    lse = torch.full((H, T), float("nan"))
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            lse[:, start:end] = torch.logsumexp(explicit_logits(q, k, start, end, scale), dim=-1).float()
    return lse


def reference64(q, k, lse, cu, scale=None):
    return lse_significance_ref(q.cpu().double(), k.cpu().double(), lse.cpu(), cu.cpu(), scale)


def run_triton(q, k, lse, cu, max_seqlen, scale=None, **launch_kwargs):
    """The Triton path. On CUDA the public function refuses fp32 for backend="triton" (fp32 tl.dot
    spills); the kernel still computes it, through the launcher (as do block overrides)."""
    if launch_kwargs or (q.is_cuda and q.dtype == torch.float32):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return lse_mod.launch_lse_significance(q, k, lse, cu, max_seqlen, scale, **launch_kwargs)
    return lse_significance(q, k, lse, cu, max_seqlen, scale=scale, backend="triton")


def assert_partials_close(got, want, cu, tol, poisoned=True):
    """Rows of a sequence: finite (written) and close to the fp64 reference. Rows of no sequence:
    still NaN (not written), when the output was poisoned."""
    got = got.cpu()
    H, T = want.shape
    assert got.dtype == torch.float32 and tuple(got.shape) == (H, T)
    used = int(cu[-1])
    assert torch.isfinite(got[:, :used]).all(), "a row of a sequence was not written (NaN poison left)"
    torch.testing.assert_close(got[:, :used].double(), want[:, :used], **tol)
    if poisoned:
        assert torch.isnan(got[:, used:]).all(), "a row of no sequence was written"


# --------------------------------------------------------------------------------------------
# The reference is the specification: check it against the definition, written out here.
# --------------------------------------------------------------------------------------------
def test_reference_matches_definition():
    """Exact lse: partials are the column sums of each sequence's softmax without the diagonal."""
    H, d, lengths = 2, 4, [3, 0, 4, 1]
    cu = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32)
    q, k = (torch.randn(9, H, d, dtype=torch.float64) for _ in range(2))  # row 8: no sequence
    lse = torch.randn(H, 9, dtype=torch.float64)
    want = torch.full((H, 9), math.nan, dtype=torch.float64)
    for b, n in enumerate(lengths):
        rows = range(int(cu[b]), int(cu[b]) + n)
        for h in range(H):
            for i in rows:
                logits = torch.stack([q[i, h] @ k[j, h] / math.sqrt(d) for j in rows])
                lse[h, i] = torch.logsumexp(logits, 0)
            for j in rows:
                want[h, j] = sum((math.exp(float(q[i, h] @ k[j, h]) / math.sqrt(d) - float(lse[h, i]))
                                  for i in rows if i != j), 0.0)
    got = lse_significance_ref(q, k, lse, cu)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Triton path against the fp64 reference
# --------------------------------------------------------------------------------------------
CASES = [  # (lengths, d, tail capacity rows)
    ([1], 32, 0),              # length 1: no off-diagonal vote, partial exactly 0
    ([64], 64, 3),             # two full tiles, diagonal in both
    ([17, 0, 33], 32, 5),      # ragged, an empty sequence, a 1-row tail block
    ([2, 64, 1], 64, 0),       # sequence starts off any tile boundary
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}-d{}-tail{}".format("_".join(map(str, c[0])), c[1], c[2]))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, dtype, device, poisoned):
    lengths, d, tail = case
    q, k, lse, cu, max_seqlen = make_packed(lengths, 2, d, dtype, device, tail=tail)
    got = run_triton(q, k, lse, cu, max_seqlen)
    assert_partials_close(got, reference64(q, k, lse, cu), cu.cpu(), TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_heads_sum_to_the_spec(dtype, device):
    """Summing partials over heads, per sequence, is kernels.significance's spec applied to that
    sequence's explicit probabilities [1, H, n, n] with every token real."""
    H, d, lengths = 3, 64, [33, 2, 17]
    q, k, lse, cu, max_seqlen = make_packed(lengths, H, d, dtype, device, tail=4)
    got = run_triton(q, k, lse, cu, max_seqlen).cpu()
    q, k, bounds = q.cpu(), k.cpu(), cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        probs = torch.softmax(explicit_logits(q, k, start, end), dim=-1)[None]  # [1, H, n, n]
        spec = significance_ref(probs, torch.ones(1, end - start, dtype=torch.bool))[0]
        torch.testing.assert_close(got[:, start:end].sum(0).double(), spec, **TOL[dtype])


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16)])
def test_small_blocks(block_m, block_n, device, poisoned):
    """Many blocks with ragged tails, unequal query and key tiles: the diagonal falls inside a
    query tile at different offsets."""
    q, k, lse, cu, max_seqlen = make_packed([50, 17, 33], 2, 32, torch.float32, device, tail=2)
    got = run_triton(q, k, lse, cu, max_seqlen, block_m=block_m, block_n=block_n)
    assert_partials_close(got, reference64(q, k, lse, cu), cu.cpu(), TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_dot_variant(dtype, device, poisoned):
    """The GPU variant (tl.dot on the input dtype), run by the interpreter where it is exact for
    fp16/fp32 (its bf16 tl.dot is wrong)."""
    q, k, lse, cu, max_seqlen = make_packed([33, 5], 2, 32, dtype, device, tail=1)
    got = run_triton(q, k, lse, cu, max_seqlen, dot_in_input_dtype=True)
    assert_partials_close(got, reference64(q, k, lse, cu), cu.cpu(), TOL[dtype])


@pytest.mark.parametrize("layout, lse_layout", [("contiguous", "strided"), ("head_major", "transposed"),
                                                ("fused", "transposed")])
def test_strides(layout, lse_layout, device, poisoned):
    q, k, lse, cu, max_seqlen = make_packed([20, 9], 2, 32, torch.float16, device, tail=3, layout=layout)
    H, T = lse.shape
    if lse_layout == "strided":  # every other column of a wider buffer
        buf = torch.full((H, 2 * T), float("nan"), device=device)
        buf[:, ::2] = lse
        lse = buf[:, ::2]
    else:  # [T, H] memory, as a per-token layout would hold it
        lse = lse.t().contiguous().t()
    assert not lse.is_contiguous()
    got = run_triton(q, k, lse, cu, max_seqlen)
    assert_partials_close(got, reference64(q, k, lse, cu), cu.cpu(), TOL[torch.float16])


def test_scale_and_max_seqlen_slack(device, poisoned):
    """A custom scale (lse built with it), and max_seqlen far above every length: the extra key
    blocks return at once."""
    q, k, _, cu, _ = make_packed([9, 20], 2, 32, torch.float32, device, tail=2)
    lse = explicit_lse(q.cpu(), k.cpu(), cu.cpu(), scale=0.3).to(device)
    got = run_triton(q, k, lse, cu, 100, scale=0.3)
    assert_partials_close(got, reference64(q, k, lse, cu, scale=0.3), cu.cpu(), TOL[torch.float32])


def test_nothing_to_do(device, poisoned):
    """B = 0, all sequences empty (max_seqlen 0), and empty sequences with max_seqlen > 0: the
    output comes back with nothing written."""
    q, k, lse, _, _ = make_packed([4], 2, 32, torch.float16, device)
    for cu, max_seqlen in ((torch.zeros(1), 0), (torch.zeros(3), 0), (torch.zeros(3), 16)):
        got = run_triton(q, k, lse, cu.to(device=device, dtype=torch.int32), max_seqlen)
        assert got.shape == (2, 4) and torch.isnan(got).all()


def test_deterministic_inputs_untouched_no_host_sync(device, monkeypatch):
    """Bitwise equal over two runs (no atomics) and no .item()/.cpu()/.tolist() on the way
    (the launch must be capturable in a CUDA graph)."""
    q, k, lse, cu, max_seqlen = make_packed([40, 7], 2, 32, torch.float16, device, tail=2)
    before = [t.clone() for t in (q, k, lse, cu)]

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the launch")

    for name in ("item", "cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    first = run_triton(q, k, lse, cu, max_seqlen)
    second = run_triton(q, k, lse, cu, max_seqlen)
    monkeypatch.undo()
    used = int(cu[-1])
    assert torch.equal(first[:, :used], second[:, :used])
    for t, b in zip((q, k, lse, cu), before):  # NaN in the rows of no sequence
        torch.testing.assert_close(t, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.interpreter  # the backends on the same CPU tensors
def test_backends_agree_on_cpu():
    q, k, lse, cu, max_seqlen = make_packed([17, 3], 2, 32, torch.float32, "cpu", tail=2)
    ref = lse_significance_ref(q, k, lse, cu)
    auto = lse_significance(q, k, lse, cu, max_seqlen)  # CPU -> torch path
    forced = lse_significance(q, k, lse, cu, max_seqlen, backend="torch")
    for got in (auto, forced):  # NaN on the rows of no sequence
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    tri = lse_significance(q, k, lse, cu, max_seqlen, backend="triton")
    torch.testing.assert_close(tri[:, :20], ref[:, :20], rtol=1e-5, atol=1e-7)


def test_float64_runs_the_reference():
    """float64 inputs (backend None or "torch"): the reference in float64, float64 partials; lse
    may be float64 too."""
    q, k, lse, cu, max_seqlen = make_packed([9, 4], 2, 32, torch.float64, "cpu", tail=1)
    for lse_in in (lse, lse.double()):
        for backend in (None, "torch"):
            got = lse_significance(q, k, lse_in, cu, max_seqlen, backend=backend)
            want = lse_significance_ref(q, k, lse_in, cu)
            assert got.dtype == torch.float64
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------------------------
# Launch choices and the AOT entry points (no kernel runs)
# --------------------------------------------------------------------------------------------
def test_block_sizes():
    # BERT-base, B 8: 64x64 tiles, 2 * 8 * 12 = 192 programs at n 128 (and at n 77).
    assert lse_mod._block_sizes(128, 8, 12, interpret=False) == (64, 64, 4)
    assert lse_mod._block_sizes(77, 8, 12, interpret=False) == (64, 64, 4)
    # One sequence: the key block narrows to 16 (8 * 12 = 96 programs) to fill more SMs.
    assert lse_mod._block_sizes(128, 1, 12, interpret=False) == (64, 16, 2)
    assert lse_mod._block_sizes(5, 1, 1, interpret=False)[:2] == (16, 16)
    assert lse_mod._block_sizes(128, 8, 12, interpret=True)[:2] == (32, 32)


def test_aot_calls_names():
    calls = aot_calls(90)
    names = [name for _, name, _ in calls]
    assert len(names) == len(set(names)) == 12
    assert "lse_colsum[float16,d64]" in names and "lse_colsum[bfloat16,d128,n77]" in names
    assert {module for module, _, _ in calls} == {"kernels.lse_significance"}
    assert all(callable(call) for _, _, call in calls)


# --------------------------------------------------------------------------------------------
# Bad inputs: one-line errors naming the argument, before any kernel runs
# --------------------------------------------------------------------------------------------
def _good():
    q, k, lse, cu, max_seqlen = make_packed([5, 3], 2, 32, torch.float32, "cpu", tail=1)
    return dict(q=q, k=k, lse=lse, cu_seqlens=cu, max_seqlen=max_seqlen)


BAD = [
    (lambda a: a.update(q=a["q"].numpy()), TypeError, r"^q must be a torch.Tensor"),
    (lambda a: a.update(cu_seqlens=[0, 5, 8]), TypeError, r"^cu_seqlens must be a torch.Tensor"),
    (lambda a: a.update(q=a["q"][None]), ValueError, r"^q must be 3-D \[T, H, d\]"),
    (lambda a: a.update(k=a["k"][:4]), ValueError, r"^k must have q's shape"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError,
     r"^q must be float16, bfloat16, float32 or float64, got int32$"),
    (lambda a: a.update(k=a["k"].half()), TypeError, r"^k must have q's dtype float32, got float16$"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), backend="triton"), TypeError,
     r"^backend='triton' does not support q of dtype float64"),
    (lambda a: a.update(k=a["k"].to("meta")), ValueError, r"^k must be on q's device cpu, got meta$"),
    (lambda a: a.update(lse=a["lse"].to("meta")), ValueError, r"^lse must be on q's device"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].to("meta")), ValueError,
     r"^cu_seqlens must be on q's device cpu, got meta$"),
    (lambda a: a.update(q=torch.randn(9, 2, 48), k=torch.randn(9, 2, 48)), ValueError,
     r"^head dim d .* one of \(32, 64, 128\), got 48$"),
    (lambda a: a.update(q=torch.randn(9, 2, 64)[..., ::2], k=torch.randn(9, 2, 64)[..., ::2]), ValueError,
     r"^q must have stride 1 in its last dim"),
    (lambda a: a.update(k=torch.randn(9, 32, 2).transpose(1, 2)), ValueError,
     r"^k must have stride 1 in its last dim"),
    (lambda a: a.update(lse=a["lse"].t()), ValueError, r"^lse must have shape \[H, T\] = \[2, 9\], got \[9, 2\]$"),
    (lambda a: a.update(lse=a["lse"].half()), TypeError, r"^lse must be float32 .*got float16$"),
    (lambda a: a.update(lse=a["lse"].double()), TypeError, r"^lse must be float32 .*got float64$"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), TypeError, r"^cu_seqlens must be int32, got int64$"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"][None]), ValueError, r"^cu_seqlens must be 1-D \[B \+ 1\]"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"][:0]), ValueError, r"^cu_seqlens must be 1-D \[B \+ 1\]"),
    (lambda a: a.update(max_seqlen=torch.tensor(5)), TypeError, r"^max_seqlen must be a Python int"),
    (lambda a: a.update(max_seqlen=True), TypeError, r"^max_seqlen must be a Python int"),
    (lambda a: a.update(max_seqlen=-1), ValueError, r"^max_seqlen must be an int >= 0, got -1$"),
    (lambda a: a.update(scale="0.1"), TypeError, r"^scale must be a real number"),
    (lambda a: a.update(scale=math.inf), ValueError, r"^scale must be finite"),
    (lambda a: a.update(backend="cuda"), ValueError, r"^backend must be one of"),
]


@pytest.mark.parametrize("edit, exc, match", BAD, ids=[b[2] for b in BAD])
def test_bad_inputs(edit, exc, match):
    args = _good()
    edit(args)
    with raises_one_line(exc, match):
        lse_significance(**args)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"^backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                                         r"set before kernels\.lse_significance is imported"):
        lse_significance(**_good(), backend="triton")
