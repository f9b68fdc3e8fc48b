"""Launch helpers shared by the elimination kernels: block sizes, input checks, backend choice.

Nothing here touches the GPU at import time: the helpers only read tensor metadata
(shape, dtype, device) and the ``TRITON_INTERPRET`` environment variable when called.
"""
from __future__ import annotations

import math
import numbers
import os

import torch

# Float dtypes the Triton kernels take probabilities / scores in. They load them, upcast to
# fp32 right away and accumulate in fp32.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Dtypes the torch path and the references take as well: float64 (an fp64 model) is scored
# and selected in float64 there, so no two distinct fp64 scores are merged by rounding.
TORCH_DTYPES = FLOAT_DTYPES + (torch.float64,)
# The hidden states are only moved, never computed on, so fp64 is fine there on both paths.
HIDDEN_DTYPES = TORCH_DTYPES
# The one-program-per-row kernels hold a whole row (scores, sort keys) in registers.
MAX_TRITON_N = 512

BACKENDS = (None, "triton", "torch")
# On CUDA the tl.dot kernels (kernels.attention, varlen_attention, lse_significance) take fp16 and
# bf16 only. fp32 operands make tl.dot run IEEE fp32 on the FMA units and the attention forward
# spills (sm_80/sm_90, d 64: 255 registers and ~3 KB of spills per thread);
# input_precision="tf32x3" still spills on sm_80 at d 64 and 128. fp32 takes the torch path there.
# The interpreter computes in fp32 anyway and takes fp32 too.
DOT_CUDA_DTYPES = (torch.float16, torch.bfloat16)

# Triton pointer types for the dtypes above, for ahead-of-time compile specs.
TRITON_PTR = {
    torch.float32: "*fp32",
    torch.float16: "*fp16",
    torch.bfloat16: "*bf16",
    torch.float64: "*fp64",
    torch.int64: "*i64",
    torch.int32: "*i32",
    torch.uint8: "*u8",
}
AOT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The per-row-k variants (ROW_K) differ from the int-k kernels only in dtype-independent code
# (load and clamp a k, store filler zeros): one score dtype per variant keeps the AOT check short.
AOT_ROW_K_DTYPES = (torch.bfloat16,)


def size_min(a, b):
    """``min`` of two sizes, either a Python int or a symbolic one (``torch.SymInt``).

    Plain ``min`` on two ints: Dynamo in torch 2.11 cannot trace ``torch.sym_min`` returning an
    int (seen on the H200's image); ``torch.sym_min`` otherwise, which puts no guard on a
    symbolic size (torch.export).
    """
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return torch.sym_min(a, b)


def size_max(a, b):
    """``max`` of two sizes, int or symbolic; as :func:`size_min`."""
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return torch.sym_max(a, b)


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1). Pure Python: no triton import needed."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def num_warps_for(block_elems: int) -> int:
    """Warps for a program that holds ``block_elems`` fp32 values in registers."""
    if block_elems >= 8192:
        return 8
    if block_elems >= 2048:
        return 4
    return 2 if block_elems >= 512 else 1


