#!/usr/bin/env bash
# The first thing a lent GPU runs: build dmlfast against that machine's torch, run the CUDA tests,
# then time the fused losses against the GEMM floor (benchmarks/gpu_matrix.py). One command, about
# 6 minutes on a fresh H100/H200 (torch 2.11, Python 3.12, no DALI, no faiss, no internet).
#
#   bash benchmarks/gpu_check.sh
#
# Output folder: $DMLFAST_GPU_CHECK_OUT, else the device tool's $OUT, else benchmarks/out/. It gets
# gpu_check.log (everything printed), gpu_check.json (the timing matrix, rewritten after each case)
# and build_info.txt; a folder that holds an earlier run's log is refused unless DMLFAST_OVERWRITE=1.
# Commit both files of a real run under benchmarks/results/<date>-<device>/.
# Each stage has its own time limit, so a failing or slow stage does not hide the others.
set -uo pipefail
LOG_NAME=gpu_check.log
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

nvidia-smi -L
stage build 150 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
"$py" -c "import dmlfast, torch; print(dmlfast.build_info(), torch.__version__, torch.cuda.get_device_name())" \
    | tee "$out/build_info.txt"
if command -v readelf > /dev/null && ! readelf -d dmlfast/_C*.so | grep -q 'libstdc++'; then
    echo "WARNING: dmlfast/_C links libstdc++ statically: its error messages will be garbled or crash"
fi
stage tests 120 "$py" -m pytest -q -p no:cacheprovider -n 8 -rfEs tests/test_cuda.py tests/test_gpu_plan.py tests/test_fallback.py
stage matrix 240 "$py" benchmarks/gpu_matrix.py --out "$out" "${overwrite[@]}"
