"""Fused extract (spec §2): two Triton launches (interpreter on CPU) and the torch path vs the eager reference."""
import pytest
import torch

from kernel_inputs import check_extract_rows_independently, make_mask, nan_as_neginf, nan_of, row_k, with_nans

import importlib

extract_mod = importlib.import_module("kernels.extract")
gather_mod = importlib.import_module("kernels.gather")
from kernels.extract import extract, extract_from_scores, extract_from_scores_ref, extract_ref
from kernels.significance import significance_ref
from kernels.select import select_ref

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def make_probs(B, H, n, dtype, quantise=True, device="cpu"):
    """Softmax of fresh random logits. quantise=True rounds to multiples of 2**-8: exactly
    representable in fp32/fp16/bf16, so every summation order gives the same fp32 scores (the
    selection is then comparable exactly whatever the kernel's order) and many scores tie."""
    p = (torch.randn(B, H, n, n) * 3).softmax(-1)
    if quantise:
        p = torch.round(p * 256) / 256
    return p.to(dtype).to(device)


def check(out, ref):
    (h, m, idx), (h_ref, m_ref, idx_ref) = out, ref
    assert idx.dtype == torch.int64
    assert torch.equal(idx, idx_ref), f"\n{idx}\n!=\n{idx_ref}"
    assert h.dtype == h_ref.dtype and m.dtype == m_ref.dtype
    assert torch.equal(h, h_ref) and torch.equal(m, m_ref)  # gathered values are exact copies


def fp64_ref(probs, hidden, mask, k):
    """extract_ref with the scores computed in fp64 from the same (rounded) probabilities."""
    return extract_ref(probs.double(), hidden, mask, k)


@pytest.mark.parametrize(
    "B,H,n,D,k",
    [(2, 2, 7, 8, 3), (2, 3, 17, 16, 1), (2, 2, 33, 24, 32), (2, 2, 65, 32, 20), (1, 2, 300, 64, 77)],
)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "heavy", "cls"])
def test_extract_triton(B, H, n, D, k, dtype, mask_kind, device):
    probs = make_probs(B, H, n, dtype, device=device)
    hidden = torch.randn(B, n, D, device=device).to(dtype)
    mask = make_mask(B, n, mask_kind, device=device)
    check(extract(probs, hidden, mask, k, backend="triton"), fp64_ref(probs, hidden, mask, k))


def test_extract_unquantised_and_repeated_columns(device):
    """Fresh unrounded probabilities (seeded), and repeated columns (near-ties through the self term)."""
    probs = make_probs(2, 3, 40, torch.float32, quantise=False, device=device)
    probs[..., 9] = probs[..., 4]
    probs[..., 30] = probs[..., 4]
    hidden = torch.randn(2, 40, 12, device=device)
    mask = make_mask(2, 40, "heavy", device=device)
    for k in (1, 5, 20, 39):
        check(extract(probs, hidden, mask, k, backend="triton"), fp64_ref(probs, hidden, mask, k))


@pytest.mark.parametrize("n,k", [(1, 1), (9, 9), (9, 50)])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_keeps_all_when_k_ge_n(n, k, backend, device):
    probs = make_probs(2, 2, n, torch.float32, device=device)
    hidden = torch.randn(2, n, 4, device=device)
    mask = make_mask(2, n, "heavy", device=device)
    h, m, idx = extract(probs, hidden, mask, k, backend=backend)
    assert h is hidden and m is mask
    assert torch.equal(idx, torch.arange(n, device=device).expand(2, n))
    h, m, idx = extract_from_scores(significance_ref(probs, mask), hidden, mask, k, backend=backend)
    assert h is hidden and m is mask and idx.shape == (2, n)


def test_extract_non_contiguous_and_mask_dtypes(device):
    B, H, n, D, k = 2, 3, 21, 10, 8
    # stored [B, n, H, n], viewed as [B, H, n, n]; quantised as in make_probs
    probs = (torch.round((torch.randn(B, n, H, n) * 3).softmax(-1) * 256) / 256).to(torch.bfloat16)
    probs = probs.to(device).permute(0, 2, 1, 3)
    hidden = torch.randn(B, D, n, device=device).to(torch.bfloat16).transpose(1, 2)
    for mask_dtype in (torch.bool, torch.float32, torch.int32):
        mask = make_mask(B, 2 * n, "heavy", mask_dtype, device)[:, ::2]
        assert not (probs.is_contiguous() or hidden.is_contiguous() or mask.is_contiguous())
        ref = fp64_ref(probs, hidden, mask, k)
        check(extract(probs, hidden, mask, k, backend="triton"), ref)
        check(extract(probs, hidden, mask, k, backend="torch"), ref)


