#!/usr/bin/env bash
# The GPU check: one command, on one H100 in at most 9 minutes.
#   1. the GPU test tier (pytest -m gpu: tests/test_gpu.py, tests/test_real_architectures.py);
#   2. benchmarks/gpu_check.py: Flow-GRPO rollout and LoRA training on the SD3.5-Medium and FLUX.1-dev
#      architectures (random weights, 512 px, 8 images x 10 steps) against the diffusers pipeline's own __call__;
#      it writes gpu_check.json and gpu_check.md to $OUT (or benchmarks/results/gpu_check).
#
# The GPU machine's image has torch, transformers, peft, accelerate, safetensors and huggingface_hub, but not
# diffusers or tyro. Fetch their wheels here once (x86-64, Python 3.12), into .whl/, which git ignores:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 tyro docstring-parser typeguard
# and carry .whl with the command (the device tool's carry: [".whl"]); this script installs them into /tmp/site.
#
# CPU smoke (the default test tier runs it): GPU_CHECK_SIZE=tiny GPU_CHECK_DEVICE=cpu bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
SIZE=${GPU_CHECK_SIZE:-real}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
DEST=${OUT:-benchmarks/results/gpu_check}
PY=${PYTHON:-python3}
if [ "$DEVICE" != "cpu" ] && compgen -G ".whl/*.whl" > /dev/null; then  # the GPU machine's missing packages
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
    export PYTHONPATH=$site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$DEST"
status=0
if [ "$DEVICE" != "cpu" ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    timeout 240 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_real_architectures.py \
        2>&1 | tee "$DEST/gpu_tests.log"
    status=${PIPESTATUS[0]}
fi
extra=()
[ "$DEVICE" != "cpu" ] && extra=(--peak-tflops 783.4)
[ "$SIZE" = "tiny" ] && extra+=(--batch 2 --steps 3 --warmup 0 --repeats 1)
timeout 300 "$PY" benchmarks/gpu_check.py --size "$SIZE" --device "$DEVICE" --out "$DEST" "${extra[@]}" || status=1
exit $status
