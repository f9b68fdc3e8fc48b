"""Ahead-of-time compile of every Triton kernel as the JIT compiles it, for GPUs this machine lacks.

The JIT does not compile a kernel from its annotations: it specialises every launch on its
arguments (triton 3.6, ``JITFunction.run``): an int becomes i32 (i64 only beyond int32), an int
equal to 1 becomes a constant, pointers and ints divisible by 16 get ``tt.divisibility=16``, and
the launcher picks block sizes and ``num_warps``. A kernel compiled from hand-written i64
signatures is another program (the attention forward took 255 registers that way, 126 as the
JIT compiles it). So this check does not declare signatures: it runs each launcher once on
representative CPU tensors (BERT-base shapes) with ``JITFunction.run`` replaced by a recorder,
then specialises the recorded arguments with triton's own binder and compiles with
``triton.compile(..., target=GPUTarget("cuda", cap, 32))``, which is what the JIT would do on
that GPU. Launchers whose choices depend on the device (the attention's pass-2 tile width
follows the SM count) are told the SM count of the target (A100 108, H100 132).

For every kernel and architecture it prints one line

    OK <name> sm_<cap> regs=<r> spill_stores=<bytes> spill_loads=<bytes> stack=<bytes> ptx_bytes=<n> (<s>s) [<module>]

with the registers and spills that ``ptxas -v`` (shipped inside the triton wheel) reports for the
kernel's PTX. The exit status is 1 if a compile failed or if a kernel that must not spill
(``Launch.no_spill``: the attention kernels in fp16/bf16 at head dims 64 and 128) spills, 0
otherwise. ``--only REGEX`` compiles the kernels whose name matches alone; ``--json FILE`` also
writes the records (usage, warps, stages, and what the specialisation made of each argument);
``--maxnreg N`` caps the registers (triton's launch option) to see what a tighter budget spills.

Run without TRITON_INTERPRET (under the interpreter ``@triton.jit`` yields an
InterpretedFunction, which cannot be compiled):

    env -u TRITON_INTERPRET python -m kernels.aot
"""
from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

ARCHS = (80, 90)
# SM count of the GPU each architecture stands for (A100, H100 SXM): the launchers that size
# their grid by it are told this number.
SMS = {80: 108, 90: 132}
DTYPE_NAMES = ("float32", "float16", "bfloat16")
# Representative sizes: BERT-base (H 12, D 768), a batch of 8 sequences of 128 tokens, and the
# first layer of the paper's BERT-base configuration (k_1 = 77).
B, H, N, D, K = 8, 12, 128, 768, 77
ATTENTION_HEAD_DIMS = (32, 64, 128)
# On CUDA the attention kernels take fp16/bf16 only (fp32 takes the torch path).
ATTENTION_DTYPES = ("float16", "bfloat16")
# A length that is a multiple of 16 and one that is not (the layers after an elimination): the
# JIT compiles them apart (divisibility hints on N and on the mask's row stride).
ATTENTION_LENGTHS = (N, K)
NO_SPILL_DTYPES = ("float16", "bfloat16")
NO_SPILL_HEAD_DIMS = (64, 128)


class Launch(NamedTuple):
    """One kernel launch recorded from a launcher: what the JIT specialises and compiles."""
    module: str
    name: str
    jit_fn: object
    args: tuple
    kwargs: dict       # constexprs and launch options (num_warps, num_stages, ...)
    no_spill: bool     # a spill in this kernel fails the check