def test_extract_padded_rows_do_not_vote(device):
    probs = make_probs(2, 2, 12, torch.float32, device=device)
    hidden = torch.randn(2, 12, 4, device=device)
    mask = make_mask(2, 12, "heavy", device=device)
    poisoned = probs.masked_fill((mask == 0)[:, None, :, None], float("nan"))
    check(extract(poisoned, hidden, mask, 5, backend="triton"), fp64_ref(probs, hidden, mask, 5))
    check(extract(poisoned, hidden, mask, 5, backend="torch"), fp64_ref(probs, hidden, mask, 5))


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_from_scores(backend, device):
    B, n, D, k = 2, 37, 8, 11
    scores = torch.randint(0, 5, (B, n), device=device).float()   # ties, and finite at padding:
    hidden = torch.randn(B, n, D, device=device)                   # the mask must force -inf there
    mask = make_mask(B, n, "heavy", device=device)
    ref = extract_from_scores_ref(scores, hidden, mask, k)
    check(extract_from_scores(scores, hidden, mask, k, backend=backend), ref)
    # with masked scores it is the plain extract
    probs = make_probs(B, 2, n, torch.float32, device=device)
    s = significance_ref(probs, mask)
    check(extract_from_scores(s, hidden, mask, k, backend=backend), fp64_ref(probs, hidden, mask, k))


@pytest.fixture
def launches(monkeypatch) -> list:
    """The Triton launches of the fused extract, recorded: its two kernels wrapped in a counter."""
    seen = []

    class Counting:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            seen.append(self.kernel)
            return self.kernel[grid]

    monkeypatch.setattr(extract_mod, "_score_select_kernel", Counting(extract_mod._score_select_kernel))
    monkeypatch.setattr(gather_mod, "_gather_kernel", Counting(gather_mod._gather_kernel))
    return seen


