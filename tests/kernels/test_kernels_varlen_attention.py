"""Packed (varlen) attention forward with the row log-sum-exp (kernels/varlen_attention.py).

Runs the Triton kernel under TRITON_INTERPRET=1 on CPU tensors (set by conftest.py), or
compiled on CUDA with POWERBERT_TEST_GPU=1. Shapes stay small: every program instance costs
the interpreter about a millisecond. Inputs are views of one fused [T, 3, H, d] projection whose
capacity rows past cu[B] hold NaN, so a kernel that read them would fail every comparison.
"""
import importlib
import itertools
import math
import traceback

import pytest
import torch
import torch.nn.functional as F

from conftest import interpreting
from kernel_inputs import poisoned, raises_one_line  # noqa: F401 (poisoned: a fixture)
from kernels import launch
from kernels.varlen_attention import varlen_attention, varlen_attention_ref

# The module (``kernels.varlen_attention`` is the function: kernels/__init__.py).
va = importlib.import_module("kernels.varlen_attention")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (out atol, out rtol, lse atol = rtol): the kernel against the fp64 reference on the same
# (already rounded) inputs. out is stored in the input dtype (on the GPU P is also rounded to it
# before P·V); lse is an fp32 log-sum-exp of fp32 logits.
TOL = {
    torch.float32: (2e-5, 2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3, 2e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2, 2e-5),
}
# (sequence lengths, tail capacity rows past cu[B]): B = 1 and 3; lengths 0 (first, middle),
# 1, 17 (odd), 33 (a 1-row tail block), 64 (whole blocks).
CASES = [((33,), 3), ((64,), 0), ((17, 0, 64), 5), ((0, 1, 33), 2)]


def case_id(case):
    lengths, tail = case
    return "len" + "_".join(map(str, lengths)) + f"-tail{tail}"


def make_packed(lengths, H, d, dtype, device, tail=0):
    """q, k, v [T, H, d] (T = sum(lengths) + tail): views of one fused [T, 3, H, d] projection,
    strides (3·H·d, d, 1), fresh random data, NaN in the tail rows; cu_seqlens int32 on device."""
    n = sum(lengths)
    x = torch.randn(n + tail, 3, H, d) * 1.5
    x[n:] = float("nan")
    q, k, v = x.to(device=device, dtype=dtype).unbind(1)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    return q, k, v, cu


def reference64(q, k, v, cu, scale=None):
    return varlen_attention_ref(q.double(), k.double(), v.double(), cu, scale)


def run_triton(q, k, v, cu, max_seqlen, scale=None):
    """The Triton path. On CUDA the public function sends fp32 to the torch path and refuses it
    for backend="triton" (fp32 tl.dot spills); the kernel still computes it, through the launcher."""
    if q.is_cuda and q.dtype == torch.float32:
        return va.launch_varlen_attention(q, k, v, cu, max_seqlen,
                                          q.shape[-1] ** -0.5 if scale is None else scale)
    return varlen_attention(q, k, v, cu, max_seqlen, scale=scale, backend="triton")


def assert_matches(out, lse, q, k, v, cu, tol, scale=None):
    """out and lse on the rows of every sequence against the fp64 reference; shapes, dtypes, layout."""
    T, H, d = q.shape
    n = int(cu[-1])
    atol, rtol, lse_tol = tol
    assert out.shape == (T, H, d) and out.dtype == q.dtype and out.is_contiguous()
    assert lse.shape == (H, T) and lse.dtype == torch.float32 and lse.is_contiguous()
    want_out, want_lse = reference64(q, k, v, cu, scale)
    torch.testing.assert_close(out[:n].double(), want_out[:n], atol=atol, rtol=rtol)
    torch.testing.assert_close(lse[:, :n].double(), want_lse[:, :n], atol=lse_tol, rtol=lse_tol)


def assert_tail_unwritten(out, lse, cu):
    n = int(cu[-1])
    assert torch.isnan(out[n:]).all() and torch.isnan(lse[:, n:]).all(), "a row of no sequence was written"


