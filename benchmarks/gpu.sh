#!/usr/bin/env bash
# One call on a lent GPU machine: GPU tests + every GPU benchmark, offline, then a results table.
#   bash benchmarks/gpu.sh            (from the repo root; installs nothing from the network)
# Uses the machine's own python (torch/triton/transformers preinstalled there). The package is
# put on the path with PYTHONPATH instead of `pip install`, so nothing is fetched.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET

device=$($PY -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "none")')
if [ "$device" = none ]; then echo "gpu.sh: no CUDA device visible" >&2; exit 2; fi
if ! $PY -c 'import pytest, pytest_benchmark' 2>/dev/null; then
    echo "gpu.sh: pytest and pytest-benchmark must be importable by $PY (nothing is installed from the network here)" >&2
    exit 2
fi
versions=$($PY -c 'import torch, triton, transformers; print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}")')
echo "device: $device ($versions)"

# 1. Kernel and model tests on the GPU (compiled kernels, not the interpreter).
POWERBERT_TEST_GPU=1 $PY -m pytest -q -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log"
tests_rc=${PIPESTATUS[0]}

# 2. Every benchmark, GPU cases included, stored as JSON.
$PY -m pytest -q -p no:cacheprovider benchmarks --benchmark-only -s \
    --benchmark-json="$OUT/gpu_benchmarks.json" 2>&1 | tee "$OUT/gpu_benchmarks.log"
bench_rc=${PIPESTATUS[0]}

# 3. The table committed beside the numbers.
$PY benchmarks/table.py "$OUT/gpu_benchmarks.json" --device "$device" --versions "$versions" \
    > "$OUT/gpu_results.md"
cat "$OUT/gpu_results.md"
echo "tests rc=$tests_rc, benchmarks rc=$bench_rc"
exit $(( tests_rc || bench_rc ))