def test_extract_two_launches_no_host_sync(device, monkeypatch, launches):
    """Triton path: exactly two kernel launches and no .item()/.cpu()/.tolist() on the way."""
    probs = make_probs(2, 2, 16, torch.float16, device=device)
    hidden = torch.randn(2, 16, 8, device=device).half()
    mask = make_mask(2, 16, "heavy", device=device)
    ref = fp64_ref(probs, hidden, mask, 6)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the forward path")

    for name in ("item", "cpu", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = extract(probs, hidden, mask, 6, backend="triton")
    monkeypatch.undo()
    assert len(launches) == 2
    check(out, ref)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quantise", [True, False])
def test_extract_torch_path(dtype, quantise):
    B, H, n, D, k = 8, 12, 128, 64, 77
    probs = make_probs(B, H, n, dtype, quantise=quantise)
    hidden = torch.randn(B, n, D).to(dtype)
    mask = make_mask(B, n, "heavy")
    ref = fp64_ref(probs, hidden, mask, k)
    check(extract(probs, hidden, mask, k, backend="torch"), ref)
    check(extract(probs, hidden, mask, k), ref)  # auto on CPU = torch path
    for kk in (1, 2, 127):
        check(extract(probs, hidden, mask, kk, backend="torch"), fp64_ref(probs, hidden, mask, kk))


def test_extract_does_not_mutate(device):
    probs = make_probs(2, 2, 10, torch.float16, device=device)
    hidden = torch.randn(2, 10, 4, device=device).half()
    mask = make_mask(2, 10, "heavy", device=device)
    saved = [t.clone() for t in (probs, hidden, mask)]
    extract(probs, hidden, mask, 4, backend="triton")
    extract(probs, hidden, mask, 4, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip((probs, hidden, mask), saved))


def test_extract_errors(monkeypatch, device):
    probs = make_probs(2, 2, 6, torch.float32)
    hidden = torch.randn(2, 6, 4)
    mask = make_mask(2, 6, "none")
    with pytest.raises(ValueError, match="probs must be 4-D"):
        extract(probs[0], hidden, mask, 2)
    with pytest.raises(ValueError, match="square"):
        extract(probs[..., :5], hidden, mask, 2)
    with pytest.raises(ValueError, match=r"mask must have shape \[B, n\] = \[2, 6\]"):
        extract(probs, hidden, mask[:1], 2)
    with pytest.raises(ValueError, match="hidden must have batch and length"):
        extract(probs, hidden[:, :5], mask, 2)
    with pytest.raises(ValueError, match=r"hidden must be 3-D"):
        extract(probs, hidden[0], mask, 2)
    with pytest.raises(TypeError, match="hidden has unsupported dtype int32"):
        extract(probs, hidden.int(), mask, 2)
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        extract(probs, hidden, mask, -1)
    with pytest.raises(TypeError, match="k must be an int >= 1"):
        extract(probs, hidden, mask, 2.5)
    with pytest.raises(ValueError, match="same device"):
        extract(probs, hidden.to("meta"), mask, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        extract(probs, hidden, mask, 2, backend="auto")
    with pytest.raises(ValueError, match=r"n in \[1, 512\], got n = 600"):
        extract(make_probs(1, 1, 600, torch.float16, device=device), torch.randn(1, 600, 2, device=device),
                make_mask(1, 600, "none", device=device), 2, backend="triton")
    with pytest.raises(ValueError, match=r"scores must be 2-D"):
        extract_from_scores(torch.randn(2, 6, 1), hidden, mask, 2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        extract(probs, hidden, mask, 2, backend="triton")


# ----------------------------------------------------------------------------- NaN


def nan_probs(B, H, n, dtype, sign, device="cpu"):
    """Quantised probabilities with NaNs of the given sign bit(s) sprinkled in (the significance
    of every column that sums one becomes NaN), and one whole key column NaN in row 0.
    sign 'pos' / 'neg' / 'mixed', or 'each': B rows per sign, stacked (3B rows)."""
    if sign == "each":
        return torch.cat([nan_probs(B, H, n, dtype, sg, device) for sg in ("pos", "neg", "mixed")])
    probs = make_probs(B, H, n, dtype)
    where = torch.rand(B, H, n, n) < 0.02
    where[0, :, :, min(2, n - 1)] = True
    return with_nans(probs, where, sign).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "heavy", "cls"])
def test_extract_nan_probs(dtype, mask_kind, device):
    """A column whose sum meets a NaN gets a NaN score, which counts as -inf: Triton and torch
    select exactly what extract_ref selects (NaNs of either sign bit: a row each)."""
    H, n, D = 2, 19, 8
    probs = nan_probs(1, H, n, dtype, "each", device)
    B = probs.shape[0]
    hidden = torch.randn(B, n, D, device=device).to(dtype)
    mask = make_mask(B, n, mask_kind, device=device)
    scores = significance_ref(probs.double(), mask)
    if mask_kind != "cls":
        assert torch.isnan(scores).any()   # the test really exercises NaN scores
    for k in (1, 3, 10, 18):
        ref = fp64_ref(probs, hidden, mask, k)
        # the rule, spelled out: the same as selecting on NaN -> -inf scores
        assert torch.equal(ref[2], select_ref(nan_as_neginf(scores), k))
        check(extract(probs, hidden, mask, k, backend="triton"), ref)
        check(extract(probs, hidden, mask, k, backend="torch"), ref)


def test_extract_nan_column_loses_to_numbers(device):
    """Row with every non-[CLS] column NaN but one: that one is kept first, then NaN columns
    by index, as padding would be."""
    B, H, n, D = 1, 2, 8, 4
    probs = make_probs(B, H, n, torch.float32)
    probs[..., 1:5] = nan_of(torch.float32, False)
    probs[..., 6:] = nan_of(torch.float32, True)
    probs = probs.to(device)
    hidden = torch.randn(B, n, D, device=device)
    mask = make_mask(B, n, "none", device=device)
    for backend in ("triton", "torch"):
        assert extract(probs, hidden, mask, 2, backend=backend)[2].tolist() == [[0, 5]]
        assert extract(probs, hidden, mask, 4, backend=backend)[2].tolist() == [[0, 1, 2, 5]]
    assert extract_ref(probs, hidden, mask, 4)[2].tolist() == [[0, 1, 2, 5]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_from_scores_nan(dtype, backend, device):
    """NaN scores through extract_from_scores: two rows per sign (positive, negative, mixed),
    NaN at [CLS] too, an all-NaN row, NaN at padding."""
    B, n, D = 2, 21, 6
    rows = []
    for sign in ("pos", "neg", "mixed"):
        scores = (torch.randint(0, 4, (B, n)).float() * 0.5).to(dtype)
        where = torch.rand(B, n) < 0.3
        where[:, 0] = True
        where[1] = True                                # an all-NaN row
        rows.append(with_nans(scores, where, sign))
    scores = torch.cat(rows).to(device)
    hidden = torch.randn(3 * B, n, D, device=device).to(dtype)
    mask = make_mask(3 * B, n, "heavy", device=device)
    for k in (1, 4, 13, 20):
        ref = extract_from_scores_ref(scores, hidden, mask, k)
        want = select_ref(nan_as_neginf(scores).masked_fill(mask == 0, float("-inf")), k)
        assert torch.equal(ref[2], want)
        check(extract_from_scores(scores, hidden, mask, k, backend=backend), ref)


# ----------------------------------------------------------------------------- float64


@pytest.mark.parametrize("hidden_dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("quantise", [True, False])
def test_extract_float64_torch_path(hidden_dtype, quantise):
    """float64 probabilities are scored and selected in float64 on the torch path."""
    B, H, n, D = 4, 3, 65, 16
    probs = make_probs(B, H, n, torch.float64, quantise=quantise)
    probs[0, ..., 7] = probs[0, ..., 3]              # repeated columns: near-ties
    hidden = torch.randn(B, n, D).to(hidden_dtype)
    mask = make_mask(B, n, "heavy")
    for k in (1, 2, 20, 64):
        ref = extract_ref(probs, hidden, mask, k)
        check(extract(probs, hidden, mask, k, backend="torch"), ref)
        check(extract(probs, hidden, mask, k), ref)  # auto: torch path for float64
        scores = significance_ref(probs, mask)
        assert scores.dtype == torch.float64
        check(extract_from_scores(scores, hidden, mask, k, backend="torch"), ref)
        check(extract_from_scores(scores, hidden, mask, k), ref)


def test_extract_float64_distinct_in_fp64_only():
    """Two columns whose fp64 significance differs below fp32 resolution: the higher wins."""
    n = 4
    probs = torch.full((1, 1, n, n), 0.25, dtype=torch.float64)
    probs[0, 0, 1, 3] += 2.0 ** -40                 # column 3 gets a hair more than column 2
    probs[0, 0, 1, 1] -= 2.0 ** -40                 # (the row still sums to 1; self term ignored)
    hidden = torch.randn(1, n, 2, dtype=torch.float64)
    mask = torch.ones(1, n, dtype=torch.bool)
    s = significance_ref(probs, mask)
    assert s[0, 3] > s[0, 2] and s.float()[0, 3] == s.float()[0, 2]
    assert extract(probs, hidden, mask, 2, backend="torch")[2].tolist() == [[0, 3]]
    assert extract_from_scores(s, hidden, mask, 2, backend="torch")[2].tolist() == [[0, 3]]


def test_extract_float64_nan():
    probs = nan_probs(2, 2, 15, torch.float64, "mixed")
    hidden = torch.randn(2, 15, 4, dtype=torch.float64)
    mask = make_mask(2, 15, "heavy")
    for k in (1, 5, 14):
        check(extract(probs, hidden, mask, k, backend="torch"), extract_ref(probs, hidden, mask, k))


def test_extract_float64_triton_refused(device):
    probs = make_probs(2, 2, 6, torch.float64, device=device)
    hidden = torch.randn(2, 6, 4, dtype=torch.float64, device=device)
    mask = make_mask(2, 6, "none", device=device)
    with pytest.raises(TypeError, match=r"^backend='triton' does not support probs of dtype float64; "
                                        r"accepted: float16, bfloat16, float32 \(use backend='torch'"):
        extract(probs, hidden, mask, 2, backend="triton")
    with pytest.raises(TypeError, match=r"^backend='triton' does not support scores of dtype float64"):
        extract_from_scores(significance_ref(probs, mask), hidden, mask, 2, backend="triton")
    # fp32 probs with fp64 hidden stay on Triton: the gather moves fp64 bit-exactly
    p32 = make_probs(2, 2, 6, torch.float32, device=device)
    check(extract(p32, hidden, mask, 2, backend="triton"), fp64_ref(p32, hidden, mask, 2))


# ----------------------------------------------------------------------------- per-row k (spec §8)


def check_rows(out, ref, hidden, mask, scores, k, width):
    """Equal to the per-row reference exactly, and to the rule spelled out row by row
    (``scores``: the significance with padding at -inf)."""
    check(out, ref)
    check_extract_rows_independently(out, hidden, mask, scores, k, width)


def masked_scores(probs, mask):
    return significance_ref(probs.double(), mask)  # padding already -inf


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "heavy", "cls"])
def test_extract_rows_triton(dtype, mask_kind, device):
    """k_i in {0, 1, n/2, n, n+5, -3, ...}; width below max k and above n; heavy padding
    (rows keeping more than their real length keep padding, which stays padding)."""
    B, H, n, D = 7, 2, 17, 8
    probs = make_probs(B, H, n, dtype, device=device)
    hidden = torch.randn(B, n, D, device=device).to(dtype)
    mask = make_mask(B, n, mask_kind, device=device)
    k = row_k(B, n, device)
    scores = masked_scores(probs, mask)
    for width in (6, n + 4):
        ref = extract_ref(probs.double(), hidden, mask, k, width=width)
        check_rows(extract(probs, hidden, mask, k, width=width, backend="triton"), ref, hidden, mask, scores, k, width)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_rows_mask_dtypes_non_contiguous(backend, device):
    """bool / float / int masks keep their dtype, filler slots 0 (False); strided probs,
    hidden, mask and k."""
    B, H, n, D = 6, 3, 21, 10
    probs = (torch.round((torch.randn(B, n, H, n) * 3).softmax(-1) * 256) / 256).to(torch.bfloat16)
    probs = probs.to(device).permute(0, 2, 1, 3)
    hidden = torch.randn(B, D, n, device=device).to(torch.bfloat16).transpose(1, 2)
    k = row_k(2 * B, n, device, torch.int32)[::2]
    for mask_dtype in (torch.bool, torch.float32, torch.int32):
        mask = make_mask(B, 2 * n, "heavy", mask_dtype, device)[:, ::2]
        assert not (probs.is_contiguous() or hidden.is_contiguous() or mask.is_contiguous() or k.is_contiguous())
        ref = extract_ref(probs.double(), hidden, mask, k, width=9)
        out = extract(probs, hidden, mask, k, width=9, backend=backend)
        assert out[1].dtype == mask_dtype
        check_rows(out, ref, hidden, mask, masked_scores(probs, mask), k, 9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_from_scores_rows(dtype, backend, device):
    """Tied scores, finite at padding (the mask forces -inf), NaN of either sign bit."""
    B, n, D = 6, 19, 5
    scores = (torch.randint(0, 4, (B, n)).float() * 0.5).to(dtype)
    scores = with_nans(scores, torch.rand(B, n) < 0.2, "mixed").to(device)
    hidden = torch.randn(B, n, D, device=device).to(dtype)
    mask = make_mask(B, n, "heavy", torch.bool, device)
    k = row_k(B, n, device)
    seen = nan_as_neginf(scores).masked_fill(mask == 0, float("-inf"))
    for width in (4, n):
        ref = extract_from_scores_ref(scores, hidden, mask, k, width=width)
        out = extract_from_scores(scores, hidden, mask, k, width=width, backend=backend)
        check_rows(out, ref, hidden, mask, seen, k, width)


@pytest.mark.parametrize("dtype", DTYPES + [torch.float64], ids=str)
@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.int64, torch.float32], ids=str)
def test_extract_rows_torch_path(dtype, mask_dtype):
    B, H, n, D = 16, 4, 65, 16
    probs = make_probs(B, H, n, dtype, quantise=dtype != torch.float64)
    hidden = torch.randn(B, n, D).to(dtype)
    mask = make_mask(B, n, "heavy", mask_dtype)
    k = row_k(B, n)
    scores = masked_scores(probs, mask)
    for width in (1, 20, n, n + 1):
        ref = extract_ref(probs.double(), hidden, mask, k, width=width)
        check_rows(extract(probs, hidden, mask, k, width=width, backend="torch"), ref, hidden, mask, scores, k, width)
        check_rows(extract(probs, hidden, mask, k, width=width), ref, hidden, mask, scores, k, width)  # auto
        s = significance_ref(probs, mask)  # fp64 scores for fp64 probs
        check_rows(extract_from_scores(s, hidden, mask, k, width=width, backend="torch"),
                   extract_from_scores_ref(s, hidden, mask, k, width=width), hidden, mask, scores, k, width)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_rows_always_selects(backend, device):
    """W == n: new [B, n] outputs, not the inputs; a row with k_i < n drops vectors."""
    probs = make_probs(2, 2, 9, torch.float32, device=device)
    hidden = torch.randn(2, 9, 4, device=device)
    mask = make_mask(2, 9, "none", device=device)
    k = torch.tensor([4, 9], device=device)
    h, m, idx = extract(probs, hidden, mask, k, width=9, backend=backend)
    assert h is not hidden and m is not mask and h.shape == (2, 9, 4)
    assert idx[1].tolist() == list(range(9)) and idx[0, 4:].tolist() == [0] * 5
    assert m.tolist() == [[True] * 4 + [False] * 5, [True] * 9]


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_extract_rows_uniform_k_equals_int_k(backend, device):
    probs = make_probs(3, 2, 12, torch.float16, device=device)
    hidden = torch.randn(3, 12, 4, device=device).half()
    mask = make_mask(3, 12, "heavy", device=device)
    for k in (1, 5):
        rows = torch.full((3,), k, device=device)
        check(extract(probs, hidden, mask, rows, width=k, backend=backend), extract(probs, hidden, mask, k, backend=backend))


