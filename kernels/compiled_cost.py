"""Compiled cost of the attention kernels: registers, spills and instructions per tile.

Compiles both passes of ``kernels.attention`` as the JIT would on sm_80 and sm_90
(``kernels.aot``: the launcher's own choices on BERT-base-shaped inputs, run-time
specialisation) and prints a markdown table:

* registers and spill bytes (stores + loads) from ``ptxas -v``;
* instructions per tile: SASS instructions (``cuobjdump -sass``) in the body of the loop over
  key tiles (forward) or query tiles (pass 2), the kernel's largest innermost loop. ``a / b``:
  the path that takes the forward branches inside the body / the whole body, one number when
  they are equal. In pass 2 that is a tile off the diagonal (its ``i != j`` test branched over) /
  a tile on it.

Pass 2 is shown at the 64x64 tile (a batch that fills the GPU) and at the tile the launcher
picks for ``B`` sequences of ``N`` tokens (fewer programs: narrower key tiles).

    env -u TRITON_INTERPRET python -m kernels.compiled_cost
"""
from __future__ import annotations

import argparse
import sys

from kernels import aot

DTYPES = ("float16", "bfloat16")
HEAD_DIMS = (64, 128)


def _record(call):
    with aot.recording() as records:
        call()
    return records


def measure(name: str, d: int, cap: int) -> list[dict]:
    """Rows for one dtype, head dim and architecture: forward, pass 2 at 64x64, pass 2 as launched."""
    from kernels.attention import launch_attention

    q, k, v, mask = aot.attention_inputs(name, d)
    scale = d ** -0.5
    launched = _record(lambda: launch_attention(q, k, v, mask, scale, True, num_sms=aot.SMS[cap]))
    wide = _record(lambda: launch_attention(q, k, v, mask, scale, True, block_m=64, block_n=64, num_sms=1))
    rows = []
    for label, (fn, args, kwargs) in (("forward", launched[0]), ("pass 2, 64x64", wide[1]),
                                      ("pass 2, launched", launched[1])):
        launch = aot.Launch("kernels.attention", label, fn, args, kwargs, False)
        compiled = aot.compile_launch(launch, cap)
        usage = aot.resource_usage(compiled, cap)
        tile = f"{kwargs['BLOCK_M']}x{kwargs['BLOCK_N']}"
        body, path = max(aot.innermost_loops(aot.sass(compiled)))
        rows.append({"kernel": label, "dtype": name, "d": d, "arch": cap, "tile": tile, **usage,
                     "per_tile": f"{path} / {body}" if path != body else f"{body}",
                     "num_warps": compiled.metadata.num_warps})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| kernel | dtype | d | arch | tile | warps | registers | spill bytes (st+ld) | instructions per tile |",
             "|---|---|---:|---|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['kernel']} | {r['dtype']} | {r['d']} | sm_{r['arch']} | {r['tile']} | {r['num_warps']} "
                     f"| {r['regs']} | {r['spill_stores'] + r['spill_loads']} | "
                     f"{r['per_tile']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", action="append", choices=("float16", "bfloat16", "float32"),
                        help="repeatable; default float16 and bfloat16 (float32 is not launched on CUDA)")
    args = parser.parse_args(argv)
    from kernels.launch import interpreting

    if interpreting():
        print("kernels.compiled_cost: unset TRITON_INTERPRET to compile", file=sys.stderr)
        return 2
    rows = [r for name in (args.dtype or DTYPES) for d in HEAD_DIMS for cap in aot.ARCHS
            for r in measure(name, d, cap)]
    print(f"B={aot.B}, H={aot.H}, N={aot.N}; [B, H, N, d] views of [B, N, H*d] projections, bool mask; "
          f"SM count sm_80 {aot.SMS[80]}, sm_90 {aot.SMS[90]}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
