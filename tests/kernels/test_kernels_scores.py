"""Significance scores (spec §1): Triton kernel (interpreter on CPU) and torch path vs the reference."""
import pytest
import torch

from kernel_inputs import make_mask

from kernels.significance import significance, significance_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Inputs are cast to the dtype first and the fp64 reference reads those same rounded values,
# so the only error left is the fp32 accumulation order: the same small tolerance for all.
TOL = {
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
}


def make_probs(B, H, n, dtype, device="cpu"):
    """Softmax of fresh random logits (never zeros)."""
    return (torch.randn(B, H, n, n, device=device) * 2).softmax(-1).to(dtype)


def check(scores, probs, mask):
    ref = significance_ref(probs.double(), mask)
    assert scores.dtype == torch.float32 and scores.shape == ref.shape
    assert not torch.isnan(scores).any(), "unwritten (NaN-poisoned) or NaN scores"
    torch.testing.assert_close(scores.double(), ref, **TOL[probs.dtype])
    assert torch.equal(torch.isneginf(scores), mask == 0)


@pytest.mark.parametrize("B,H,n", [(2, 3, 1), (2, 2, 7), (3, 2, 17), (2, 4, 33), (1, 2, 300)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "heavy", "cls"])
def test_significance_triton(B, H, n, dtype, mask_kind, device):
    probs = make_probs(B, H, n, dtype, device)
    mask = make_mask(B, n, mask_kind, device=device)
    check(significance(probs, mask, backend="triton"), probs, mask)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32, torch.bfloat16], ids=str)
def test_significance_mask_dtypes(mask_dtype, device):
    probs = make_probs(2, 2, 9, torch.float32, device)
    mask = make_mask(2, 9, "heavy", mask_dtype, device)
    check(significance(probs, mask, backend="triton"), probs, mask)
    check(significance(probs, mask, backend="torch"), probs, mask)


def test_significance_non_contiguous(device):
    B, H, n = 2, 3, 19
    # probs stored [B, n, H, n] and viewed as [B, H, n, n]; mask a strided slice
    probs = (torch.randn(B, n, H, n, device=device) * 2).softmax(-1).to(torch.float16).permute(0, 2, 1, 3)
    big_mask = make_mask(B, 2 * n, "heavy", device=device)
    mask = big_mask[:, ::2]
    mask[:, 0] = 1
    assert not probs.is_contiguous() and not mask.is_contiguous()
    check(significance(probs, mask, backend="triton"), probs, mask)
    check(significance(probs, mask, backend="torch"), probs, mask)


def test_significance_padded_rows_do_not_vote(device):
    """NaN in a padded query row must not leak (the paths select with where, they do not multiply)."""
    probs = make_probs(2, 2, 11, torch.float32, device)
    mask = make_mask(2, 11, "heavy", device=device)
    poisoned = probs.clone()
    poisoned.masked_fill_((mask == 0)[:, None, :, None], float("nan"))
    check(significance(poisoned, mask, backend="triton"), probs, mask)
    check(significance(poisoned, mask, backend="torch"), probs, mask)
    torch.testing.assert_close(significance_ref(poisoned, mask), significance_ref(probs, mask))


def test_significance_repeated_columns(device):
    """Identical columns: scores differ only by the self term and the voters."""
    probs = make_probs(2, 2, 16, torch.float32, device)
    probs[..., 5] = probs[..., 3]
    mask = make_mask(2, 16, "none", device=device)
    check(significance(probs, mask, backend="triton"), probs, mask)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_significance_torch_path(dtype):
    probs = make_probs(4, 12, 128, dtype)
    mask = make_mask(4, 128, "heavy")
    check(significance(probs, mask, backend="torch"), probs, mask)
    check(significance(probs, mask), probs, mask)  # auto on CPU = torch path


def test_significance_does_not_mutate(device):
    probs = make_probs(2, 2, 8, torch.bfloat16, device)
    mask = make_mask(2, 8, "heavy", device=device)
    p0, m0 = probs.clone(), mask.clone()
    significance(probs, mask, backend="triton")
    significance(probs, mask, backend="torch")
    assert torch.equal(probs, p0) and torch.equal(mask, m0)


def test_significance_errors(monkeypatch):
    p = make_probs(2, 2, 5, torch.float32)
    m = make_mask(2, 5, "none")
    with pytest.raises(ValueError, match="probs must be 4-D"):
        significance(p[0], m)
    with pytest.raises(ValueError, match="square"):
        significance(p[..., :4], m)
    with pytest.raises(TypeError, match=r"^backend='triton' does not support probs of dtype float64; "
                                        r"accepted: float16, bfloat16, float32"):
        significance(p.double(), m, backend="triton")
    with pytest.raises(TypeError, match="probs has unsupported dtype int64; accepted: float16, bfloat16, "
                                        "float32, float64"):
        significance(p.long(), m, backend="triton")
    with pytest.raises(TypeError, match="probs has unsupported dtype int64"):
        significance(p.long(), m)
    with pytest.raises(TypeError, match="probs must be a torch.Tensor"):
        significance(p.numpy(), m)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, n\]"):
        significance(p, m[:, :4])
    with pytest.raises(ValueError, match="same device"):
        significance(p, torch.ones(2, 5, device="meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        significance(p, m, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        significance(p, m, backend="triton")


@pytest.mark.parametrize("mask_kind", ["none", "heavy", "cls"])
def test_significance_float64(mask_kind):
    """float64 probabilities: float64 scores, accumulated in float64 (torch path, also auto)."""
    probs = make_probs(3, 4, 33, torch.float64)
    mask = make_mask(3, 33, mask_kind)
    ref = significance_ref(probs, mask)
    for backend in ("torch", None):
        got = significance(probs, mask, backend=backend)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
        assert torch.equal(torch.isneginf(got), mask == 0)


def test_significance_nan_column(device):
    """A NaN summed into a column makes that score NaN, on every path (selection then counts it
    as -inf); a NaN on the diagonal or in a padded query row does not count."""
    probs = make_probs(2, 2, 9, torch.float32, device)
    mask = make_mask(2, 9, "none", device=device)
    probs[0, 1, 4, 2] = float("nan")      # column 2 of row 0
    probs[1, 0, 3, 3] = float("nan")      # diagonal: the self term is left out
    want = torch.zeros(2, 9, dtype=torch.bool)
    want[0, 2] = True
    for backend in ("triton", "torch"):
        assert torch.equal(torch.isnan(significance(probs, mask, backend=backend)).cpu(), want)
    assert torch.equal(torch.isnan(significance_ref(probs, mask)).cpu(), want)
