"""The public building blocks the kernels share (torch paths, launchers, launch helpers), the
rule that no kernel module reaches into another's private names, and the dispatch point's
``significance``."""
import ast
import importlib
from pathlib import Path

import pytest
import torch

from kernel_inputs import make_mask, raises_one_line, row_k

from kernels import launch
from kernels.extract import extract_ref, launch_score_select
from kernels.gather import gather_ref, gather_torch, launch_gather
from kernels.select import keep_all, launch_select, select_ref, select_torch, select_torch_rows
from kernels.significance import launch_significance, significance_ref, significance_torch
from powerbert.elimination import dispatch

REPO = Path(__file__).resolve().parents[2]


def _imported_private_names(path: Path) -> list[str]:
    """``module.name`` for every underscore name a file imports from a ``kernels`` module."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kernels":
            found += [f"{node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
    return found


@pytest.mark.parametrize("path", sorted((REPO / "kernels").glob("*.py")) + [REPO / "powerbert/elimination/dispatch.py"],
                         ids=lambda p: p.name)
def test_no_private_kernel_names_imported(path):
    assert _imported_private_names(path) == []


@pytest.mark.parametrize("path", [REPO / "kernels/aot.py", REPO / "kernels/compiled_cost.py",
                                  REPO / "powerbert/elimination/dispatch.py"], ids=lambda p: p.name)
def test_no_private_kernel_attributes_reached(path):
    """No ``attention._launcher``-style attribute access on a kernel module either."""
    tree = ast.parse(path.read_text())
    # (aot.py names a recorded Launch `launch`: the helpers module goes by L there)
    modules = {"attention", "significance", "select", "gather", "extract", "L", "kernels"}
    reached = [f"{n.value.id}.{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
               and n.value.id in modules and n.attr.startswith("_")]
    assert reached == []


def _probs(B, H, n, dtype=torch.float32, device="cpu"):
    return torch.randn(B, H, n, n).softmax(-1).to(dtype).to(device)


# ----------------------------------------------------------------------------- launch helpers


def test_mask_as_int8_bool_is_a_view():
    mask = torch.tensor([[True, False, True]])
    out = launch.mask_as_int8(mask)
    assert out.dtype == torch.int8 and out.data_ptr() == mask.data_ptr()
    assert out.tolist() == [[1, 0, 1]]


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.float16])
def test_mask_as_int8_other_dtypes_are_zero_one(dtype):
    mask = torch.tensor([[1, 0, 3], [0, 2, 0]]).to(dtype)
    out = launch.mask_as_int8(mask)
    assert out.dtype == torch.int8 and out.tolist() == [[1, 0, 1], [0, 1, 0]]


def test_dtype_name():
    assert launch.dtype_name(torch.bfloat16) == "bfloat16"


# ----------------------------------------------------------------------------- torch paths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_significance_torch_equals_reference(dtype):
    probs = _probs(2, 3, 9, dtype)
    mask = make_mask(2, 9, "heavy")
    got = significance_torch(probs, mask)
    assert got.dtype == dtype
    torch.testing.assert_close(got, significance_ref(probs, mask))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_torch_equals_reference(dtype):
    scores = torch.randn(3, 11, dtype=dtype).round(decimals=1)  # ties
    assert torch.equal(select_torch(scores, 4), select_ref(scores, 4))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_select_torch_rows_gives_indices_and_filler(dtype):
    scores = torch.randn(6, 10, dtype=dtype)
    k = row_k(6, 10)
    indices, filler = select_torch_rows(scores, k, 7)
    assert torch.equal(indices, select_ref(scores, k, width=7))
    kept = k.clamp(1, 7)
    assert torch.equal(filler, torch.arange(7)[None, :] >= kept[:, None])


def test_keep_all():
    out = keep_all(2, 4, "cpu")
    assert out.is_contiguous() and out.tolist() == [[0, 1, 2, 3]] * 2


def test_gather_torch_equals_reference_non_contiguous():
    hidden = torch.randn(5, 3, 8).transpose(0, 1)  # [3, 5, 8], rows not flattenable
    mask = make_mask(3, 5, "heavy")
    indices = torch.tensor([[0, 2], [0, 4], [0, 1]])
    for got, want in zip(gather_torch(hidden, mask, indices), gather_ref(hidden, mask, indices)):
        assert torch.equal(got, want)


# ----------------------------------------------------------------------------- launchers


@pytest.mark.interpreter
def test_launchers_equal_references():
    """Each launcher alone (no checks, no backend choice) against its reference."""
    B, H, n, D, k = 3, 2, 10, 6, 4
    probs, mask = _probs(B, H, n), make_mask(B, n, "heavy", dtype=torch.bool)
    hidden = torch.randn(B, n, D)
    scores = significance_ref(probs, mask)
    torch.testing.assert_close(launch_significance(probs, mask), scores)
    indices = select_ref(scores, k)
    assert torch.equal(launch_select(scores, k, mask=mask), indices)
    assert torch.equal(launch_score_select(probs, mask, k), indices)
    for got, want in zip(launch_gather(hidden, mask, indices), gather_ref(hidden, mask, indices)):
        assert torch.equal(got, want)
    ks = row_k(B, n)
    assert torch.equal(launch_score_select(probs, mask, ks, width=n), select_ref(scores, ks, width=n))
    h_ref, m_ref, i_ref = extract_ref(probs, hidden, mask, ks, width=n)
    h, m = launch_gather(hidden, mask, i_ref, k_rows=ks)
    assert torch.equal(h, h_ref) and torch.equal(m, m_ref)


# ----------------------------------------------------------------------------- dispatch


def test_dispatch_significance_detaches():
    probs = _probs(2, 2, 7).requires_grad_()
    mask = make_mask(2, 7, "heavy", dtype=torch.bool)
    got = dispatch.significance(probs, mask)
    assert not got.requires_grad
    torch.testing.assert_close(got, significance_ref(probs.detach(), mask))


@pytest.fixture
def triton_launches(monkeypatch):
    """Counts of the significance launcher's calls."""
    module = importlib.import_module("kernels.significance")
    calls = []
    original = module.launch_significance

    def counting(*args):
        calls.append(args[0].dtype)
        return original(*args)

    monkeypatch.setattr(module, "launch_significance", counting)
    return calls


