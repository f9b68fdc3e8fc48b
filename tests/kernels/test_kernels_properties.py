"""Property-based tests (hypothesis): every kernel against its eager reference.

Random batch B (1..4), heads H (1..3), length n (1..40, odd sizes included), k (1..n+2), dtypes
fp32/fp16/bf16 (and fp64 on the torch path), masks (none, random holes, right padding, all but
[CLS] padded), forced ties (scores drawn from a handful of values, probabilities quantised to a
coarse grid) and NaNs of both sign bits sprinkled in. Selected indices must equal the reference
exactly; gathered values are bit-exact copies; significance scores agree within the fp32
accumulation tolerance.

Per-row k (spec §8): k_i drawn from [-1, n + 2] per row (0 and -1 count as 1) and a width in
[1, n + 2]; every output equals the per-row reference, and row by row the int-k rule.

Every test is derandomized (a fixed sequence of examples: deterministic in CI). The Triton ones
run under the interpreter (~1 ms per program, tl.sort is slow), so they get few, small examples.
"""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernel_inputs import check_extract_rows_independently, check_rows_independently, nan_as_neginf, nan_of
from spec_reference import spec_keep

from kernels.extract import extract, extract_from_scores, extract_from_scores_ref, extract_ref
from kernels.gather import gather, gather_ref
from kernels.significance import significance, significance_ref
from kernels.select import select, select_ref


def _settings(max_examples):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


TORCH = _settings(200)       # the torch path and the references: fast
TRITON = _settings(25)       # the interpreter: ~1 ms per program, seconds per tl.sort
TRITON_ROWS = _settings(12)  # the per-row-k variants of the same kernels: fewer still

KERNEL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ALL_DTYPES = KERNEL_DTYPES + [torch.float64]
MASK_KINDS = ["none", "holes", "right", "cls"]
# Special score values, drawn into the palette alongside ordinary numbers.
NAN_POS, NAN_NEG = "nan+", "nan-"
SPECIALS = [NAN_POS, NAN_NEG, float("-inf"), float("inf"), 0.0, -0.0]


# ----------------------------------------------------------------------------- inputs


def _mask(B, n, kind, dtype, g):
    """[B, n] mask of ``dtype``, [CLS] always real."""
    if kind == "none":
        m = torch.ones(B, n, dtype=torch.bool)
    elif kind == "holes":
        m = torch.rand(B, n, generator=g) < torch.rand(B, 1, generator=g)
    elif kind == "right":
        lengths = torch.randint(1, n + 1, (B, 1), generator=g)
        m = torch.arange(n)[None, :] < lengths
    else:  # all but [CLS] padded
        m = torch.zeros(B, n, dtype=torch.bool)
    m[:, 0] = True
    return m.to(dtype)


def _put_nans(x, codes, pos_code, neg_code):
    """NaN with a positive / negative sign bit where codes == pos_code / neg_code (built from bits:
    a cast does not keep a NaN's sign, e.g. float32 -> bfloat16 always gives 0xFFFF)."""
    pos, neg = nan_of(x.dtype, False), nan_of(x.dtype, True)
    x = torch.where(codes == pos_code, pos, x)
    return torch.where(codes == neg_code, neg, x)


@st.composite
def score_rows(draw, B, n, dtype):
    """[B, n] scores of ``dtype`` drawn element by element from a small palette (forced ties) of
    ordinary numbers and, maybe, NaN (either sign bit), +-inf, +-0.0."""
    numbers = draw(st.lists(st.floats(-8, 8, allow_nan=False, width=32), min_size=1, max_size=5))
    specials = draw(st.lists(st.sampled_from(SPECIALS), max_size=3, unique_by=str))
    palette = numbers + specials
    codes = draw(st.lists(st.integers(0, len(palette) - 1), min_size=B * n, max_size=B * n))
    codes = torch.tensor(codes).view(B, n)
    values = torch.tensor([0.0 if isinstance(v, str) else v for v in palette], dtype=torch.float64)
    scores = values[codes].to(dtype)
    for code, v in enumerate(palette):
        if v == NAN_POS:
            scores = _put_nans(scores, codes, code, -1)
        elif v == NAN_NEG:
            scores = _put_nans(scores, codes, -1, code)
    if draw(st.booleans()):  # a strided [B, n] view of an [n, B] tensor
        scores = scores.t().contiguous().t()
    return scores