# --------------------------------------------------------------------------------------------
# The reference is the specification: check it against independent definitions.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [None, 0.3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reference_matches_sdpa(dtype, scale):
    """Per sequence, out is torch's scaled_dot_product_attention; rows of no sequence are 0 / -inf."""
    lengths, tail, H, d = (5, 0, 1, 9), 3, 2, 32
    q, k, v, cu = make_packed(lengths, H, d, dtype, "cpu", tail=tail)
    out, lse = varlen_attention_ref(q, k, v, cu, scale)
    assert out.dtype == dtype and lse.dtype == dtype and lse.shape == (H, q.shape[0])
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            qs, ks, vs = (t[start:end].transpose(0, 1)[None] for t in (q, k, v))  # [1, H, n, d]
            want = F.scaled_dot_product_attention(qs, ks, vs, scale=scale)[0].transpose(0, 1)
            torch.testing.assert_close(out[start:end], want, **tol)
    n = bounds[-1]
    assert (out[n:] == 0).all() and torch.isneginf(lse[:, n:]).all()


def test_reference_lse_is_natural_log():
    """One row attending to itself alone: lse = scale · q·k, out = v."""
    q, k, v, cu = make_packed((1,), 2, 32, torch.float64, "cpu")
    out, lse = varlen_attention_ref(q, k, v, cu, 0.25)
    torch.testing.assert_close(lse[:, 0], 0.25 * (q[0] * k[0]).sum(-1))
    torch.testing.assert_close(out, v)


# --------------------------------------------------------------------------------------------
# Triton path against the fp64 reference
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("d", [32, 64])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_matches_reference(case, d, dtype, device, poisoned):
    lengths, tail = case
    q, k, v, cu = make_packed(lengths, 2, d, dtype, device, tail=tail)
    out, lse = run_triton(q, k, v, cu, max(max(lengths), 1))
    assert_matches(out, lse, q, k, v, cu, TOL[dtype])
    assert_tail_unwritten(out, lse, cu)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16), (64, 64)])
