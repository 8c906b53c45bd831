#!/usr/bin/env bash
# One command for a GPU machine with torch, nvcc and ninja but no internet: build the extension
# with its CUDA kernels, run the CUDA tests (and the CPU reference tests beside them), time the
# fused losses, and write the table to stdout and to $OUT (or benchmarks/out/). Under 10 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-benchmarks/out}"
mkdir -p "$out"
export DMLFAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}"

python setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -50 "$out/build.log"; exit 1; }
python -c "import dmlfast, torch; print(dmlfast.build_info(), torch.cuda.get_device_name())" | tee "$out/build_info.txt"

python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_losses.py tests/test_ops.py 2>&1 | tee "$out/tests.log"

# Every case against the eager reference (and pytorch-metric-learning when the image has it);
# torch.compile only at three sizes, since each compile takes tens of seconds.
comparators="gemm3 dmlfast eager"
python -c "import pytorch_metric_learning" 2>/dev/null && comparators="$comparators pml"
timeout 300 python benchmarks/bench_losses.py --device cuda --implementations $comparators --repeats 20 --warmup 5 \
  --json "$out/losses_gpu.json" | tee "$out/losses_gpu.md"
timeout 180 python benchmarks/bench_losses.py --device cuda --cases CUB SOP 1M --implementations gemm3 dmlfast compiled \
  --repeats 20 --warmup 5 --json "$out/losses_gpu_compiled.json" | tee "$out/losses_gpu_compiled.md"
