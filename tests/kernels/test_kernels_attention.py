"""Attention forward with significance scores (kernels/attention.py).

Runs the Triton kernels under TRITON_INTERPRET=1 on CPU tensors (set by conftest.py), or
compiled on CUDA with POWERBERT_TEST_GPU=1. Shapes stay small: every program instance costs
the interpreter about a millisecond.
"""
import math

import pytest
import torch

from kernel_inputs import poisoned, raises_one_line  # noqa: F401 (poisoned: a fixture)
from kernels import attention, launch
from kernels.attention import attention_with_significance, attention_with_significance_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (context atol, context rtol, scores rtol): the kernel against the fp64 reference on the same
# (already rounded) inputs. Context is stored in the input dtype; scores are fp32 sums of up to
# H*n probabilities.
TOL = {
    torch.float32: (2e-5, 2e-5, 5e-5),
    torch.float16: (2e-3, 2e-3, 5e-5),
    torch.bfloat16: (1.6e-2, 1.6e-2, 5e-5),
}
MASKS = ["none", "heavy", "cls_only", "ragged", "holes"]


def make_qkv(B, H, n, d, dtype, device, layout="bnhd"):
    """q, k, v as a BERT layer produces them: views of one [B, n, 3, H, d] projection."""
    if layout == "bnhd":
        x = torch.randn(B, n, 3, H, d, device=device, dtype=torch.float32) * 1.5
        q, k, v = (t.transpose(1, 2) for t in x.to(dtype).unbind(2))  # non-contiguous
    else:
        q, k, v = (torch.randn(B, H, n, d, device=device).to(dtype) * 1.5 for _ in range(3))
    return q, k, v


