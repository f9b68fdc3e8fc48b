"""Top-k selection (spec §2): packed-key Triton kernel and torch path must equal the stable-sort reference."""
import pytest
import torch

from kernels.topk import select, select_ref


def make_scores(B, n, kind, device="cpu"):
    """'random': distinct values; 'ties': a handful of quantised values; 'heavy': ties plus
    mostly -inf padding; 'cls': everything but [CLS] padded; 'cls_low': [CLS] has the lowest score."""
    if kind == "random":
        s = torch.randn(B, n)
    else:
        s = torch.randint(0, 4, (B, n)).float() * 0.5
    if kind == "heavy":
        s[torch.rand(B, n) < 0.7] = float("-inf")
        s[0, max(1, n // 4):] = float("-inf")
    elif kind == "cls":
        s[:, 1:] = float("-inf")
    elif kind == "cls_low":
        s[:, 0] = -1e30
    return s.to(device)


def check(idx, scores, k):
    ref = select_ref(scores, k)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, ref), f"\n{idx}\n!=\n{ref}"


@pytest.mark.parametrize(
    "B,n,k",
    [(2, 1, 1), (2, 2, 1), (3, 7, 3), (2, 17, 16), (2, 33, 1), (2, 64, 64), (2, 65, 100), (1, 300, 77)],
)
@pytest.mark.parametrize("kind", ["random", "ties", "heavy", "cls", "cls_low"])
def test_select_triton(B, n, k, kind, device):
    scores = make_scores(B, n, kind, device)
    check(select(scores, k, backend="triton"), scores, k)


def test_select_n512(device):
    scores = make_scores(1, 512, "ties", device)
    check(select(scores, 200, backend="triton"), scores, 200)


def test_select_semantics():
    """Properties of the reference itself, spelled out."""
    s = torch.tensor([[0.0, 5.0, 1.0, 5.0, float("-inf"), float("-inf")]])
    assert select_ref(s, 1).tolist() == [[0]]                        # [CLS] always kept
    assert select_ref(s, 2).tolist() == [[0, 1]]                     # tie 1 vs 3 -> lower index
    assert select_ref(s, 4).tolist() == [[0, 1, 2, 3]]
    assert select_ref(s, 5).tolist() == [[0, 1, 2, 3, 4]]            # padding fills, lowest first
    assert select_ref(s, 9).tolist() == [list(range(6))]             # k >= n keeps all


def test_select_signed_zero_and_extremes(device):
    """-0.0 ties with +0.0 (as in torch.sort); denormals, huge values and -inf order correctly."""
    s = torch.tensor([[3.0, -0.0, 0.0, -0.0, 1e-45, -1e-45, 3e38, -3e38, float("-inf"), 0.0]], device=device)
    for k in range(1, 10):
        check(select(s, k, backend="triton"), s, k)
        check(select(s, k, backend="torch"), s, k)


def test_select_non_contiguous_and_half(device):
    base = make_scores(12, 3, "ties", device)
    scores = base.t()                                  # [3, 12] view, strides (1, 3)
    assert not scores.is_contiguous()
    check(select(scores, 5, backend="triton"), scores, 5)
    half = scores.to(torch.float16)
    check(select(half, 5, backend="triton"), half.float(), 5)
    check(select(half, 5, backend="torch"), half.float(), 5)


@pytest.mark.parametrize("kind", ["random", "ties", "heavy", "cls", "cls_low"])
@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (127, 1), (128, 77), (129, 128), (300, 150), (512, 511), (1000, 333)])
def test_select_torch_path(n, k, kind):
    scores = make_scores(32, n, kind)
    check(select(scores, k, backend="torch"), scores, k)
    check(select(scores, k), scores, k)  # auto on CPU = torch path


def test_select_k_ge_n_returns_arange():
    scores = make_scores(3, 5, "random")
    for k in (5, 6, 100):
        out = select(scores, k, backend="torch")
        assert torch.equal(out, torch.arange(5).expand(3, 5))


def test_select_does_not_mutate(device):
    scores = make_scores(2, 9, "ties", device)
    s0 = scores.clone()
    select(scores, 3, backend="triton")
    select(scores, 3, backend="torch")
    assert torch.equal(scores, s0)


def test_select_errors(monkeypatch, device):
    s = make_scores(2, 6, "random")
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        select(s, 0)
    with pytest.raises(TypeError, match="k must be an int >= 1"):
        select(s, 2.0)
    with pytest.raises(TypeError, match="k must be an int >= 1"):
        select(s, True)
    with pytest.raises(TypeError, match="k must be an int >= 1"):
        select(s, torch.tensor(2))
    with pytest.raises(ValueError, match=r"scores must be 2-D \[B, n\]"):
        select(s[0], 2)
    with pytest.raises(TypeError, match="scores has unsupported dtype int64"):
        select(s.long(), 2)
    with pytest.raises(ValueError, match=r"n in \[1, 512\], got n = 513"):
        select(torch.randn(1, 513, device=device), 2, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        select(s, 2, backend="Triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        select(s, 2, backend="triton")
