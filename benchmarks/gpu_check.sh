#!/usr/bin/env bash
# One-shot GPU check for the lent H100/H200 (docs: README "GPU checks"). Needs the project's wheels in .whl/
# (mamba-ssm, causal-conv1d, jsonargparse, albumentations built for the GPU machine's torch 2.11 / Python 3.12).
#   device run:  bash benchmarks/gpu_check.sh   with carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
S=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S" .whl/*.whl
export PYTHONPATH="$S:$PWD/src" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -m pytest -q tests/test_gpu.py
python3 benchmarks/gpu_check.py "$@"
python3 benchmarks/scan.py --device cuda --batches 32 --reference-batches --dtype bfloat16 --repeats 5
