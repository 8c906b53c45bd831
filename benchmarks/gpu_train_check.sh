#!/usr/bin/env bash
# Training throughput on a lent GPU (issue 15): images/s of ResNet-50 and ViT-S/16 at 224 px, bf16,
# batch 180, with each loader (DALI when installed, torchvision's nvJPEG decode, CPU workers) and with
# and without --compile, and the shares of data, backbone and loss in a step (benchmarks/bench_train.py).
# Random weights and synthetic JPEGs it writes itself: no internet, no dataset. Needs timm (ViT-S/16).
#
#   bash benchmarks/gpu_train_check.sh
#
# About 4 minutes on an H100/H200 when dmlfast/_C is already built for this torch (after
# benchmarks/gpu_check.sh); otherwise the build stage adds up to 150 s. Goal: >= 4,000 images/s for
# ResNet-50 (224 px, bf16, batch 180) with the loss under 5 % of the step.
#
# Output folder: $DMLFAST_GPU_CHECK_OUT, else the device tool's $OUT, else benchmarks/out/. It gets
# gpu_train_check.log (everything printed) and bench_train_eager.json / bench_train_compiled.json,
# rewritten after every case. Commit them under benchmarks/results/<date>-<device>/.
set -uo pipefail
LOG_NAME=gpu_train_check.log
source "$(dirname "${BASH_SOURCE[0]}")/gpu_common.sh"

nvidia-smi -L
if ! "$py" -c "import dmlfast" 2> /dev/null; then
    stage build 150 "$py" setup.py build_ext --inplace > "$out/build.log" 2>&1 || { tail -40 "$out/build.log"; exit 1; }
fi
"$py" -c "import dmlfast, torch, timm; print(dmlfast.build_info(), torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
common=(--models resnet50 timm:vit_small_patch16_224 --size 224 --batch-size 180 --amp bf16 --steps 20 --profile-steps 8
        --images 720 --workers 12)
# Every loader without compilation, then compiled with the GPU loaders only (each compilation costs ~1 minute).
stage eager 80 "$py" benchmarks/bench_train.py "${common[@]}" --loaders dali nvjpeg torch --compile off \
    --json "$out/bench_train_eager.json" "${overwrite[@]}"
stage compiled 150 "$py" benchmarks/bench_train.py "${common[@]}" --loaders dali nvjpeg --compile on \
    --json "$out/bench_train_compiled.json" "${overwrite[@]}"