@contextlib.contextmanager
def recording():
    """Within the block, ``kernel[grid](...)`` records ``(jit_fn, args, kwargs)`` and launches nothing."""
    from triton.runtime.jit import JITFunction

    records = []

    def record(self, *args, grid, warmup, **kwargs):
        records.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        yield records
    finally:
        JITFunction.run = original


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def _elimination_calls(cap: int):
    """(module, name, call) per elimination kernel and dtype: the launchers of kernels.significance,
    .select, .gather and .extract on the tensors the model hands them (probs from softmax,
    [B, n] bool mask, int64 indices, a per-row k as int64)."""
    import torch

    from kernels import launch as L
    from kernels.extract import launch_score_select
    from kernels.gather import launch_gather
    from kernels.select import launch_select
    from kernels.significance import launch_significance

    row_k = {L.dtype_name(d) for d in L.AOT_ROW_K_DTYPES}
    mask = torch.ones(B, N, dtype=torch.bool)
    k_rows = torch.full((B,), K, dtype=torch.int64)
    indices = torch.zeros(B, K, dtype=torch.int64)
    calls = []
    for name in DTYPE_NAMES:
        dt = _dtype(name)
        probs = torch.empty(B, H, N, N, dtype=dt)
        s = torch.empty(B, N, dtype=dt)
        hidden = torch.empty(B, N, D, dtype=dt)
        calls += [
            ("kernels.significance", f"significance[{name}]", lambda p=probs: launch_significance(p, mask)),
            ("kernels.select", f"select[{name}]", lambda s=s: launch_select(s, K, mask=mask)),
            ("kernels.gather", f"gather[{name}]", lambda h=hidden: launch_gather(h, mask, indices)),
            ("kernels.extract", f"score_select[{name}]", lambda p=probs: launch_score_select(p, mask, K)),
        ]
        if name in row_k:
            calls += [
                ("kernels.select", f"select_rows[{name}]",
                 lambda s=s: launch_select(s, k_rows, mask=mask, width=K)),
                ("kernels.gather", f"gather_rows[{name}]",
                 lambda h=hidden: launch_gather(h, mask, indices, k_rows=k_rows)),
                ("kernels.extract", f"score_select_rows[{name}]",
                 lambda p=probs: launch_score_select(p, mask, k_rows, width=K)),
            ]
    return calls


def attention_inputs(name: str, d: int, n: int = N, batch: int = B):
    """q, k, v, mask as a BERT layer hands them to the attention kernel: [B, H, n, d] views of
    three [B, n, H*d] projections (powerbert.elimination.layer.split_heads) and a [B, n] bool mask."""
    import torch

    dt = _dtype(name)
    q, k, v = (torch.empty(batch, n, H * d, dtype=dt).view(batch, n, H, d).transpose(1, 2) for _ in range(3))
    return q, k, v, torch.ones(batch, n, dtype=torch.bool)


def _attention_calls(cap: int):
    """(module, name, call) per dtype, head dim and length: both passes of kernels.attention.
    Names: ``attention[float16,d64]`` at N, ``attention[float16,d64,n77]`` at the other length."""
    from kernels.attention import launch_attention

    calls = []
    for name in ATTENTION_DTYPES:
        for d in ATTENTION_HEAD_DIMS:
            for n in ATTENTION_LENGTHS:
                q, k, v, mask = attention_inputs(name, d, n)
                suffix = "" if n == N else f",n{n}"
                calls.append(("kernels.attention", f"attention[{name},d{d}{suffix}]",
                              lambda q=q, k=k, v=v, m=mask: launch_attention(
                                  q, k, v, m, q.shape[-1] ** -0.5, True, num_sms=SMS[cap])))
    return calls


def _module_calls(module: str) -> Callable[[int], list]:
    """The representative calls a kernel module lists itself (its ``aot_calls(cap)``): the packed
    (varlen) path's kernels, each sized like BERT-base in its own file."""
    def calls(cap: int):
        import importlib

        return importlib.import_module(module).aot_calls(cap)
    return calls


# The packed (varlen) path's kernels (powerbert/elimination/packed.py).
PACKED_MODULES = ("kernels.varlen_attention", "kernels.lse_significance", "kernels.select_gather_norm")
# Per module: the representative calls of its launchers. Modules import lazily (triton must not
# be interpreting when they are imported).
CALLS: dict[str, Callable[[int], list]] = {"elimination": _elimination_calls, "attention": _attention_calls,
                                           **{m: _module_calls(m) for m in PACKED_MODULES}}
# A launcher that launches several kernels names each by its jit function.
KERNEL_NAMES = {"_attn_fwd_kernel": "attn_fwd", "_attn_colsum_kernel": "attn_colsum"}