@st.composite
def select_cases(draw, dtypes, max_n=40):
    B = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n + 2))
    dtype = draw(st.sampled_from(dtypes))
    return draw(score_rows(B, n, dtype)), k


def _probs(B, H, n, dtype, quantum, nan_rate, g):
    """Softmax of random logits, rounded to multiples of 2**-quantum: exactly representable in
    fp16/bf16/fp32 and summed exactly in fp32 whatever the order, so every path computes the
    same scores and selections are comparable exactly (a coarse grid forces many ties). NaNs
    of both sign bits at rate ``nan_rate``."""
    p = (torch.randn(B, H, n, n, generator=g, dtype=torch.float64) * 3).softmax(-1)
    p = (torch.round(p * 2 ** quantum) / 2 ** quantum).to(dtype)
    codes = (torch.rand(B, H, n, n, generator=g) < nan_rate).long()
    codes = codes * torch.randint(1, 3, (B, H, n, n), generator=g)      # 1: NaN+, 2: NaN-
    return _put_nans(p, codes, 1, 2)


@st.composite
def extract_cases(draw, dtypes, max_b=4, max_h=3, max_n=40):
    B = draw(st.integers(1, max_b))
    H = draw(st.integers(1, max_h))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n + 2))
    D = draw(st.integers(1, 8))
    dtype = draw(st.sampled_from(dtypes))
    mask_kind = draw(st.sampled_from(MASK_KINDS))
    mask_dtype = draw(st.sampled_from([torch.bool, torch.int64, torch.float32]))
    quantum = draw(st.sampled_from([2, 4, 8]))
    nan_rate = draw(st.sampled_from([0.0, 0.0, 0.01, 0.05]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    probs = _probs(B, H, n, dtype, quantum, nan_rate, g)
    hidden = torch.randn(B, n, D, generator=g).to(dtype)
    mask = _mask(B, n, mask_kind, mask_dtype, g)
    return probs, hidden, mask, k


# ----------------------------------------------------------------------------- checks


def _check_select(idx, scores, k):
    ref = select_ref(scores, k)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, ref), f"\n{idx}\n!=\n{ref}\nscores={scores}"
    # the NaN rule spelled out, and the independent spec reference row by row
    assert torch.equal(idx, select_ref(nan_as_neginf(scores), k))
    for b in range(scores.shape[0]):
        assert idx[b].tolist() == spec_keep(scores[b], k)


def _check_extract(out, ref):
    (h, m, idx), (h_ref, m_ref, idx_ref) = out, ref
    assert torch.equal(idx, idx_ref), f"\n{idx}\n!=\n{idx_ref}"
    assert h.dtype == h_ref.dtype and m.dtype == m_ref.dtype
    assert torch.equal(h, h_ref) and torch.equal(m, m_ref)  # gathered rows are exact copies


def _check_scores(got, probs, mask):
    ref = significance_ref(probs.double(), mask)
    assert got.dtype == (torch.float64 if probs.dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isnan(got), torch.isnan(ref))
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref))
    assert torch.equal(torch.isneginf(got) & ~torch.isnan(got), (mask == 0) & ~torch.isnan(got))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite].double(), ref[finite], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- select


@TORCH
@given(select_cases(ALL_DTYPES, max_n=40))
def test_select_torch(case):
    scores, k = case
    _check_select(select(scores, k, backend="torch"), scores, k)
    _check_select(select(scores, k), scores, k)  # auto on CPU = torch path


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON
@given(select_cases(KERNEL_DTYPES, max_n=40))
def test_select_triton(case):
    scores, k = case
    _check_select(select(scores, k, backend="triton"), scores, k)