def make_mask(kind, B, n, device, dtype=torch.bool):
    if kind == "none":
        m = torch.ones(B, n, dtype=torch.bool)
    elif kind == "heavy":  # mostly padding, ragged lengths, padding also inside a sequence
        m = torch.rand(B, n) < 0.3
        m[:, 0] = True
        if B > 1:
            m[1, max(1, n // 3):] = False
    elif kind == "cls_only":
        m = torch.zeros(B, n, dtype=torch.bool)
        m[:, 0] = True
    elif kind == "ragged":  # right-padded to the longest row, as powerbert.elimination.layout leaves a batch
        lengths = torch.randint(1, n + 1, (B,))
        lengths[0] = n
        if B > 1:
            lengths[1] = 1
        m = torch.arange(n)[None, :] < lengths[:, None]
    elif kind == "holes":  # whole key blocks of padding between real tokens, and at both ends
        m = torch.ones(B, n, dtype=torch.bool)
        m[:, 1:] = torch.rand(B, n - 1) < 0.7
        m[:, n // 4: n // 2] = False
        m[:, -(n // 5):] = False
        if B > 1:
            m[1, :] = False
            m[1, n // 2] = True  # a sequence whose first real token is not in its first block
    else:
        raise AssertionError(kind)
    return m.to(device=device, dtype=dtype)


def reference64(q, k, v, mask, scale=None):
    ctx, scores = attention_with_significance_ref(q.double(), k.double(), v.double(), mask,
                                                  scale)
    return ctx, scores


def assert_scores_close(got, want, rtol):
    assert got.dtype == torch.float32
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf pattern differs"
    finite = torch.isfinite(want)
    assert torch.isfinite(got[finite]).all()
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=rtol, atol=rtol)


def run_triton(q, k, v, mask, scale=None, need_scores=True):
    """The Triton path. On CUDA the public function sends fp32 to the torch path and refuses it
    for backend="triton" (fp32 tl.dot spills); the kernels still compute it, through the launcher."""
    if q.is_cuda and q.dtype == torch.float32:
        return attention.launch_attention(q, k, v, mask, q.shape[-1] ** -0.5 if scale is None else scale,
                                          need_scores)
    return attention_with_significance(q, k, v, mask, scale, need_scores=need_scores, backend="triton")


# --------------------------------------------------------------------------------------------
# The reference is the specification: check it against the definition, written out here.
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mask_kind", MASKS)
def test_reference_matches_definition(mask_kind):
    B, H, n, d = 2, 3, 7, 4
    q, k, v = (torch.randn(B, H, n, d, dtype=torch.float64) for _ in range(3))
    mask = make_mask(mask_kind, B, n, "cpu")
    ctx, scores = attention_with_significance_ref(q, k, v, mask)

    want_scores = torch.empty(B, n, dtype=torch.float64)
    want_ctx = torch.empty_like(ctx)
    for b in range(B):
        real = [j for j in range(n) if mask[b, j]]
        probs = torch.zeros(H, n, n, dtype=torch.float64)
        for h in range(H):
            for i in range(n):
                logits = torch.tensor([float(q[b, h, i] @ k[b, h, j]) / math.sqrt(d)
                                       for j in real], dtype=torch.float64)
                probs[h, i, real] = torch.softmax(logits, 0)
            want_ctx[b, h] = probs[h] @ v[b, h]
        for j in range(n):
            if mask[b, j]:
                want_scores[b, j] = sum(probs[h, i, j] for h in range(H) for i in real if i != j)
            else:
                want_scores[b, j] = -math.inf
    torch.testing.assert_close(ctx, want_ctx)
    torch.testing.assert_close(scores, want_scores)


def test_reference_all_padding_is_uniform():
    """A sequence without real tokens: uniform attention (HF eager's finfo.min), scores -inf."""
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=torch.float64) for _ in range(3))
    ctx, scores = attention_with_significance_ref(q, k, v, torch.zeros(1, 5))
    torch.testing.assert_close(ctx, v.mean(dim=2, keepdim=True).expand_as(v))
    assert torch.isneginf(scores).all()


# --------------------------------------------------------------------------------------------
# Triton path against the fp64 reference
# --------------------------------------------------------------------------------------------
SHAPES = [  # (B, H, n, d)
    (2, 2, 1, 32),     # length 1: no off-diagonal vote at all
    (2, 2, 33, 32),    # power of two plus one: a 1-row tail block
    (2, 2, 130, 32),   # several query and key blocks
    (1, 2, 65, 64),
    (1, 1, 20, 128),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}n{}d{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_matches_reference(shape, dtype, mask_kind, device, poisoned):
    B, H, n, d = shape
    q, k, v = make_qkv(B, H, n, d, dtype, device)
    mask = make_mask(mask_kind, B, n, device)
    ctx, scores = run_triton(q, k, v, mask)
    want_ctx, want_scores = reference64(q, k, v, mask)

    atol, rtol, srtol = TOL[dtype]
    assert ctx.shape == q.shape and ctx.dtype == dtype and scores.shape == (B, n)
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


@pytest.mark.parametrize("block_m, block_n", [(16, 16), (16, 32), (32, 16)])
def test_small_blocks(block_m, block_n, device, poisoned):
    """Many blocks with ragged tails, unequal query and key tiles."""
    B, H, n, d = 2, 2, 50, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, device)
    mask = make_mask("heavy", B, n, device)
    ctx, scores = attention.launch_attention(q, k, v, mask, d ** -0.5, True,
                                             block_m=block_m, block_n=block_n)
    want_ctx, want_scores = reference64(q, k, v, mask)
    atol, rtol, srtol = TOL[torch.float32]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gpu_dot_variant(dtype, device, poisoned):
    """The GPU variant (tl.dot on fp16 operands, P cast to the input dtype before P·V), run by
    the interpreter where it is exact for fp16/fp32 (bf16 tl.dot is wrong there)."""
    B, H, n, d = 2, 2, 33, 32
    q, k, v = make_qkv(B, H, n, d, dtype, device)
    mask = make_mask("heavy", B, n, device)
    ctx, scores = attention.launch_attention(q, k, v, mask, d ** -0.5, True,
                                             dot_in_input_dtype=True)
    want_ctx, want_scores = reference64(q, k, v, mask)
    atol, rtol, srtol = TOL[dtype]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


def test_long_sequence(device, poisoned):
    """n = 1024 (beyond BERT's 512). 128-wide tiles keep the interpreter at ~1 s."""
    B, H, n, d = 1, 1, 1024, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, device)
    mask = make_mask("heavy", B, n, device)
    ctx, scores = attention.launch_attention(q, k, v, mask, d ** -0.5, True,
                                             block_m=128, block_n=128)
    want_ctx, want_scores = reference64(q, k, v, mask)
    atol, rtol, srtol = TOL[torch.float32]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


@pytest.mark.parametrize("layout", ["contiguous", "mixed"])
def test_strides(layout, device, poisoned):
    B, H, n, d = 2, 2, 20, 32
    q, k, v = make_qkv(B, H, n, d, torch.float16, device, layout="bhnd")
    if layout == "mixed":  # three different stride patterns at once
        k = k.transpose(1, 2).contiguous().transpose(1, 2)
        v = v.permute(3, 0, 1, 2).contiguous().permute(1, 2, 3, 0)
    big_mask = make_mask("heavy", B, 2 * n, device)
    mask = big_mask[:, ::2]  # non-contiguous mask
    ctx, scores = run_triton(q, k, v, mask)
    want_ctx, want_scores = reference64(q, k, v, mask)
    atol, rtol, srtol = TOL[torch.float16]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float32, torch.uint8])
