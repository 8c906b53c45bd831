#!/usr/bin/env bash
# Build, test and time dmlfast on a GPU machine that has torch, nvcc and ninja but no internet.
#
#   bash benchmarks/run_gpu.sh [STAGE ...]      STAGE: build test quicktest losses compiled profile eval train
#                                               (default: all but quicktest and profile)
#
# Each stage writes its log to $OUT (or benchmarks/out/) and is bounded by its own timeout, so one
# failing or slow stage does not hide the others. Seen on an H100 (2026-11-24): build 45-60 s,
# test 3-4 min (pytest -n 8), eval 15 s, train 30 s, losses over 220 s (1M classes not reached),
# compiled 65 s (SOP). A 10-minute call fits "build test eval train" or "build quicktest losses".
# pytorch-metric-learning is timed when importable (carry its wheel; see RESULTS.md).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-benchmarks/out}"
py="${PYTHON:-python3}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DMLFAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test losses compiled eval train)

stage() {  # stage NAME SECONDS COMMAND...: run with a timeout, log to $out/NAME.log, report the status
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    return $rc
}

for name in "${stages[@]}"; do
    case $name in
    build)
        stage build 240 "$py" setup.py build_ext --inplace || { tail -40 "$out/build.log"; exit 1; }
        "$py" -c "import dmlfast, torch; print(dmlfast.build_info(), torch.__version__, torch.cuda.get_device_name())" \
            | tee "$out/build_info.txt"
        if command -v readelf > /dev/null && ! readelf -d dmlfast/_C*.so | grep -q 'libstdc++'; then
            echo "WARNING: dmlfast/_C links libstdc++ statically: its error messages will be garbled or crash" >&2
        fi
        cp dmlfast/_C*.so "$out/" ;;
    test)
        stage test 270 "$py" -m pytest -q -p no:cacheprovider -n 8 --durations=15 -rfEs tests
        tail -25 "$out/test.log" ;;
    quicktest)
        stage quicktest 120 "$py" -m pytest -q -p no:cacheprovider -n 8 -rfEs tests/test_cuda.py tests/test_bad_input.py \
            tests/test_evaluation.py tests/test_isa.py
        tail -8 "$out/quicktest.log" ;;
    losses)
        comparators="gemm3 dmlfast eager"
        "$py" -c "import pytorch_metric_learning" 2>/dev/null && comparators="$comparators pml"
        stage losses 400 "$py" benchmarks/bench_losses.py --device cuda --cases CUB SOP 100k 1M --implementations $comparators \
            --repeats 50 --warmup 10 --json "$out/losses_gpu.json"
        grep '^|' "$out/losses.log" ;;
    compiled)
        stage compiled 120 "$py" benchmarks/bench_losses.py --device cuda --cases SOP --losses proxy_anchor proxy_nca \
            --implementations gemm3 compiled --repeats 50 --warmup 10 --json "$out/losses_gpu_compiled.json"
        grep '^|' "$out/compiled.log" ;;
    profile)
        for classes in 100 11318; do
            stage "profile_$classes" 120 "$py" benchmarks/profile_gpu.py --loss proxy_anchor --classes "$classes"
        done
        stage profile_nca 120 "$py" benchmarks/profile_gpu.py --loss proxy_nca --classes 11318
        grep -h -A3 "^## " "$out"/profile_*.log ;;
    eval)
        stage eval 150 "$py" benchmarks/bench_eval.py --backends cuda:torch
        tail -14 "$out/eval.log" ;;
    train)
        stage train 150 "$py" benchmarks/bench_train.py --device cuda --amp bf16 --loaders torch --workers 8 \
            --batch-size 180 --images 2160 --steps 10 --json "$out/train_gpu.json"
        tail -6 "$out/train.log" ;;
    *)
        echo "unknown stage: $name (expected build test quicktest losses compiled profile eval train)" >&2
        exit 2 ;;
    esac
done