def colsum_block_i(block_n: int) -> int:
    """Query rows per iteration of the column-sum loop: a [BLOCK_I, BLOCK_N] fp32 tile of ~8K values."""
    return max(1, min(block_n, 8192 // block_n))


def interpreting() -> bool:
    """True when the Triton interpreter is on (kernels then run on CPU tensors).

    Reads TRITON_INTERPRET at call time; triton reads it when a ``@triton.jit`` function is
    defined, so it must be set before the kernel modules are imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def dot_tiles(block_m, block_n, default_m: int, default_n: int, dot_in_input_dtype) -> tuple[int, int, bool]:
    """``(BLOCK_M, BLOCK_N, DOT_IN_INPUT_DTYPE)`` of a tl.dot kernel's launch.

    block_m / block_n: overrides (tests use small tiles), None for the launcher's heuristic
    ``default_m`` / ``default_n``; an override must be a power of two >= 16 (tl.dot needs every
    dim >= 16). dot_in_input_dtype: None for the device's choice: on the GPU fp16/bf16 operands
    feed the tensor cores; the interpreter gets fp32, since its bf16 arithmetic and bf16 tl.dot
    are wrong.
    """
    block_m, block_n = block_m or default_m, block_n or default_n
    for name, blk in (("block_m", block_m), ("block_n", block_n)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {blk}")
    if dot_in_input_dtype is None:
        dot_in_input_dtype = not interpreting()
    return block_m, block_n, dot_in_input_dtype


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``: the dtype as error messages name it."""
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- checks


def check_tensor(x, name: str) -> torch.Tensor:
    """x itself if it is a torch.Tensor; TypeError naming the argument otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def check_dtype(x: torch.Tensor, name: str, allowed) -> None:
    """TypeError naming the argument and the accepted dtypes unless x.dtype is in ``allowed``."""
    if x.dtype not in allowed:
        names = ", ".join(dtype_name(d) for d in allowed)
        raise TypeError(f"{name} has unsupported dtype {dtype_name(x.dtype)}; accepted: {names}")


def check_probs(probs) -> tuple[int, int, int]:
    """probs must be [B, H, n, n] float16/bfloat16/float32/float64 with n >= 1; returns (B, H, n).

    float64 is for the torch path only: :func:`resolve_backend` refuses it for Triton.
    """
    check_tensor(probs, "probs")
    if probs.dim() != 4:
        raise ValueError(f"probs must be 4-D [B, H, n, n], got shape {tuple(probs.shape)}")
    B, H, n, n2 = probs.shape
    if n != n2:
        raise ValueError(f"probs must be square in its last two dims [B, H, n, n], got {tuple(probs.shape)}")
    if B < 1 or H < 1 or n < 1:
        raise ValueError(f"probs needs B, H, n >= 1, got shape {tuple(probs.shape)}")
    check_dtype(probs, "probs", TORCH_DTYPES)
    return B, H, n


def check_mask(mask, B: int, n: int) -> None:
    """mask must be [B, n]: bool, or an integer/float dtype with 1 = real token, 0 = padding."""
    check_tensor(mask, "mask")
    if tuple(mask.shape) != (B, n):
        raise ValueError(f"mask must have shape [B, n] = {[B, n]}, got {list(mask.shape)}")
    if mask.is_complex():
        raise TypeError(f"mask has unsupported dtype {dtype_name(mask.dtype)}; accepted: bool, integer or real float")


def check_scores(scores) -> tuple[int, int]:
    """scores must be [B, n] float32 (float16/bfloat16 are upcast exactly) or float64 (torch
    path only, see :func:`resolve_backend`); returns (B, n)."""
    check_tensor(scores, "scores")
    if scores.dim() != 2:
        raise ValueError(f"scores must be 2-D [B, n], got shape {tuple(scores.shape)}")
    B, n = scores.shape
    if B < 1 or n < 1:
        raise ValueError(f"scores needs B, n >= 1, got shape {tuple(scores.shape)}")
    check_dtype(scores, "scores", TORCH_DTYPES)
    return B, n


def check_hidden(hidden, B: int | None = None, n: int | None = None) -> tuple[int, int, int]:
    """hidden must be [B, n, D] with a float dtype (B, n checked when given); returns (B, n, D)."""
    check_tensor(hidden, "hidden")
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, n, D], got shape {tuple(hidden.shape)}")
    if B is not None and tuple(hidden.shape[:2]) != (B, n):
        raise ValueError(
            f"hidden must have batch and length [B, n] = {[B, n]} matching the other inputs, "
            f"got {list(hidden.shape[:2])}"
        )
    check_dtype(hidden, "hidden", HIDDEN_DTYPES)
    return tuple(hidden.shape)


def check_indices(indices, B: int, n: int) -> int:
    """indices must be [B, k] int64 (values in [0, n) are the caller's promise); returns k."""
    check_tensor(indices, "indices")
    if indices.dim() != 2 or indices.shape[0] != B:
        raise ValueError(f"indices must be 2-D [B, k] with B = {B}, got shape {tuple(indices.shape)}")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be int64, got {dtype_name(indices.dtype)}")
    return indices.shape[1]


def check_k(k) -> int:
    """k must be a Python integer >= 1 (reading a tensor's value would force a host sync; a
    per-row [B] tensor goes through :func:`check_k_width`)."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an int >= 1 or a [B] integer tensor, got {type(k).__name__}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be an int >= 1, got {k}")
    return k


# Integer dtypes a per-row k may have (the kernels load it in its own dtype and clamp there).
ROW_K_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_width(width) -> int:
    """width (the output slots of a per-row k) must be a Python integer >= 1, or a ``torch.SymInt``
    while ``torch.export`` traces (the keep count of a full row at a symbolic length)."""
    if width is None:
        raise TypeError("width is required when k is a [B] tensor: pass width=int >= 1 "
                        "(the output slots, >= max k; it fixes the shape without a host sync)")
    if isinstance(width, torch.SymInt):  # torch.export: a symbolic width stays symbolic (no guard)
        return width
    if isinstance(width, bool) or not isinstance(width, numbers.Integral):
        raise TypeError(f"width must be an int >= 1, got {type(width).__name__}")
    if width < 1:
        raise ValueError(f"width must be an int >= 1, got {int(width)}")
    return int(width)


def check_k_width(k, width, B: int, n: int, device: torch.device, device_of: str = "scores") -> tuple:
    """Check k and width; returns ``(k, W)``.

    An int k: ``(k, None)``; ``width`` must then be None (the int sets the output width).
    A per-row k: a [B] integer tensor on ``device`` (that of the input named ``device_of``), and
    ``W = min(width, n)``. Its values are not checked (reading them would be a host sync): the
    selection clamps each to [1, W] on device.
    """
    if not isinstance(k, torch.Tensor):
        k = check_k(k)
        if width is not None:
            raise ValueError(f"width is only for a per-row [B] tensor k; an int k (here {k}) sets "
                             f"the output width itself, got width={width!r}")
        return k, None
    if k.dim() != 1 or k.shape[0] != B:
        raise ValueError(f"k as a tensor must have shape [B] = [{B}] (one k per row), got {list(k.shape)}")
    if k.dtype not in ROW_K_DTYPES:
        names = ", ".join(dtype_name(d) for d in ROW_K_DTYPES)
        raise TypeError(f"k as a tensor has unsupported dtype {dtype_name(k.dtype)}; accepted: {names}")
    if k.device != device:
        raise ValueError(f"k as a tensor must be on {device_of}' device {device}, got {k.device}")
    return k, size_min(check_width(width), n)  # no guard on a symbolic n (torch.export)


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """The one device of the tensors (by argument name); ValueError listing them if they differ."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise ValueError(f"all tensors must be on the same device, got {listing}")
    return first


def check_kernel_dtype(name: str, dtype: torch.dtype) -> None:
    """The dtype check of ``backend='triton'``: TypeError naming the input ``name`` unless
    ``dtype`` is one the Triton kernels take (FLOAT_DTYPES)."""
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(dtype_name(d) for d in FLOAT_DTYPES)
        raise TypeError(
            f"backend='triton' does not support {name} of dtype {dtype_name(dtype)}; "
            f"accepted: {names} (use backend='torch' or None for {dtype_name(dtype)})"
        )


def check_backend(backend) -> None:
    """ValueError naming ``backend`` unless it is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_scale(scale) -> None:
    """scale must be None (the kernel's default) or a finite real number (not a bool)."""
    if scale is None:
        return
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")


def check_qkv(q, layout: tuple[str, ...], like_q: dict, on_q_device: dict, head_dims,
              unit_head_stride: bool = False) -> tuple[int, ...]:
    """The operand checks the attention launchers share; returns q.shape.

    Every tensor (q, ``like_q``, ``on_q_device``: name -> value) must be a torch.Tensor; q must
    have the rank of ``layout`` (its dim names, e.g. ``("T", "H", "d")``, the last the head dim)
    and a dtype in TORCH_DTYPES; the ``like_q`` tensors (k, v) q's shape and dtype; they and the
    ``on_q_device`` ones q's device; d = q.shape[-1] one of ``head_dims``. ``unit_head_stride``:
    q and the ``like_q`` tensors must have stride 1 in the head dim (the packed kernels assume it).
    """
    for name, t in (("q", q), *like_q.items(), *on_q_device.items()):
        check_tensor(t, name)
    if q.dim() != len(layout):
        raise ValueError(f"q must be {len(layout)}-D [{', '.join(layout)}], got shape {tuple(q.shape)}")
    for name, t in like_q.items():
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if q.dtype not in TORCH_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float64, got {dtype_name(q.dtype)}")
    for name, t in like_q.items():
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {dtype_name(q.dtype)}, got {dtype_name(t.dtype)}")
    for name, t in (*like_q.items(), *on_q_device.items()):
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    d = q.shape[-1]
    if d not in head_dims:
        raise ValueError(f"head dim d (q.shape[-1]) must be one of {tuple(head_dims)}, got {d}")
    if unit_head_stride:
        for name, t in (("q", q), *like_q.items()):
            if t.stride(-1) != 1:
                raise ValueError(f"{name} must have stride 1 in its last dim (head dim), got strides {t.stride()}")
    return tuple(q.shape)


def resolve_attention_backend(backend, device: torch.device, dtype: torch.dtype, module: str,
                              cuda_dtypes=DOT_CUDA_DTYPES) -> str:
    """``"triton"`` or ``"torch"`` for a tl.dot kernel's inputs (q) of this device and dtype.

    ``None`` (auto): Triton for CUDA tensors of a dtype in ``cuda_dtypes``, the torch reference
    otherwise (fp32 on CUDA included). ``"triton"``: a dtype in FLOAT_DTYPES, and CUDA tensors
    of ``cuda_dtypes``, or CPU tensors under the interpreter; errors name what is refused and
    ``module`` (the kernel module, as TRITON_INTERPRET must be set before it is imported).
    ``"torch"``: the reference. ``backend`` itself is checked by :func:`check_backend`.
    """
    if backend is None:
        return "triton" if device.type == "cuda" and dtype in cuda_dtypes else "torch"
    if backend == "triton":
        check_kernel_dtype("q", dtype)
        if device.type == "cpu" and not interpreting():
            raise ValueError(f"backend='triton' on CPU tensors needs TRITON_INTERPRET=1 set before "
                             f"{module} is imported; use backend='torch' or CUDA tensors")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend='triton' supports CUDA tensors, got device {device}")
        if device.type == "cuda" and dtype not in cuda_dtypes:
            names = " or ".join(dtype_name(d) for d in cuda_dtypes)
            raise TypeError(f"backend='triton' on CUDA takes q of dtype {names}, got "
                            f"{dtype_name(dtype)} (fp32 tl.dot spills registers); use backend=None or 'torch'")
    return backend


def resolve_backend(backend, device: torch.device, n: int | None = None, max_n: int | None = None,
                    dtype: tuple[str, torch.dtype] | None = None) -> str:
    """Pick ``"triton"`` or ``"torch"``.

    ``None`` (auto): Triton for CUDA tensors whose row length fits the kernel (n <= max_n) and
    whose dtype the kernels take, the vectorised torch path otherwise. ``"triton"`` forces the
    kernels: it needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1, n <= max_n and a
    dtype in FLOAT_DTYPES. ``"torch"`` forces the torch path.
    ``dtype``: (argument name, dtype) of the input whose dtype decides, e.g. ("probs", torch.float64).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of None, 'triton', 'torch'; got {backend!r}")
    fits = max_n is None or n is None or n <= max_n
    kernel_dtype = dtype is None or dtype[1] in FLOAT_DTYPES
    if backend is None:
        return "triton" if device.type == "cuda" and fits and kernel_dtype else "torch"
    if backend == "triton":
        if not kernel_dtype:
            check_kernel_dtype(*dtype)
        if device.type != "cuda" and not (device.type == "cpu" and interpreting()):
            raise ValueError(
                f"backend='triton' needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set "
                f"before kernels are imported; got tensors on {device}"
            )
        if not fits:
            raise ValueError(f"backend='triton' supports sequence length n in [1, {max_n}], got n = {n}")
    return backend


def poison_outputs() -> bool:
    """Whether launchers fill fresh outputs with NaN / -1 before a kernel writes them.

    On by default under the interpreter (tests) and with POWERBERT_POISON_OUTPUTS=1, so
    unwritten elements fail the comparisons; off on a plain CUDA run, where the fill would be
    an extra launch (the fused extract promises at most two).
    """
    return interpreting() or os.environ.get("POWERBERT_POISON_OUTPUTS", "0") == "1"


def new_output(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output buffer for a kernel: poisoned (NaN for floats, -1 for integers) when
    :func:`poison_outputs` says so, else uninitialised."""
    if not poison_outputs():
        return torch.empty(shape, dtype=dtype, device=device)
    if dtype == torch.bool:  # no invalid bool value to poison with
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def mask_for_kernel(mask: torch.Tensor) -> torch.Tensor:
    """Bool tensors are passed to kernels as uint8 views (same bytes, no copy)."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def mask_as_int8(mask: torch.Tensor) -> torch.Tensor:
    """[B, n] mask of any dtype -> [B, n] int8, 1 = real token, 0 = padding.

    A bool mask is viewed (same bytes, no copy); other dtypes cost one small [B, n] comparison.
    The attention kernels take this one mask dtype: one compiled variant whatever the caller's mask.
    """
    return mask.view(torch.int8) if mask.dtype == torch.bool else (mask != 0).view(torch.int8)