def test_extract_rows_two_launches_no_host_sync(device, monkeypatch, launches):
    """Per-row k on the Triton path: still two launches, and no host synchronisation."""
    probs = make_probs(4, 2, 16, torch.float16, device=device)
    hidden = torch.randn(4, 16, 8, device=device).half()
    mask = make_mask(4, 16, "heavy", device=device)
    k = row_k(4, 16, device)
    ref = extract_ref(probs.double(), hidden, mask, k, width=10)

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronisation in the forward path")

    for name in ("item", "cpu", "tolist", "__int__", "__index__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = extract(probs, hidden, mask, k, width=10, backend="triton")
    torch_out = extract(probs, hidden, mask, k, width=10, backend="torch")
    monkeypatch.undo()
    assert len(launches) == 2
    check(out, ref)
    check(torch_out, ref)


def test_extract_rows_errors(device):
    probs = make_probs(2, 2, 6, torch.float32)
    hidden = torch.randn(2, 6, 4)
    mask = make_mask(2, 6, "none")
    k = torch.tensor([2, 3])
    with pytest.raises(TypeError, match=r"^width is required when k is a \[B\] tensor"):
        extract(probs, hidden, mask, k)
    with pytest.raises(TypeError, match=r"^width is required when k is a \[B\] tensor"):
        extract_from_scores(significance_ref(probs, mask), hidden, mask, k)
    with pytest.raises(ValueError, match=r"^width must be an int >= 1, got -1$"):
        extract(probs, hidden, mask, k, width=-1)
    with pytest.raises(ValueError, match=r"^width is only for a per-row \[B\] tensor k"):
        extract(probs, hidden, mask, 2, width=3)
    with pytest.raises(ValueError, match=r"^k as a tensor must be on probs' device cpu, got meta$"):
        extract(probs, hidden, mask, k.to("meta"), width=3)
    with pytest.raises(ValueError, match=r"^k as a tensor must have shape \[B\] = \[2\]"):
        extract(probs, hidden, mask, k[:1], width=3)
    with pytest.raises(TypeError, match=r"^k as a tensor has unsupported dtype float32"):
        extract(probs, hidden, mask, k.float(), width=3)


def test_aot_check_compiles_row_k_variants():
    """kernels.aot compiles what the launchers launch: the per-row-k variants (ROW_K=True) of the
    three elimination launches are among the recorded launches, beside the int-k ones. Recording
    needs the compiled launch path, so it runs in a subprocess without the interpreter."""
    import json
    import os
    import subprocess
    import sys

    code = ("import json; from kernels import aot; print(json.dumps({l.name: l.kwargs.get('ROW_K') "
            "for l in aot.collect_launches(90, only='select|gather')}))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    launches = json.loads(out.stdout.strip().splitlines()[-1])
    for kernel in ("select", "gather", "score_select"):
        assert launches[f"{kernel}_rows[bfloat16]"] is True
        for dtype in ("float32", "float16", "bfloat16"):
            assert launches[f"{kernel}[{dtype}]"] is False