# Kernels that must not spill: the attention kernels (padded and varlen) and the lse column sums
# in fp16/bf16 at head dims 64 and 128, and the packed path's gather + LayerNorm in fp16/bf16
# (the dtypes the packed path runs in on CUDA; its fp32 variant spills 4 bytes on sm_80).
NO_SPILL_ANY_DTYPE = re.compile(r"(select_)?gather_norm\[(float16|bfloat16)\]")


def _no_spill(name: str) -> bool:
    if NO_SPILL_ANY_DTYPE.fullmatch(name):
        return True
    m = re.fullmatch(r"(?:attn_\w+|varlen_attn|lse_colsum)\[(\w+),d(\d+)(,n\d+)?\]", name)
    return bool(m) and m.group(1) in NO_SPILL_DTYPES and int(m.group(2)) in NO_SPILL_HEAD_DIMS


def collect_launches(cap: int, only: str | None = None) -> list[Launch]:
    """Every kernel launch of the representative calls for architecture ``cap``, recorded;
    ``only``: a regular expression the kernel's name must contain a match of."""
    launches = []
    for calls in CALLS.values():
        for module, name, call in calls(cap):
            with recording() as records:
                call()
            if not records:
                raise RuntimeError(f"{name}: the launcher launched no kernel")
            for jit_fn, args, kwargs in records:
                kname = name
                if len(records) > 1:  # e.g. attention[float16,d64] -> attn_fwd[float16,d64]
                    kname = KERNEL_NAMES[jit_fn.fn.__name__] + name[name.index("["):]
                if only is None or re.search(only, kname):
                    launches.append(Launch(module, kname, jit_fn, args, kwargs, _no_spill(kname)))
    return launches