# ----------------------------------------------------------------------------- significance


@TORCH
@given(extract_cases(ALL_DTYPES))
def test_significance_torch(case):
    probs, _, mask, _ = case
    _check_scores(significance(probs, mask, backend="torch"), probs, mask)


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON
@given(extract_cases(KERNEL_DTYPES, max_b=3, max_n=33))
def test_significance_triton(case):
    probs, _, mask, _ = case
    _check_scores(significance(probs, mask, backend="triton"), probs, mask)


# ----------------------------------------------------------------------------- extract


@TORCH
@given(extract_cases(ALL_DTYPES))
def test_extract_torch(case):
    probs, hidden, mask, k = case
    ref = extract_ref(probs, hidden, mask, k)
    _check_extract(extract(probs, hidden, mask, k, backend="torch"), ref)
    # the reference itself: the rule on its own scores, and the spec's choice per row
    scores = significance_ref(probs, mask)
    for b in range(probs.shape[0]):
        assert ref[2][b].tolist() == spec_keep(scores[b], k)


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON
@given(extract_cases(KERNEL_DTYPES, max_b=3, max_n=33))
def test_extract_triton(case):
    probs, hidden, mask, k = case
    _check_extract(extract(probs, hidden, mask, k, backend="triton"), extract_ref(probs, hidden, mask, k))


@st.composite
def from_scores_cases(draw, dtypes, max_n=40):
    scores, k = draw(select_cases(dtypes, max_n))
    B, n = scores.shape
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    hidden = torch.randn(B, n, draw(st.integers(1, 8)), generator=g).to(
        draw(st.sampled_from([scores.dtype, torch.float64])))
    mask = _mask(B, n, draw(st.sampled_from(MASK_KINDS)), torch.int64, g)
    return scores, hidden, mask, k


@TORCH
@given(from_scores_cases(ALL_DTYPES))
def test_extract_from_scores_torch(case):
    scores, hidden, mask, k = case
    ref = extract_from_scores_ref(scores, hidden, mask, k)
    _check_extract(extract_from_scores(scores, hidden, mask, k, backend="torch"), ref)
    for b in range(scores.shape[0]):  # padding counts as -inf whatever its score
        masked = torch.where(mask[b] == 0, float("-inf"), scores[b].double())
        assert ref[2][b].tolist() == spec_keep(masked, k)


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON
@given(from_scores_cases(KERNEL_DTYPES, max_n=33))
def test_extract_from_scores_triton(case):
    scores, hidden, mask, k = case
    ref = extract_from_scores_ref(scores, hidden, mask, k)
    _check_extract(extract_from_scores(scores, hidden, mask, k, backend="triton"), ref)


# ----------------------------------------------------------------------------- gather


@st.composite
def gather_cases(draw, dtypes, max_n=40):
    B = draw(st.integers(1, 4))
    n = draw(st.integers(1, max_n))
    k = draw(st.integers(1, n))
    D = draw(st.integers(1, 40))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    hidden = torch.randn(B, n, D, generator=g).to(draw(st.sampled_from(dtypes)))
    if draw(st.booleans()):  # a [B, n, D] view with stride_d = n
        hidden = hidden.transpose(1, 2).contiguous().transpose(1, 2)
    mask = _mask(B, n, draw(st.sampled_from(MASK_KINDS)), draw(st.sampled_from([torch.bool, torch.int64])), g)
    indices = torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(B)])
    return hidden, mask, indices


@TORCH
@given(gather_cases(ALL_DTYPES))
def test_gather_torch(case):
    hidden, mask, indices = case
    out = gather(hidden, mask, indices, backend="torch")
    ref = gather_ref(hidden, mask, indices)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON
@given(gather_cases(ALL_DTYPES))
def test_gather_triton(case):
    hidden, mask, indices = case
    out = gather(hidden, mask, indices, backend="triton")
    ref = gather_ref(hidden, mask, indices)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], ref[1])


