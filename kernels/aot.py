"""Ahead-of-time compile check of every Triton kernel, for GPUs this machine does not have.

Each kernel module defines ``aot_specs()`` -> list of ``(name, jit_fn, signature, constexprs)``
(one entry per dtype). This compiles each distinct spec once per target architecture with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` and prints one line per
kernel/dtype/arch with the PTX size; the exit status is non-zero if anything failed.

Run without TRITON_INTERPRET (under the interpreter ``@triton.jit`` yields an
InterpretedFunction, which cannot be compiled):

    env -u TRITON_INTERPRET python -m kernels.aot
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
import traceback

MODULES = ("kernels.scores", "kernels.topk", "kernels.gather_rows", "kernels.fused", "kernels.attention")
# kernels.attention is optional (written separately); it is included when it exists and has aot_specs().
OPTIONAL = {"kernels.attention"}
ARCHS = (80, 90)


def collect_specs():
    """[(module, name, jit_fn, signature, constexprs)] over every module that provides specs."""
    specs = []
    for modname in MODULES:
        if modname in OPTIONAL and importlib.util.find_spec(modname) is None:
            continue
        mod = importlib.import_module(modname)
        fn = getattr(mod, "aot_specs", None)
        if fn is None:
            if modname in OPTIONAL:
                continue
            raise RuntimeError(f"{modname} has no aot_specs()")
        for name, jit_fn, signature, constexprs in fn():
            specs.append((modname, name, jit_fn, signature, constexprs))
    return specs


def compile_one(jit_fn, signature, constexprs, cap: int):
    import triton
    from triton.backends.compiler import GPUTarget

    src = triton.compiler.ASTSource(fn=jit_fn, signature=signature, constexprs=constexprs)
    return triton.compile(src, target=GPUTarget("cuda", cap, 32))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    args = parser.parse_args(argv)
    archs = tuple(args.arch) if args.arch else ARCHS

    from kernels._launch import interpreting

    if interpreting():
        print("kernels.aot: TRITON_INTERPRET is set; unset it to compile (jit functions are "
              "interpreted under it)", file=sys.stderr)
        return 2
    import triton

    failures = 0
    total = time.perf_counter()
    try:
        specs = collect_specs()
    except Exception:  # an import failure is a failure of the check, reported, not a crash
        traceback.print_exc()
        return 1
    seen = set()
    for modname, name, jit_fn, signature, constexprs in specs:
        if not isinstance(jit_fn, triton.runtime.jit.JITFunction):
            print(f"FAIL {name}: {type(jit_fn).__name__} is not a triton JITFunction", file=sys.stderr)
            failures += 1
            continue
        for cap in archs:
            key = (jit_fn.fn.__qualname__, jit_fn.fn.__module__, tuple(sorted(signature.items())),
                   tuple(sorted(constexprs.items())), cap)
            if key in seen:  # compile each distinct kernel/dtype/arch once
                continue
            seen.add(key)
            t0 = time.perf_counter()
            try:
                compiled = compile_one(jit_fn, signature, constexprs, cap)
                ptx = compiled.asm["ptx"]
            except Exception:
                failures += 1
                print(f"FAIL {name} sm_{cap}", file=sys.stderr)
                traceback.print_exc()
                continue
            print(f"OK {name} sm_{cap} ptx_bytes={len(ptx)} ({time.perf_counter() - t0:.2f}s) [{modname}]",
                  flush=True)
    print(f"kernels.aot: {len(seen) - failures} compiled, {failures} failed, "
          f"{time.perf_counter() - total:.1f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
