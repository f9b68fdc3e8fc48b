"""Row gather of hidden states and mask (spec §2 step 4): a bit-exact copy, compared exactly."""
import pytest
import torch

from kernels.gather import gather, gather_ref


def make_indices(B, n, k, device="cpu"):
    """Per row: k distinct positions, [CLS] included, ascending (what select returns)."""
    rows = [torch.cat([torch.zeros(1, dtype=torch.int64), torch.randperm(n - 1)[: k - 1] + 1]).sort().values
            for _ in range(B)]
    return torch.stack(rows).to(device)


def make_mask(B, n, dtype, device="cpu"):
    m = torch.rand(B, n) < 0.6
    m[:, 0] = True
    return m.to(dtype).to(device)


def check(out, hidden, mask, idx):
    h_ref, m_ref = gather_ref(hidden, mask, idx)
    h, m = out
    assert h.dtype == hidden.dtype and m.dtype == mask.dtype
    assert h.shape == h_ref.shape and m.shape == m_ref.shape
    assert torch.equal(h, h_ref)  # NaN-poisoned output: an unwritten element fails here
    assert torch.equal(m, m_ref)


@pytest.mark.parametrize("B,n,D,k", [(2, 1, 1, 1), (2, 7, 5, 3), (2, 33, 65, 17), (3, 17, 8, 17), (2, 300, 768, 77)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gather_triton(B, n, D, k, dtype, device):
    hidden = torch.randn(B, n, D, device=device).to(dtype)
    mask = make_mask(B, n, torch.int64, device)
    idx = make_indices(B, n, k, device)
    check(gather(hidden, mask, idx, backend="triton"), hidden, mask, idx)


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int32, torch.float32, torch.bfloat16], ids=str)
def test_gather_mask_dtypes_and_fp64(mask_dtype, device):
    hidden = torch.randn(2, 9, 6, dtype=torch.float64, device=device)
    mask = make_mask(2, 9, mask_dtype, device)
    idx = make_indices(2, 9, 4, device)
    check(gather(hidden, mask, idx, backend="triton"), hidden, mask, idx)
    check(gather(hidden, mask, idx, backend="torch"), hidden, mask, idx)


def test_gather_non_contiguous(device):
    B, n, D, k = 2, 13, 40, 6
    hidden = torch.randn(B, D, n, device=device).to(torch.bfloat16).transpose(1, 2)  # [B, n, D], stride_d = n
    mask = make_mask(B, 2 * n, torch.int64, device)[:, 1::2]
    idx = make_indices(B, 2 * k, k, device)        # values < 2k <= n
    idx = torch.stack([idx, idx], dim=2)[..., 0]   # non-contiguous [B, k] view
    assert not hidden.is_contiguous() and not mask.is_contiguous() and not idx.is_contiguous()
    check(gather(hidden, mask, idx, backend="triton"), hidden, mask, idx)
    check(gather(hidden, mask, idx, backend="torch"), hidden, mask, idx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gather_torch_path(dtype):
    hidden = torch.randn(16, 128, 768).to(dtype)
    mask = make_mask(16, 128, torch.int64)
    idx = make_indices(16, 128, 77)
    check(gather(hidden, mask, idx, backend="torch"), hidden, mask, idx)
    check(gather(hidden, mask, idx), hidden, mask, idx)


def test_gather_does_not_mutate(device):
    hidden = torch.randn(2, 9, 6, device=device)
    mask = make_mask(2, 9, torch.int64, device)
    idx = make_indices(2, 9, 4, device)
    h0, m0, i0 = hidden.clone(), mask.clone(), idx.clone()
    gather(hidden, mask, idx, backend="triton")
    assert torch.equal(hidden, h0) and torch.equal(mask, m0) and torch.equal(idx, i0)


def test_gather_errors(monkeypatch):
    hidden = torch.randn(2, 9, 6)
    mask = make_mask(2, 9, torch.int64)
    idx = make_indices(2, 9, 4)
    with pytest.raises(ValueError, match=r"hidden must be 3-D \[B, n, D\]"):
        gather(hidden[0], mask, idx)
    with pytest.raises(TypeError, match="hidden has unsupported dtype int64"):
        gather(hidden.long(), mask, idx)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, n\] = \[2, 9\]"):
        gather(hidden, mask[:, :8], idx)
    with pytest.raises(TypeError, match="indices must be int64"):
        gather(hidden, mask, idx.int())
    with pytest.raises(ValueError, match=r"indices must be 2-D \[B, k\] with B = 2"):
        gather(hidden, mask, idx[:1])
    with pytest.raises(ValueError, match="same device"):
        gather(hidden, mask, idx.to("meta"))
    with pytest.raises(ValueError, match="backend must be one of"):
        gather(hidden, mask, idx, backend="numpy")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        gather(hidden, mask, idx, backend="triton")