def test_mask_dtypes_and_scale(mask_dtype, device):
    B, H, n, d = 2, 2, 24, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, device)
    mask = make_mask("heavy", B, n, device, dtype=mask_dtype)
    ctx, scores = run_triton(q, k, v, mask, scale=0.3)
    want_ctx, want_scores = reference64(q, k, v, mask, scale=0.3)
    atol, rtol, srtol = TOL[torch.float32]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


@pytest.mark.parametrize("n", [20, 70])
def test_all_padding_sequence(n, device):
    """A batch entry with no real token behaves like the reference (uniform over every key
    block, none skipped; scores -inf)."""
    B, H, d = 2, 2, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, device)
    mask = make_mask("heavy", B, n, device)
    mask[1] = False
    ctx, scores = run_triton(q, k, v, mask)
    want_ctx, want_scores = reference64(q, k, v, mask)
    torch.testing.assert_close(ctx.double(), want_ctx, atol=2e-5, rtol=2e-5)
    assert_scores_close(scores, want_scores, TOL[torch.float32][2])


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_context_heads_merge_as_a_view(backend, device):
    """context [B, H, n, d] lies in [B, n, H, d] memory on both backends, so the output
    projection's [B, n, H * d] input is a view (powerbert.elimination.layer.merge_heads copies nothing)."""
    from powerbert.elimination.layer import merge_heads

    B, H, n, d = 2, 3, 20, 32
    q, k, v = make_qkv(B, H, n, d, torch.float16, device)
    mask = make_mask("heavy", B, n, device)
    ctx, _ = attention_with_significance(q, k, v, mask, backend=backend)
    assert ctx.shape == (B, H, n, d) and ctx.transpose(1, 2).is_contiguous()
    merged = merge_heads(ctx)
    assert merged.shape == (B, n, H * d) and merged.data_ptr() == ctx.data_ptr() and merged.is_contiguous()
    want_ctx, _ = reference64(q, k, v, mask)
    torch.testing.assert_close(merged.double(), want_ctx.transpose(1, 2).reshape(B, n, H * d),
                               atol=TOL[torch.float16][0], rtol=TOL[torch.float16][1])


@pytest.mark.parametrize("mask_kind", ["heavy", "ragged", "holes"])
@pytest.mark.parametrize("num_sms", [None, 1000])
def test_pass2_tiles_narrower_than_query_tiles(mask_kind, num_sms, device, poisoned):
    """The launcher narrows pass 2's key tiles to fill the SMs (num_sms stands for a GPU):
    16-wide key tiles under 32-row query tiles put the diagonal inside one query tile at
    different offsets; several key tiles are fully padded (skipped)."""
    B, H, n, d = 3, 2, 77, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, device)
    mask = make_mask(mask_kind, B, n, device)
    ctx, scores = attention.launch_attention(q, k, v, mask, d ** -0.5, True, num_sms=num_sms)
    want_ctx, want_scores = reference64(q, k, v, mask)
    atol, rtol, srtol = TOL[torch.float32]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


