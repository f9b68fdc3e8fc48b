"""Top-k selection (spec §2): packed-key Triton kernel and torch path must equal the stable-sort reference."""
import pytest
import torch

from kernel_inputs import (check_rows_independently, nan_as_neginf, nan_of, nan_sign_bits, row_k,
                           with_nans)
from spec_reference import spec_keep

from kernels.select import select, select_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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
    with pytest.raises(ValueError, match=r"k as a tensor must have shape \[B\] = \[2\] \(one k per row\), got \[\]"):
        select(s, torch.tensor(2), width=2)         # a 0-d tensor is not a per-row k
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


# ----------------------------------------------------------------------------- NaN: counts as -inf


def nan_scores(B, n, kind, dtype, sign, device="cpu"):
    """Quantised scores (ties) with NaNs of the given sign bit(s). 'sprinkled': NaN at random
    places; 'cls': NaN at position 0 too; 'all': every score NaN; 'padding': NaN among -inf
    padding and a few numbers (NaN and -inf must tie, lower index first).
    sign 'pos' / 'neg' / 'mixed' (alternating), or 'each': B rows per sign, stacked (3B rows)."""
    if sign == "each":
        return torch.cat([nan_scores(B, n, kind, dtype, sg, device) for sg in ("pos", "neg", "mixed")])
    s = (torch.randint(0, 4, (B, n)).float() * 0.5).to(dtype)
    where = torch.rand(B, n) < 0.3
    if kind == "cls":
        where[:, 0] = True
    elif kind == "all":
        where[:] = True
    elif kind == "padding":
        s[torch.rand(B, n) < 0.5] = float("-inf")
        where = where | (torch.rand(B, n) < 0.2)
    s = with_nans(s, where, sign)
    if sign != "mixed" and where.any():  # the bits really are what the test claims
        assert nan_sign_bits(s) == {sign == "neg"}
    return s.to(device)


def check_nan_rule(idx, scores, k):
    """Equal to the reference, and to the rule spelled out (NaN replaced by -inf first), and
    to the independent spec reference, row by row."""
    check(idx, scores, k)
    assert torch.equal(idx, select_ref(nan_as_neginf(scores), k))
    for b in range(scores.shape[0]):
        assert idx[b].tolist() == spec_keep(scores[b].cpu(), k)[: idx.shape[1]]


def test_select_nan_semantics():
    """The rule on one row, spelled out: NaN of either sign bit counts as -inf."""
    for dtype in DTYPES + [torch.float64]:
        pos, neg = nan_of(dtype, False), nan_of(dtype, True)
        s = torch.tensor([[0.0, 1.0, 0.0, float("-inf"), 2.0, 0.0]], dtype=dtype)
        s[0, 0], s[0, 2], s[0, 5] = pos, neg, pos      # NaN at [CLS], and among the others
        want = {1: [0], 2: [0, 4], 3: [0, 1, 4], 4: [0, 1, 2, 4], 5: [0, 1, 2, 3, 4]}
        for k, keep in want.items():
            assert select_ref(s, k).tolist() == [keep], (dtype, k)
            assert select(s, k, backend="torch").tolist() == [keep], (dtype, k)
            assert spec_keep(s[0], k) == keep, (dtype, k)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["sprinkled", "cls", "all", "padding"])
def test_select_nan_counts_as_neginf(dtype, kind, device):
    """Both NaN sign bits (a row each: positive, negative, mixed), NaN at [CLS], all-NaN rows,
    NaN among -inf padding: every path (torch, Triton) equals the reference exactly."""
    scores = nan_scores(1, 13, kind, dtype, "each", device)
    for k in (1, 2, 5, 12):
        check_nan_rule(select(scores, k, backend="triton"), scores, k)
        check_nan_rule(select(scores, k, backend="torch"), scores, k)


@pytest.mark.parametrize("sign", ["pos", "neg", "mixed"])
def test_select_nan_torch_path_large(sign):
    scores = nan_scores(16, 300, "padding", torch.float32, sign)
    for k in (1, 77, 150, 299):
        check_nan_rule(select(scores, k, backend="torch"), scores, k)