def specialise(launch: Launch, cap: int):
    """``(ASTSource, target, options)``: the recorded launch specialised as ``JITFunction.run``
    specialises it on a sm_<cap> device (triton 3.6: its binder, then ``_pack_args``)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.jit_fn
    target = GPUTarget("cuda", cap, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(fn, signature, constexprs, attrs), target, options


def compile_launch(launch: Launch, cap: int):
    """Compile the recorded launch for sm_<cap> as the JIT would (triton's cache applies)."""
    import triton

    src, target, options = specialise(launch, cap)
    return triton.compile(src, target=target, options=options.__dict__)


def describe(src) -> dict:
    """What the specialisation made of each argument: ``"i32"``, ``"*fp16"``... with ``" div16"``
    where the JIT hints divisibility by 16, or ``"=value"`` for a constant (constexprs, ints equal to 1)."""
    out = {}
    for i, (name, ty) in enumerate(src.signature.items()):
        if (i,) in src.constants:
            out[name] = f"={src.constants[(i,)]}"
        else:
            hints = [a for a in src.attrs.get((i,), []) if a[0] == "tt.divisibility"]
            out[name] = ty + (f" div{hints[0][1]}" if hints else "")
    return out


def _tool(name: str) -> str:
    import triton.backends.nvidia

    return str(Path(triton.backends.nvidia.__path__[0]) / "bin" / name)


def resource_usage(compiled, cap: int) -> dict:
    """Registers, stack frame and spill bytes of a compiled kernel, as ``ptxas -v`` reports them
    for its PTX: the ptxas triton used to make the cubin, with its flags (``-lineinfo``, the
    kernel's ``ptx_options``, e.g. from ``PTXAS_OPTIONS``, and ``--fmad=false`` without fp fusion)."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    meta = compiled.metadata
    flags = ["-lineinfo", "-v", *(meta.ptx_options.split() if meta.ptx_options else []),
             *([] if meta.enable_fp_fusion else ["--fmad=false"])]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        proc = subprocess.run([_tool("ptxas"), *flags, f"--gpu-name={sm_arch_from_capability(cap)}",
                               str(ptx), "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    log = proc.stderr
    usage = {"regs": int(re.search(r"Used (\d+) registers", log).group(1))}
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    usage["stack"], usage["spill_stores"], usage["spill_loads"] = (int(x) for x in frame.groups())
    return usage


def sass(compiled) -> str:
    """The kernel's SASS (``cuobjdump -sass`` of its cubin, tool inside the triton wheel)."""
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        return subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout


_INSTR = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", re.M)
_BRA = re.compile(r"\bBRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)")


def innermost_loops(sass_text: str) -> list[tuple[int, int]]:
    """``(instructions, shortest path)`` of each innermost loop's body, in code order.

    A loop is a backward branch ``BRA target`` and the instructions from target to the branch;
    innermost ones contain no other loop. The shortest path takes every forward branch that
    lands inside the body (skipping what it jumps over): in pass 2 of the attention that is a
    tile off the diagonal, the whole body a tile on it. With triton's software pipelining the
    steady-state body of a loop over tiles is one tile's work, prefetch of the next tiles included.
    """
    instrs = [(int(a, 16), text) for a, text in _INSTR.findall(sass_text)]
    index = {addr: i for i, (addr, _) in enumerate(instrs)}
    branches = []  # (from, to) as instruction indices
    for i, (addr, text) in enumerate(instrs):
        m = _BRA.search(text)
        if m and int(m.group(1), 16) in index:
            branches.append((i, index[int(m.group(1), 16)]))
    loops = [(to, i) for i, to in branches if to < i]
    inner = [(a, b) for a, b in loops if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in loops)]
    out = []
    for a, b in sorted(inner):
        skipped = set()
        for i, to in branches:
            if a <= i < to <= b:
                skipped.update(range(i + 1, to))
        out.append((b - a + 1, b - a + 1 - len(skipped)))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--only", help="compile only the kernels whose name matches this regular expression "
                                       "(re.search)")
    parser.add_argument("--json", type=Path, help="also write the records to this file")
    parser.add_argument("--maxnreg", type=int, help="cap registers per thread (triton's maxnreg launch "
                                                    "option) to see what a tighter budget spills")
    args = parser.parse_args(argv)
    archs = tuple(args.arch) if args.arch else ARCHS

    from kernels.launch import interpreting

    if interpreting():
        print("kernels.aot: TRITON_INTERPRET is set; unset it to compile (jit functions are "
              "interpreted under it)", file=sys.stderr)
        return 2
    import triton

    failures, spills, records = 0, 0, []
    total = time.perf_counter()
    seen = set()
    for cap in archs:
        try:
            launches = collect_launches(cap, args.only)
        except Exception:  # an import or launcher failure is a failure of the check, reported
            traceback.print_exc()
            return 1
        for launch in launches:
            if args.maxnreg:
                launch = launch._replace(kwargs={**launch.kwargs, "maxnreg": args.maxnreg})
            if not isinstance(launch.jit_fn, triton.runtime.jit.JITFunction):
                print(f"FAIL {launch.name}: {type(launch.jit_fn).__name__} is not a triton JITFunction",
                      file=sys.stderr)
                failures += 1
                continue
            if (launch.name, cap) in seen:
                continue
            seen.add((launch.name, cap))
            t0 = time.perf_counter()
            try:
                src, target, options = specialise(launch, cap)
                compiled = triton.compile(src, target=target, options=options.__dict__)
                usage = resource_usage(compiled, cap)
            except Exception:
                failures += 1
                print(f"FAIL {launch.name} sm_{cap}", file=sys.stderr)
                traceback.print_exc()
                continue
            spilled = usage["spill_stores"] + usage["spill_loads"] > 0
            if launch.no_spill and spilled:
                spills += 1
                print(f"SPILL {launch.name} sm_{cap}: {usage} (must not spill)", file=sys.stderr)
            records.append({"name": launch.name, "module": launch.module, "arch": cap, **usage,
                            "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
                            "no_spill": launch.no_spill, "args": describe(src)})
            print(f"OK {launch.name} sm_{cap} regs={usage['regs']} spill_stores={usage['spill_stores']} "
                  f"spill_loads={usage['spill_loads']} stack={usage['stack']} "
                  f"ptx_bytes={len(compiled.asm['ptx'])} ({time.perf_counter() - t0:.2f}s) [{launch.module}]",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(f"kernels.aot: {len(records)} compiled, {failures} failed, {spills} spilled where they must not, "
          f"{time.perf_counter() - total:.1f}s")
    return 1 if failures or spills else 0


if __name__ == "__main__":
    sys.exit(main())
