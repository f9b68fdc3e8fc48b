"""Inputs and checks shared by the kernel tests."""
import contextlib

import pytest
import torch

from spec_reference import spec_keep


def make_mask(B, n, kind, dtype=torch.int64, device="cpu"):
    """'none': no padding; 'heavy': right padding on row 0, random holes elsewhere; 'cls': only [CLS] real."""
    if kind == "none":
        m = torch.ones(B, n, dtype=torch.bool)
    elif kind == "heavy":
        m = torch.rand(B, n) < 0.3
        m[0] = torch.arange(n) < max(1, n // 4)
    else:
        m = torch.zeros(B, n, dtype=torch.bool)
    m[:, 0] = True
    return m.to(dtype).to(device)


@pytest.fixture
def poisoned(monkeypatch):
    """Every kernel output buffer starts as NaN, in the GPU run too, so unwritten elements fail
    the comparisons (a test module imports this fixture to use it)."""
    from kernels import launch

    def full_nan(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    monkeypatch.setattr(launch, "new_output", full_nan)


@contextlib.contextmanager
def raises_one_line(exc, match):
    """``pytest.raises(exc, match=match)`` whose message must also be a single line."""
    with pytest.raises(exc, match=match) as err:
        yield err
    assert "\n" not in str(err.value), str(err.value)


# Quiet NaNs by their bits, per dtype: (positive sign bit, negative sign bit). Built from bits
# because a cast does not keep the sign (float32 -> bfloat16 turns every NaN into 0xFFFF).
_NAN_BITS = {
    torch.float64: (torch.int64, 0x7FF8000000000000, -0x0008000000000000),  # 0xFFF8...
    torch.float32: (torch.int32, 0x7FC00000, -0x00400000),                  # 0xFFC00000
    torch.float16: (torch.int16, 0x7E00, -0x0200),                          # 0xFE00
    torch.bfloat16: (torch.int16, 0x7FC0, -0x0040),                         # 0xFFC0
}


def nan_of(dtype, negative: bool) -> torch.Tensor:
    """A 0-d quiet NaN of ``dtype`` whose sign bit is set iff ``negative``."""
    int_dtype, pos, neg = _NAN_BITS[dtype]
    return torch.tensor(neg if negative else pos, dtype=int_dtype).view(dtype)


def nan_sign_bits(x: torch.Tensor) -> set:
    """The sign bits (True = negative) found among the NaNs of x."""
    signs = torch.signbit(x[torch.isnan(x)])
    return set(signs.tolist())


def with_nans(x: torch.Tensor, where: torch.Tensor, sign: str = "mixed") -> torch.Tensor:
    """Copy of x with NaN where ``where`` is True: sign 'pos', 'neg' or 'mixed' (alternating)."""
    out = x.clone()
    pos, neg = nan_of(x.dtype, False).to(x.device), nan_of(x.dtype, True).to(x.device)
    if sign == "mixed":
        alt = (torch.arange(x.numel(), device=x.device).view(x.shape) % 2) == 1
        fill = torch.where(alt, neg, pos)
    else:
        fill = (neg if sign == "neg" else pos).expand(x.shape)
    return torch.where(where, fill, out)


def nan_as_neginf(x: torch.Tensor) -> torch.Tensor:
    """The NaN rule spelled out: every NaN (either sign) replaced by -inf."""
    return torch.where(torch.isnan(x), torch.full((), float("-inf"), dtype=x.dtype, device=x.device), x)


# ----------------------------------------------------------------------------- per-row k


def row_k(B, n, device="cpu", dtype=torch.int64, g=None):
    """[B] per-row k covering the edge cases cyclically: 0 and -3 (both count as 1), 1, n // 2,
    n, n + 5 (cut to the width), then random values in [1, n]."""
    fixed = [0, 1, max(1, n // 2), n, n + 5, -3]
    rand = torch.randint(1, n + 1, (B,), generator=g).tolist()
    k = [fixed[i] if i < len(fixed) else rand[i] for i in range(B)]
    return torch.tensor(k, dtype=dtype, device=device)


def kept_per_row(k, width, n):
    """k_i' = min(max(k_i, 1), W), W = min(width, n): the vectors row i keeps (host-side)."""
    W = min(width, n)
    return [min(max(int(v), 1), W) for v in k.tolist()]


def check_rows_independently(idx, scores, k, width):
    """A per-row-k selection, row by row, against the int-k rule it extends: row i alone through
    the int-k ``select_ref`` with its own k_i', and through the spec's plain-Python selection,
    equals slots 0..k_i'-1; the filler slots hold 0. ``scores`` as the selection saw them
    (padding already -inf)."""
    from kernels.select import select_ref

    B, n = scores.shape
    W = min(width, n)
    assert idx.dtype == torch.int64 and tuple(idx.shape) == (B, W), (idx.dtype, tuple(idx.shape))
    idx, scores = idx.cpu(), scores.cpu()
    for b, kb in enumerate(kept_per_row(k, width, n)):
        row = idx[b].tolist()
        assert row[:kb] == select_ref(scores[b:b + 1], kb)[0].tolist(), (b, kb, row)
        assert row[:kb] == spec_keep(scores[b], kb), (b, kb, row)
        assert row[kb:] == [0] * (W - kb), (b, kb, row)


def check_extract_rows_independently(out, hidden, mask, scores, k, width):
    """A per-row-k extract against the rule spelled out: the indices as in
    :func:`check_rows_independently` (``scores``: padding already -inf), every slot's hidden row
    copied from hidden[i, indices[i, j]] (filler slots: hidden[i, 0]), and
    mask_kept[i, j] = mask[i, indices[i, j]] for j < k_i', 0 (padding) in the filler slots."""
    h, m, idx = out
    check_rows_independently(idx, scores, k, width)
    assert h.dtype == hidden.dtype and m.dtype == mask.dtype
    h, m, idx, hidden, mask = h.cpu(), m.cpu(), idx.cpu(), hidden.cpu(), mask.cpu()
    for b, kb in enumerate(kept_per_row(k, width, scores.shape[1])):
        assert torch.equal(h[b], hidden[b, idx[b]])
        want = mask[b, idx[b]].clone()
        want[kb:] = 0
        assert torch.equal(m[b], want), (b, kb, m[b], want)