# The forward still computes the padded query rows (their NaN q makes their row max NaN).
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
def test_padding_blocks_are_not_read(device, poisoned):
    """Key and query blocks past a sequence's last real token are skipped, not masked: NaN there
    in q, k and v reaches neither the real rows' context nor any score."""
    B, H, n, d, length = 2, 2, 70, 32, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, device)
    mask = torch.arange(n, device=device)[None, :] < torch.tensor([[length], [5]], device=device)
    want_ctx, want_scores = reference64(q, k, v, mask)
    for t in (q, k, v):
        t[:, :, length:] = float("nan")
    ctx, scores = attention.launch_attention(q, k, v, mask, d ** -0.5, True, block_m=32, block_n=32)
    atol, rtol, srtol = TOL[torch.float32]
    torch.testing.assert_close(ctx[0, :, :length].double(), want_ctx[0, :, :length], atol=atol, rtol=rtol)
    torch.testing.assert_close(ctx[1, :, :5].double(), want_ctx[1, :, :5], atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_uniform_attention_ties(dtype, device, poisoned):
    """q = 0: every real query attends uniformly, so every real key of a row ties; the kernel's
    scores are H (len - 1) / len within tolerance of each other and of the reference."""
    B, H, n, d = 2, 2, 40, 32
    q, k, v = make_qkv(B, H, n, d, dtype, device)
    q = torch.zeros_like(q)
    mask = make_mask("ragged", B, n, device)
    ctx, scores = run_triton(q, k, v, mask)
    want_ctx, want_scores = reference64(q, k, v, mask)
    atol, rtol, srtol = TOL[dtype]
    torch.testing.assert_close(ctx.double(), want_ctx, atol=atol, rtol=rtol)
    assert_scores_close(scores, want_scores, srtol)
    real = mask.sum(1, keepdim=True).double()
    tied = torch.where(mask, (H * (real - 1) / real).expand(B, n), want_scores)
    assert_scores_close(scores, tied, srtol)


def test_need_scores_false(device, poisoned):
    B, H, n, d = 2, 2, 33, 32
    q, k, v = make_qkv(B, H, n, d, torch.bfloat16, device)
    mask = make_mask("heavy", B, n, device)
    ctx, scores = run_triton(q, k, v, mask, need_scores=False)
    assert scores is None
    ctx_both, _ = run_triton(q, k, v, mask)
    assert torch.equal(ctx, ctx_both)


def test_deterministic_and_inputs_untouched(device):
    B, H, n, d = 2, 2, 40, 32
    q, k, v = make_qkv(B, H, n, d, torch.float16, device)
    mask = make_mask("heavy", B, n, device)
    before = [t.clone() for t in (q, k, v, mask)]
    first = run_triton(q, k, v, mask)
    second = run_triton(q, k, v, mask)
    assert torch.equal(first[0], second[0])
    assert torch.equal(first[1], second[1])  # bitwise: no atomics, ties cannot flip
    for t, b in zip((q, k, v, mask), before):
        assert torch.equal(t, b)


@pytest.mark.interpreter  # the three backends on the same CPU tensors
def test_backends_agree_on_cpu():
    B, H, n, d = 2, 2, 17, 32
    q, k, v = make_qkv(B, H, n, d, torch.float32, "cpu")
    mask = make_mask("heavy", B, n, "cpu")
    ctx_auto, s_auto = attention_with_significance(q, k, v, mask)  # CPU -> torch path
    ctx_ref, s_ref = attention_with_significance_ref(q, k, v, mask)
    assert torch.equal(ctx_auto, ctx_ref) and torch.equal(s_auto, s_ref.float())
    ctx_t, s_t = attention_with_significance(q, k, v, mask, backend="torch", need_scores=False)
    assert s_t is None and torch.equal(ctx_t, ctx_ref)
    ctx_tr, s_tr = run_triton(q, k, v, mask)
    torch.testing.assert_close(ctx_tr, ctx_ref, atol=2e-5, rtol=2e-5)
    assert_scores_close(s_tr, s_ref.double(), 1e-4)


# --------------------------------------------------------------------------------------------
# Bad inputs: clear errors naming the argument, before any kernel runs
# --------------------------------------------------------------------------------------------
def _good(device="cpu"):
    q, k, v = make_qkv(2, 2, 8, 32, torch.float32, device)
    return dict(q=q, k=k, v=v, mask=torch.ones(2, 8, dtype=torch.bool, device=device))


BAD = [
    (lambda a: a.update(q=a["q"].numpy()), TypeError, "q must be a torch.Tensor"),
    (lambda a: a.update(mask=[[1] * 8] * 2), TypeError, "mask must be a torch.Tensor"),
    (lambda a: a.update(q=a["q"][0]), ValueError, r"q must be 4-D"),
    (lambda a: a.update(k=a["k"][:, :, :4]), ValueError, r"k must have q's shape"),
    (lambda a: a.update(v=a["v"][:1]), ValueError, r"v must have q's shape"),
    (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double(), backend="triton"),
     TypeError, r"^backend='triton' does not support q of dtype float64; accepted: float16, bfloat16, "
                r"float32 \(use backend='torch' or None for float64\)$"),
    (lambda a: a.update(q=a["q"].to(torch.int32)), TypeError,
     r"^q must be float16, bfloat16, float32 or float64, got int32$"),
    (lambda a: a.update(k=a["k"].half()), TypeError, r"^k must have q's dtype float32, got float16$"),
    (lambda a: a.update(v=a["v"].to("meta")), ValueError, r"v must be on q's device"),
    (lambda a: a.update(mask=a["mask"].to("meta")), ValueError, r"mask must be on q's device"),
    (lambda a: a.update(**{t: a[t][..., :16] for t in "qkv"}), ValueError,
     r"head dim d .* one of \(32, 64, 128\), got 16"),
    (lambda a: a.update(**{t: torch.randn(2, 2, 8, 48) for t in "qkv"}), ValueError,
     r"head dim d .* got 48"),
    (lambda a: a.update(mask=a["mask"][:, :5]), ValueError, r"mask must have shape \[B, n\]"),
    (lambda a: a.update(mask=a["mask"][None]), ValueError, r"mask must have shape \[B, n\]"),
    (lambda a: a.update(mask=a["mask"].to(torch.complex64)), TypeError, "mask must be bool"),
    (lambda a: a.update(scale="0.1"), TypeError, "scale must be a real number"),
    (lambda a: a.update(scale=float("nan")), ValueError, "scale must be finite"),
    (lambda a: a.update(need_scores=1), TypeError, "need_scores must be a bool"),
    (lambda a: a.update(backend="cuda"), ValueError, "backend must be one of"),
]


