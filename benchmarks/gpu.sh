#!/usr/bin/env bash
# GPU tests and benchmarks in steps that each stand alone and end well within 10 minutes:
#
#   bash benchmarks/gpu.sh quick      # ONE command, at most 6 minutes on an H100/H200 (time-out 330 s):
#                                     #  the tests that need CUDA (packed path, its kernels, CUDA graphs;
#                                     #  120 s at most), then the end-to-end table in fp16, B 1/8/64/256 x
#                                     #  N 128/512, each row against the strongest stock, FLOPs ideal beside;
#                                     #  4 files, every case saved as it finishes
#   bash benchmarks/gpu.sh tests      # the suite with POWERBERT_TEST_GPU=1 (compiled kernels)
#   bash benchmarks/gpu.sh kernels    # extract op; attention vs SDPA (FlashAttention-2, mask), varlen, nested
#   bash benchmarks/gpu.sh model      # BERT end to end vs stock SDPA and stock without padding; families
#   bash benchmarks/gpu.sh table      # gpu_results.md from whatever the steps above left
#   bash benchmarks/gpu.sh all        # every step in a row (about 30 minutes on a GPU: not one lent command)
#   bash benchmarks/gpu.sh --dry-run  # every step's plumbing on CPU, tiny shapes, "DRY RUN" table (CI)
#
# Results go to $OUT when set, else benchmarks/results/ (dry run: work/gpu-dry-run/), at most 8
# files. Options: --step-timeout S (default 480, quick 330), and pytest arguments after `--`. Details:
# benchmarks/gpu.py. On a GPU machine the machine's own python runs it ($PYTHON, else python3:
# torch, triton, transformers, pytest, pytest-benchmark preinstalled); nothing is installed and
# the package is put on the path with PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    PY=python3
    for arg in "$@"; do
        [ "$arg" = "--" ] && break
        if [ "$arg" = "--dry-run" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
    done
fi
# The driver imports powerbert (no torch) before any step: the checkout on the path, as the steps get it.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" benchmarks/gpu.py "$@"