def test_select_nan_does_not_mutate(device):
    scores = nan_scores(2, 9, "cls", torch.float32, "mixed", device)
    bits = scores.view(torch.int32).clone()
    select(scores, 3, backend="triton")
    select(scores, 3, backend="torch")
    select_ref(scores, 3)
    assert torch.equal(scores.view(torch.int32), bits)


# ----------------------------------------------------------------------------- float64


@pytest.mark.parametrize("kind", ["random", "ties", "heavy", "cls", "cls_low"])
@pytest.mark.parametrize("n,k", [(1, 1), (2, 1), (7, 3), (128, 77), (129, 128), (300, 150)])
def test_select_float64_torch_path(n, k, kind):
    """float64 scores are compared in float64 on the torch path (threshold selection)."""
    scores = make_scores(8, n, kind).double()
    check(select(scores, k, backend="torch"), scores, k)
    check(select(scores, k), scores, k)  # auto on CPU = torch path


def test_select_float64_distinct_in_fp64_only():
    """Scores equal after rounding to fp32 but distinct in fp64: the higher one wins, not the
    lower index (a path that rounded to fp32 would pick position 1)."""
    s = torch.tensor([[0.0, 1.0, 1.0 + 2.0 ** -40, -0.0, 0.0, float("-inf")]], dtype=torch.float64)
    assert s.float()[0, 1] == s.float()[0, 2]
    for k in range(1, 6):
        check(select(s, k, backend="torch"), s, k)
    assert select(s, 2, backend="torch").tolist() == [[0, 2]]
    assert select(s, 4, backend="torch").tolist() == [[0, 1, 2, 3]]  # -0.0 ties with +0.0


@pytest.mark.parametrize("sign", ["pos", "neg", "mixed"])
@pytest.mark.parametrize("kind", ["sprinkled", "cls", "all", "padding"])
def test_select_float64_nan(sign, kind):
    scores = nan_scores(4, 23, kind, torch.float64, sign)
    for k in (1, 2, 7, 22):
        check_nan_rule(select(scores, k, backend="torch"), scores, k)


def test_select_float64_triton_refused(device):
    s = make_scores(2, 6, "random", device).double()
    with pytest.raises(TypeError, match=r"^backend='triton' does not support scores of dtype float64; "
                                        r"accepted: float16, bfloat16, float32"):
        select(s, 2, backend="triton")


def test_select_float64_auto_picks_torch_on_cuda():
    """backend=None: float64 takes the torch path even on CUDA (the kernels are fp16/bf16/fp32)."""
    import kernels.launch as L
    assert L.resolve_backend(None, torch.device("cuda"), 8, 512, ("scores", torch.float64)) == "torch"
    assert L.resolve_backend(None, torch.device("cuda"), 8, 512, ("scores", torch.float32)) == "triton"
    assert L.resolve_backend(None, torch.device("cpu"), 8, 512, ("scores", torch.float32)) == "torch"


# ----------------------------------------------------------------------------- per-row k (spec §8)


def check_rows(idx, scores, k, width):
    """Equal to the per-row reference exactly, and row by row to the int-k rule (independent)."""
    ref = select_ref(scores, k, width=width)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, ref), f"\n{idx}\n!=\n{ref}\nk={k}"
    check_rows_independently(idx, scores, k, width)


def test_select_rows_semantics():
    """The rule on one score row, spelled out: each row keeps its own k (0 counts as 1, k > W is
    cut to W), ascending, then filler zeros."""
    s = torch.tensor([[0.0, 5.0, 1.0, 5.0, float("-inf"), float("-inf")]]).expand(6, 6)
    k = torch.tensor([0, 1, 2, 4, 5, 99])
    assert select_ref(s, k, width=5).tolist() == [
        [0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 0, 0], [0, 1, 2, 3, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 4]]
    assert select_ref(s, k, width=3).tolist() == [[0, 0, 0], [0, 0, 0], [0, 1, 0], [0, 1, 3], [0, 1, 3], [0, 1, 3]]
    assert select_ref(s, k, width=100).shape == (6, 6)              # W = min(width, n)
    assert select_ref(s, k, width=100)[5].tolist() == list(range(6))
    for width in (3, 5):
        assert torch.equal(select(s, k, width=width, backend="torch"), select_ref(s, k, width=width))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "heavy", "cls", "cls_low"])