@pytest.mark.interpreter
def test_dispatch_significance_follows_the_forced_backend(triton_launches):
    probs, mask = _probs(2, 2, 7), make_mask(2, 7, "none", dtype=torch.bool)
    dispatch.significance(probs, mask)
    assert triton_launches == []  # CPU tensors: the torch path by default
    with dispatch.use_backend("triton"):
        got = dispatch.significance(probs, mask)
        assert triton_launches == [torch.float32]
        # float64 stays on the torch path even when Triton is forced
        assert dispatch.significance(probs.double(), mask).dtype == torch.float64
        assert triton_launches == [torch.float32]
    torch.testing.assert_close(got, significance_ref(probs, mask))


def test_check_kernel_dtype():
    launch.check_kernel_dtype("probs", torch.bfloat16)
    with pytest.raises(TypeError, match=r"^backend='triton' does not support q of dtype float64; accepted: "
                                        r"float16, bfloat16, float32 \(use backend='torch' or None for float64\)$"):
        launch.check_kernel_dtype("q", torch.float64)


CUDA = torch.device("cuda")  # a device object only: nothing runs on it
ATTENTION_MODULES = ["kernels.attention", "kernels.varlen_attention", "kernels.lse_significance"]


@pytest.mark.parametrize("dtype, backend, want", [
    (torch.float16, None, "triton"), (torch.bfloat16, None, "triton"),
    (torch.float32, None, "torch"), (torch.float64, None, "torch"),
    (torch.float16, "triton", "triton"), (torch.bfloat16, "triton", "triton"),
    (torch.float32, "torch", "torch"), (torch.float16, "torch", "torch"),
], ids=str)
def test_resolve_attention_backend_routes_fp32_to_torch_on_cuda(dtype, backend, want):
    """On CUDA the tl.dot kernels run fp16/bf16; fp32 takes the torch path (fp32 tl.dot spills)."""
    assert launch.resolve_attention_backend(backend, CUDA, dtype, "kernels.attention") == want


@pytest.mark.parametrize("module", ATTENTION_MODULES)
def test_resolve_attention_backend_refusals(module, monkeypatch):
    """backend='triton' refused with one-line errors that name q's dtype, the device, or the
    module TRITON_INTERPRET must be set before."""
    with raises_one_line(TypeError, r"^backend='triton' on CUDA takes q of dtype float16 or bfloat16, "
                                    r"got float32 .*backend=None or 'torch'$"):
        launch.resolve_attention_backend("triton", CUDA, torch.float32, module)
    with raises_one_line(TypeError, r"^backend='triton' does not support q of dtype float64"):
        launch.resolve_attention_backend("triton", CUDA, torch.float64, module)
    with raises_one_line(ValueError, r"^backend='triton' supports CUDA tensors, got device meta$"):
        launch.resolve_attention_backend("triton", torch.device("meta"), torch.float16, module)
    monkeypatch.setattr(launch, "interpreting", lambda: False)
    with raises_one_line(ValueError, rf"^backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                                     rf"{module} is imported; use backend='torch' or CUDA tensors$"):
        launch.resolve_attention_backend("triton", torch.device("cpu"), torch.float16, module)
    assert launch.resolve_attention_backend(None, torch.device("cpu"), torch.float16, module) == "torch"


@pytest.mark.parametrize("scale, exc, match", [
    ("0.1", TypeError, r"^scale must be a real number or None, got str$"),
    (True, TypeError, r"^scale must be a real number or None, got bool$"),
    (float("nan"), ValueError, r"^scale must be finite, got nan$"),
    (float("-inf"), ValueError, r"^scale must be finite, got -inf$"),
])
def test_check_scale(scale, exc, match):
    for good in (None, 0.125, 1, torch.tensor(0.5).item()):
        launch.check_scale(good)
    with raises_one_line(exc, match):
        launch.check_scale(scale)


def test_check_backend():
    for good in launch.BACKENDS:
        launch.check_backend(good)
    with raises_one_line(ValueError, r"^backend must be one of \(None, 'triton', 'torch'\), got 'cuda'$"):
        launch.check_backend("cuda")
