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