# ----------------------------------------------------------------------------- per-row k


@st.composite
def row_k_and_width(draw, B, n):
    """A [B] int64 k with values in [-1, n + 2] (non-positive ones count as 1) and a width."""
    k = torch.tensor(draw(st.lists(st.integers(-1, n + 2), min_size=B, max_size=B)), dtype=torch.int64)
    if draw(st.booleans()):  # a strided [B] view
        k = torch.stack([k, k], 1)[:, 0]
    return k, draw(st.integers(1, n + 2))


@st.composite
def select_rows_cases(draw, dtypes, max_n=40):
    scores, _ = draw(select_cases(dtypes, max_n))
    return (scores, *draw(row_k_and_width(*scores.shape)))


def _check_select_rows(idx, scores, k, width):
    ref = select_ref(scores, k, width=width)
    assert torch.equal(idx, ref), f"\n{idx}\n!=\n{ref}\nk={k} width={width}\nscores={scores}"
    check_rows_independently(idx, scores, k, width)


@TORCH
@given(select_rows_cases(ALL_DTYPES))
def test_select_rows_torch(case):
    scores, k, width = case
    _check_select_rows(select(scores, k, width=width, backend="torch"), scores, k, width)


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON_ROWS
@given(select_rows_cases(KERNEL_DTYPES, max_n=33))
def test_select_rows_triton(case):
    scores, k, width = case
    _check_select_rows(select(scores, k, width=width, backend="triton"), scores, k, width)


@st.composite
def extract_rows_cases(draw, dtypes, max_b=4, max_n=40):
    probs, hidden, mask, _ = draw(extract_cases(dtypes, max_b=max_b, max_n=max_n))
    B, n = mask.shape
    return (probs, hidden, mask, *draw(row_k_and_width(B, n)))


@TORCH
@given(extract_rows_cases(ALL_DTYPES))
def test_extract_rows_torch(case):
    probs, hidden, mask, k, width = case
    ref = extract_ref(probs, hidden, mask, k, width=width)
    out = extract(probs, hidden, mask, k, width=width, backend="torch")
    _check_extract(out, ref)
    check_extract_rows_independently(out, hidden, mask, significance_ref(probs, mask), k, width)


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON_ROWS
@given(extract_rows_cases(KERNEL_DTYPES, max_b=3, max_n=33))
def test_extract_rows_triton(case):
    probs, hidden, mask, k, width = case
    _check_extract(extract(probs, hidden, mask, k, width=width, backend="triton"),
                   extract_ref(probs, hidden, mask, k, width=width))


@st.composite
def from_scores_rows_cases(draw, dtypes, max_n=40):
    scores, hidden, mask, _ = draw(from_scores_cases(dtypes, max_n))
    return (scores, hidden, mask, *draw(row_k_and_width(*scores.shape)))


@TORCH
@given(from_scores_rows_cases(ALL_DTYPES))
def test_extract_from_scores_rows_torch(case):
    scores, hidden, mask, k, width = case
    ref = extract_from_scores_ref(scores, hidden, mask, k, width=width)
    out = extract_from_scores(scores, hidden, mask, k, width=width, backend="torch")
    _check_extract(out, ref)
    seen = torch.where(mask == 0, float("-inf"), scores.double())  # padding counts as -inf
    check_extract_rows_independently(out, hidden, mask, seen, k, width)


@pytest.mark.interpreter  # hypothesis draws CPU tensors; the GPU run has the device-fixture tests
@TRITON_ROWS
@given(from_scores_rows_cases(KERNEL_DTYPES, max_n=33))
def test_extract_from_scores_rows_triton(case):
    scores, hidden, mask, k, width = case
    _check_extract(extract_from_scores(scores, hidden, mask, k, width=width, backend="triton"),
                   extract_from_scores_ref(scores, hidden, mask, k, width=width))