def test_block_sizes(block_m, block_n, device, poisoned):
    """Several query and key blocks with ragged tails, unequal tiles, and the GPU's 64 x 64."""
    q, k, v, cu = make_packed((17, 0, 64, 33), 2, 32, torch.float32, device, tail=4)
    out, lse = va.launch_varlen_attention(q, k, v, cu, 64, 32 ** -0.5, block_m=block_m, block_n=block_n)
    assert_matches(out, lse, q, k, v, cu, TOL[torch.float32])
    assert_tail_unwritten(out, lse, cu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_dot_variant(dtype, device, poisoned):
    """The GPU variant (tl.dot on fp16 operands, P cast to the input dtype before P·V), run by
    the interpreter where it is exact for fp16/fp32 (bf16 tl.dot is wrong there)."""
    q, k, v, cu = make_packed((17, 33), 2, 32, dtype, device, tail=2)
    out, lse = va.launch_varlen_attention(q, k, v, cu, 33, 32 ** -0.5, dot_in_input_dtype=True)
    assert_matches(out, lse, q, k, v, cu, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_lse_is_logsumexp_of_the_logits(dtype, device):
    """lse [H, T] is torch.logsumexp of the explicit logits, and out their softmax times v, built
    here from a [T, T] same-sequence mask rather than the reference's per-sequence slices."""
    q, k, v, cu = make_packed((17, 0, 33, 1), 2, 32, dtype, device, tail=3)
    out, lse = run_triton(q, k, v, cu, 33, scale=0.2)
    n = int(cu[-1])
    seq = torch.repeat_interleave(torch.arange(len(cu) - 1), (cu[1:] - cu[:-1]).long().cpu())  # [n]
    same = seq[:, None] == seq[None, :]
    q64, k64, v64 = (t[:n].cpu().double() for t in (q, k, v))
    logits = torch.einsum("ihd,jhd->hij", q64, k64) * 0.2
    logits = logits.masked_fill(~same, float("-inf"))
    atol, rtol, lse_tol = TOL[dtype]
    torch.testing.assert_close(lse[:, :n].cpu().double(), torch.logsumexp(logits, dim=-1),
                               atol=lse_tol, rtol=lse_tol)
    want = torch.einsum("hij,jhd->ihd", torch.softmax(logits, dim=-1), v64)
    torch.testing.assert_close(out[:n].cpu().double(), want, atol=atol, rtol=rtol)


def test_grid_larger_than_the_sequences(device, poisoned):
    """max_seqlen far above the longest sequence: the extra query blocks return at once."""
    q, k, v, cu = make_packed((17, 5), 2, 32, torch.float16, device, tail=6)
    out, lse = run_triton(q, k, v, cu, 100)
    assert_matches(out, lse, q, k, v, cu, TOL[torch.float16])
    assert_tail_unwritten(out, lse, cu)


def test_all_sequences_empty(device, poisoned):
    """cu = [0, 0, 0]: every program returns, nothing is written."""
    q, k, v, cu = make_packed((0, 0), 2, 32, torch.float16, device, tail=4)
    out, lse = run_triton(q, k, v, cu, 16)
    assert out.shape == (4, 2, 32) and lse.shape == (2, 4)
    assert_tail_unwritten(out, lse, cu)


def test_strides_and_scale(device, poisoned):
    """Three stride patterns at once (last dim always stride 1), a strided cu_seqlens, a custom scale."""
    lengths, H, d = (20, 9), 2, 32
    T = sum(lengths)
    cu = torch.tensor([0, -1, 20, -1, 29], dtype=torch.int32, device=device)[::2]
    q = torch.randn(T, H, d, device=device).to(torch.float16)                                 # contiguous
    k = torch.randn(H, T, d, device=device).to(torch.float16).transpose(0, 1)                 # (d, T·d, 1)
    v = torch.randn(T, 2 * H, d, device=device).to(torch.float16)[:, 1::2]                    # head stride 2d
    out, lse = run_triton(q, k, v, cu, 20, scale=0.3)
    assert_matches(out, lse, q, k, v, cu, TOL[torch.float16], scale=0.3)


def test_deterministic_and_inputs_untouched(device):
    q, k, v, cu = make_packed((17, 33), 2, 32, torch.float16, device)
    before = [t.clone() for t in (q, k, v, cu)]
    first = run_triton(q, k, v, cu, 33)
    second = run_triton(q, k, v, cu, 33)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    for t, b in zip((q, k, v, cu), before):
        assert torch.equal(t, b)


SYNCS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


def test_no_host_reads(device, monkeypatch):
    """The public function and launcher read no device value on the host (CUDA graph capture):
    no Tensor method that would sync is called from kernels/varlen_attention.py."""
    q, k, v, cu = make_packed((17, 33), 2, 32, torch.float16, device)
    calls = []

    def tracked(name, method):
        def call(self, *args, **kwargs):
            caller = traceback.extract_stack()[-2]
            if caller.filename.endswith("varlen_attention.py"):
                calls.append(f"Tensor.{name} at line {caller.lineno}")
            return method(self, *args, **kwargs)
        return call

    for name in SYNCS:
        monkeypatch.setattr(torch.Tensor, name, tracked(name, getattr(torch.Tensor, name)))
    varlen_attention(q, k, v, cu, 33, backend="triton")
    assert calls == []


@pytest.mark.interpreter  # the backends on the same CPU tensors
def test_backends_agree_on_cpu():
    q, k, v, cu = make_packed((17, 0, 9), 2, 32, torch.float32, "cpu", tail=2)
    n = int(cu[-1])
    out_auto, lse_auto = varlen_attention(q, k, v, cu, 17)  # CPU -> the torch reference
    out_ref, lse_ref = varlen_attention_ref(q, k, v, cu)
    assert torch.equal(out_auto, out_ref) and torch.equal(lse_auto, lse_ref)
    out_t, lse_t = varlen_attention(q, k, v, cu, 17, backend="torch")
    assert torch.equal(out_t, out_ref) and torch.equal(lse_t, lse_ref)
    out_tr, lse_tr = varlen_attention(q, k, v, cu, 17, backend="triton")
    torch.testing.assert_close(out_tr[:n], out_ref[:n], atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse_tr[:, :n], lse_ref[:, :n], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", [None, "torch"])
def test_float64_runs_the_reference(backend):
    q, k, v, cu = make_packed((5, 0, 9), 2, 32, torch.float64, "cpu", tail=1)
    out, lse = varlen_attention(q, k, v, cu, 9, backend=backend)
    want_out, want_lse = varlen_attention_ref(q, k, v, cu)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64 and out.is_contiguous()
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


# --------------------------------------------------------------------------------------------
# GPU only: CUDA graph capture, and agreement with aten's FlashAttention-2 varlen
# --------------------------------------------------------------------------------------------
compiled_kernels = pytest.mark.skipif(interpreting(), reason="needs the compiled kernel on CUDA: run with "
                                      "POWERBERT_TEST_GPU=1 (TRITON_INTERPRET is set)")


@pytest.mark.gpu
@compiled_kernels
def test_cuda_graph_capture_and_replay(device):
    """Captured once, replayed with other sequence lengths in the same cu_seqlens buffer."""
    H, d, T, max_seqlen = 2, 64, 100, 64
    x = torch.randn(T, 3, H, d, device=device).half()
    q, k, v = x.unbind(1)
    cu = torch.tensor([0, 17, 17, 81], dtype=torch.int32, device=device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile and warm up outside the capture
        varlen_attention(q, k, v, cu, max_seqlen)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = varlen_attention(q, k, v, cu, max_seqlen)
    for lengths in ((17, 0, 64), (64, 33, 1), (1, 2, 3)):
        x.copy_(torch.randn(T, 3, H, d, device=device))
        cu.copy_(torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, lse, q, k, v, cu, TOL[torch.float16])


@pytest.mark.gpu
@compiled_kernels
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_matches_aten_flash_varlen(dtype, device):
    """Same out and lse ([H, T], natural log) as aten._flash_attention_forward on packed input."""
    H, d, max_seqlen = 2, 64, 64
    q, k, v, cu = make_packed((17, 0, 64, 33), H, d, dtype, device)
    try:
        want_out, want_lse, *_ = torch.ops.aten._flash_attention_forward(
            q, k, v, cu, cu, max_seqlen, max_seqlen, 0.0, False, False, scale=d ** -0.5)
    except (RuntimeError, NotImplementedError) as err:  # no FlashAttention-2 in this build / on this GPU
        pytest.skip(f"aten._flash_attention_forward unavailable: {str(err).splitlines()[0]}")
    out, lse = varlen_attention(q, k, v, cu, max_seqlen)
    atol, rtol, _ = TOL[dtype]
    assert lse.shape == want_lse.shape == (H, q.shape[0])
    torch.testing.assert_close(out.float(), want_out.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(lse, want_lse.float(), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad inputs: clear one-line errors naming the argument, before any kernel runs
# --------------------------------------------------------------------------------------------
def _good():
    q, k, v, cu = make_packed((5, 3), 2, 32, torch.float32, "cpu")
    return dict(q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=5)


def _last_dim_strided(a):
    T, H, d = a["q"].shape
    a.update(q=torch.randn(T, d, H).transpose(1, 2))


BAD = [
    (lambda a: a.update(q=a["q"].numpy()), TypeError, r"^q must be a torch.Tensor, got ndarray$"),
    (lambda a: a.update(cu_seqlens=[0, 5, 8]), TypeError, r"^cu_seqlens must be a torch.Tensor, got list$"),
    (lambda a: a.update(q=a["q"][0]), ValueError, r"^q must be 3-D \[T, H, d\], got shape \(2, 32\)$"),
    (lambda a: a.update(k=a["k"][:4]), ValueError, r"^k must have q's shape"),
    (lambda a: a.update(v=a["v"][:, :1]), ValueError, r"^v must have q's shape"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError,
     r"^q must be float16, bfloat16, float32 or float64, got int32$"),
    (lambda a: a.update(k=a["k"].half()), TypeError, r"^k must have q's dtype float32, got float16$"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double(), backend="triton"),
     TypeError, r"^backend='triton' does not support q of dtype float64; accepted: float16, bfloat16, "
                r"float32 \(use backend='torch' or None for float64\)$"),
    (lambda a: a.update(v=a["v"].to("meta")), ValueError, r"^v must be on q's device cpu, got meta$"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].to("meta")), ValueError,
     r"^cu_seqlens must be on q's device cpu, got meta$"),
    (lambda a: a.update(**{t: a[t][..., :16] for t in "qkv"}), ValueError,
     r"^head dim d \(q.shape\[-1\]\) must be one of \(32, 64, 128\), got 16$"),
    (lambda a: a.update(**{t: torch.randn(8, 2, 48) for t in "qkv"}), ValueError, r"head dim d .* got 48$"),
    (_last_dim_strided, ValueError, r"^q must have stride 1 in its last dim \(head dim\), got strides"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"].long()), TypeError, r"^cu_seqlens must be int32, got int64$"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"][None]), ValueError, r"^cu_seqlens must be 1-D \[B \+ 1\]"),
    (lambda a: a.update(cu_seqlens=a["cu_seqlens"][:1]), ValueError, r"^cu_seqlens must be 1-D \[B \+ 1\] with B >= 1"),
    (lambda a: a.update(max_seqlen=0), ValueError, r"^max_seqlen must be an int >= 1, got 0$"),
    (lambda a: a.update(max_seqlen=5.0), TypeError, r"^max_seqlen must be a Python int >= 1, got float$"),
    (lambda a: a.update(max_seqlen=torch.tensor(5)), TypeError, r"^max_seqlen must be a Python int >= 1, got Tensor$"),
    (lambda a: a.update(max_seqlen=True), TypeError, r"^max_seqlen must be a Python int >= 1, got bool$"),
    (lambda a: a.update(scale="0.1"), TypeError, r"^scale must be a real number or None, got str$"),
    (lambda a: a.update(scale=float("nan")), ValueError, r"^scale must be finite, got nan$"),
    (lambda a: a.update(backend="cuda"), ValueError, r"^backend must be one of"),
]


@pytest.mark.parametrize("edit, exc, match", BAD, ids=[b[2].strip("^$")[:40] for b in BAD])
def test_bad_inputs(edit, exc, match):
    args = _good()
    edit(args)
    with raises_one_line(exc, match):
        varlen_attention(**args)


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"^backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                                         r"set before kernels\.varlen_attention is imported"):
        varlen_attention(**_good(), backend="triton")


@pytest.mark.parametrize("block", [8, 48])
def test_launcher_refuses_bad_blocks(block):
    with pytest.raises(ValueError, match=f"^block_m must be a power of two >= 16, got {block}$"):
        va.launch_varlen_attention(*_good().values(), 1.0, block_m=block)


@pytest.mark.parametrize("max_seqlen, d, want", [
    (1, 64, (16, 16, 1)), (17, 32, (32, 32, 2)), (77, 64, (64, 64, 4)), (128, 128, (64, 64, 4)),
    (512, 64, (128, 64, 8)), (4096, 128, (128, 64, 8)),
])
def test_gpu_block_sizes(max_seqlen, d, want):
    """The GPU tiles (the ones kernels.aot compiles without spills), and the interpreter's."""
    assert va._block_sizes(max_seqlen, d, interpret=False) == want
    bm, bn, warps = va._block_sizes(max_seqlen, d, interpret=True)
    assert bm == bn == min(32, max(16, 1 << max(0, math.ceil(math.log2(max_seqlen))))) and warps == bm // 16