@pytest.mark.parametrize("edit, exc, match", BAD, ids=[b[2] for b in BAD])
def test_bad_inputs(edit, exc, match):
    args = _good()
    edit(args)
    with raises_one_line(exc, match):
        attention_with_significance(**args)


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_float64_runs_the_reference(backend, mask_kind):
    """float64 inputs: backend None and "torch" run the reference in float64 and return float64
    scores (rounding them to fp32 could merge two distinct fp64 scores before selection)."""
    B, H, n, d = 2, 2, 9, 32
    q, k, v = make_qkv(B, H, n, d, torch.float64, "cpu")
    mask = make_mask(mask_kind, B, n, "cpu")
    ctx, scores = attention_with_significance(q, k, v, mask, backend=backend)
    want_ctx, want_scores = attention_with_significance_ref(q, k, v, mask)
    assert ctx.dtype == torch.float64 and scores.dtype == torch.float64
    assert ctx.transpose(1, 2).is_contiguous()  # the Triton path's [B, n, H, d] memory
    assert torch.equal(ctx, want_ctx) and torch.equal(scores, want_scores)
    _, none = attention_with_significance(q, k, v, mask, backend=backend, need_scores=False)
    assert none is None


def test_float64_triton_refused_before_device_check(monkeypatch):
    """The dtype error comes first and in one line, whatever the device or interpreter state."""
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    args = {name: t.double() if t.is_floating_point() else t for name, t in _good().items()}
    with raises_one_line(TypeError, "^backend='triton' does not support q of dtype float64"):
        attention_with_significance(**args, backend="triton")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"^backend='triton' on CPU tensors needs TRITON_INTERPRET=1 "
                                         r"set before kernels\.attention is imported"):
        attention_with_significance(**_good(), backend="triton")


CUDA = torch.device("cuda")  # a device object only: nothing runs on it


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_triton_serves(dtype):
    """On CUDA the kernels run fp16/bf16 (fp32 tl.dot spills: launch.resolve_attention_backend
    sends fp32 to the torch path); the interpreter takes fp32 too; fp64 is the reference's only."""
    assert attention.triton_serves(CUDA, dtype) == (dtype in (torch.float16, torch.bfloat16))
    assert attention.triton_serves(torch.device("cpu"), dtype) == (dtype != torch.float64)
