# Sourced by benchmarks/gpu_check.sh and benchmarks/gpu_train_check.sh after they set LOG_NAME: the
# output folder ($DMLFAST_GPU_CHECK_OUT, else the device tool's $OUT, else benchmarks/out/) with
# everything printed copied to $out/$LOG_NAME (an earlier run's is kept unless DMLFAST_OVERWRITE=1;
# $overwrite passes that on to the Python scripts), the environment of a GPU build, and stage().
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${DMLFAST_GPU_CHECK_OUT:-${OUT:-benchmarks/out}}"
py="${PYTHON:-python3}"
mkdir -p "$out"
if [ -e "$out/$LOG_NAME" ] && [ -z "${DMLFAST_OVERWRITE:-}" ]; then  # an earlier run's results: replaced only when asked
    echo "$LOG_NAME: $out holds an earlier run's results; move them, set DMLFAST_GPU_CHECK_OUT, or set DMLFAST_OVERWRITE=1" >&2
    exit 2
fi
overwrite=(${DMLFAST_OVERWRITE:+--overwrite})
exec > >(tee "$out/$LOG_NAME") 2>&1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" DMLFAST_CUDA=1 MAX_JOBS="${MAX_JOBS:-16}" \
    TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

stage() {  # stage NAME SECONDS COMMAND...: run with a time limit and report how it ended
    local name=$1 limit=$2 started=$SECONDS
    shift 2
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@"
    local rc=$?
    echo "=== $name: exit $rc after $((SECONDS - started))s"
    return $rc
}