def test_select_rows_triton(kind, dtype, device):
    """k_i in {0, 1, n/2, n, n+5, -3, random}; width below max k, equal to n, above n."""
    B, n = 8, 13
    scores = make_scores(B, n, kind, device).to(dtype)
    k = row_k(B, n, device)
    for width in (5, n, n + 7):
        check_rows(select(scores, k, width=width, backend="triton"), scores, k, width)


@pytest.mark.parametrize("B,n,width", [(3, 1, 1), (3, 1, 4), (4, 2, 2), (6, 33, 20), (2, 300, 150)])
def test_select_rows_triton_shapes(B, n, width, device):
    """Length 1, length 2, a power of two plus one, and a long row (int32 k)."""
    scores = make_scores(B, n, "ties", device)
    k = row_k(B, n, device, torch.int32)
    check_rows(select(scores, k, width=width, backend="triton"), scores, k, width)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_select_rows_non_contiguous(backend, device):
    """Strided scores ([B, n] view of an [n, B] tensor) and a strided k (every other element)."""
    base = make_scores(15, 6, "ties", device)
    scores = base.t()                                               # [6, 15], strides (1, 6)
    k = row_k(12, 15, device)[::2]                                  # [6], stride 2
    assert not scores.is_contiguous() and not k.is_contiguous()
    for width in (4, 15):
        check_rows(select(scores, k, width=width, backend=backend), scores, k, width)
        half = scores.to(torch.float16)
        check_rows(select(half, k, width=width, backend=backend), half, k, width)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_select_rows_nan(dtype, device):
    """NaN of either sign bit (a row each) counts as -inf with a per-row k too."""
    scores = nan_scores(2, 13, "padding", dtype, "each", device)    # 6 rows
    k = row_k(6, 13, device)
    for backend in ("triton", "torch"):
        idx = select(scores, k, width=9, backend=backend)
        check_rows(idx, scores, k, 9)
        assert torch.equal(idx, select_ref(nan_as_neginf(scores), k, width=9))


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("kind", ["random", "ties", "heavy", "cls", "cls_low"])
@pytest.mark.parametrize("n", [1, 2, 127, 129, 300])
def test_select_rows_torch_path(n, kind, dtype):
    scores = make_scores(16, n, kind).to(dtype)
    k = row_k(16, n)
    for width in sorted({1, max(1, n // 2), n, n + 3}):
        check_rows(select(scores, k, width=width, backend="torch"), scores, k, width)
        check_rows(select(scores, k, width=width), scores, k, width)  # auto on CPU = torch path


@pytest.mark.parametrize("sign", ["pos", "neg", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_select_rows_torch_path_nan(sign, dtype):
    scores = nan_scores(16, 60, "padding", dtype, sign)
    k = row_k(16, 60)
    for width in (7, 40, 60):
        check_rows(select(scores, k, width=width, backend="torch"), scores, k, width)


def test_select_rows_float64_distinct_in_fp64_only():
    s = torch.tensor([[0.0, 1.0, 1.0 + 2.0 ** -40, -0.0, 0.0, float("-inf")]], dtype=torch.float64).repeat(3, 1)
    k = torch.tensor([2, 4, 1])
    assert select(s, k, width=4, backend="torch").tolist() == [[0, 2, 0, 0], [0, 1, 2, 3], [0, 0, 0, 0]]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_select_rows_uniform_k_equals_int_k(backend, device):
    """A per-row k equal on every row, width k, is the int-k selection (k < n): same output."""
    scores = make_scores(5, 20, "ties", device)
    for k in (1, 7, 19):
        rows = torch.full((5,), k, dtype=torch.int64, device=device)
        assert torch.equal(select(scores, rows, width=k, backend=backend), select(scores, k, backend=backend))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_select_rows_always_selects(backend, device):
    """W == n gives [B, n], yet a row with k_i < n still drops vectors (no keep-all shortcut);
    a row with k_i >= n keeps every position."""
    scores = make_scores(2, 6, "random", device)
    k = torch.tensor([3, 6], device=device)
    idx = select(scores, k, width=6, backend=backend)
    assert idx.shape == (2, 6)
    assert idx[1].tolist() == list(range(6)) and idx[0, 3:].tolist() == [0, 0, 0]
    check_rows(idx, scores, k, 6)


def test_select_rows_int_k_path_unchanged(device):
    """An int k keeps today's outputs: shapes, the k >= n shortcut, and the values."""
    scores = make_scores(3, 9, "ties", device)
    assert select(scores, 4, backend="triton").shape == (3, 4)
    assert torch.equal(select(scores, 4, backend="triton"), select_ref(scores, 4))
    assert torch.equal(select(scores, 9, backend="torch"), torch.arange(9, device=device).expand(3, 9))


def test_select_rows_no_host_sync(device, monkeypatch):
    scores = make_scores(4, 12, "ties", device)
    k = row_k(4, 12, device)
    want = select_ref(scores, k, width=8)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in a per-row selection")

    for name in ("item", "cpu", "tolist", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    got = {b: select(scores, k, width=8, backend=b) for b in ("triton", "torch")}
    got["fp64"] = select(scores.double(), k, width=8, backend="torch")
    monkeypatch.undo()
    for out in got.values():
        assert torch.equal(out, want)


def test_select_rows_does_not_mutate(device):
    scores = nan_scores(2, 9, "cls", torch.float32, "mixed", device)
    k = row_k(2, 9, device)
    bits, k0 = scores.view(torch.int32).clone(), k.clone()
    for backend in ("triton", "torch"):
        select(scores, k, width=5, backend=backend)
    select_ref(scores, k, width=5)
    assert torch.equal(scores.view(torch.int32), bits) and torch.equal(k, k0)


def test_select_rows_k_dtypes():
    """Every accepted integer dtype of k, values clamped on device (a large int64 too)."""
    scores = make_scores(3, 10, "ties")
    want = select_ref(scores, torch.tensor([0, 4, 10]), width=6)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        assert torch.equal(select(scores, torch.tensor([0, 4, 10], dtype=dtype), width=6, backend="torch"), want)
    big = torch.tensor([-2 ** 40, 4, 2 ** 40])
    assert torch.equal(select(scores, big, width=6, backend="torch"), want)
    assert torch.equal(select_ref(scores, big, width=6), want)


def test_select_rows_triton_k_dtypes(device):
    scores = make_scores(3, 10, "ties", device)
    want = select_ref(scores, torch.tensor([0, 4, 10], device=device), width=6)
    for k in (torch.tensor([0, 4, 10], dtype=torch.uint8), torch.tensor([-2 ** 40, 4, 2 ** 40])):
        assert torch.equal(select(scores, k.to(device), width=6, backend="triton"), want)


def test_select_rows_errors():
    s = make_scores(2, 6, "random")
    k = torch.tensor([1, 3])
    with pytest.raises(TypeError, match=r"^width is required when k is a \[B\] tensor"):
        select(s, k)
    with pytest.raises(TypeError, match=r"^width is required when k is a \[B\] tensor"):
        select_ref(s, k)
    with pytest.raises(ValueError, match=r"^width must be an int >= 1, got 0$"):
        select(s, k, width=0)
    for bad in (2.0, True, torch.tensor(3)):
        with pytest.raises(TypeError, match=r"^width must be an int >= 1, got"):
            select(s, k, width=bad)
    with pytest.raises(ValueError, match=r"^width is only for a per-row \[B\] tensor k; an int k \(here 2\)"):
        select(s, 2, width=4)
    with pytest.raises(ValueError, match=r"^k as a tensor must have shape \[B\] = \[2\] \(one k per row\), got \[2, 1\]$"):
        select(s, k[:, None], width=3)
    with pytest.raises(ValueError, match=r"got \[3\]$"):
        select(s, torch.tensor([1, 2, 3]), width=3)
    for dtype in (torch.float32, torch.bool):
        with pytest.raises(TypeError, match=r"^k as a tensor has unsupported dtype (float32|bool); accepted: int64, int32"):
            select(s, k.to(dtype), width=3)
    with pytest.raises(ValueError, match=r"^k as a tensor must be on scores' device cpu, got meta$"):
        select(s, k.to("meta"), width=3)
