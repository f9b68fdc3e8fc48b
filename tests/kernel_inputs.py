"""Inputs shared by the kernel tests."""
import torch


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
