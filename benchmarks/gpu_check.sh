#!/usr/bin/env bash
# One-shot GPU check for the lent H100/H200 (docs: README "GPU checks"). Needs the project's wheels in .whl/
# (mamba-ssm, causal-conv1d, jsonargparse, albumentations built for the GPU machine's torch 2.11 / Python 3.12).
#   device run:  bash benchmarks/gpu_check.sh   with carry [".whl"]
# Each stage has its own time limit and a failing stage does not stop the next; logs go to $OUT when it is set.
# STAGES picks stages (default: all): gpu_tests gpu_check scan profile score.
set -uo pipefail
cd "$(dirname "$0")/.."
S=$(mktemp -d)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$S" .whl/*.whl || exit 1
export PYTHONPATH="$S:$PWD/src" NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
LOGS=${OUT:-$(mktemp -d)}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

stage() {  # stage NAME SECONDS COMMAND...: run with a limit, log to $LOGS/NAME.log, report the exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "=== $name (limit ${limit}s)"
    timeout "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

wanted() { [[ " ${STAGES:-gpu_tests gpu_check scan profile score} " == *" $1 "* ]]; }  # STAGES="scan score" ...

wanted gpu_tests && stage gpu_tests "${GPU_TESTS_S:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
wanted gpu_check && stage gpu_check "${GPU_CHECK_S:-220}" python3 benchmarks/gpu_check.py "$@"
wanted scan && stage scan "${SCAN_S:-60}" python3 benchmarks/scan.py --device cuda --batches 32 --reference-batches \
    --dtype bfloat16 --repeats 5
wanted profile && stage profile "${PROFILE_S:-120}" python3 benchmarks/gpu_profile.py
wanted score && stage score "${SCORE_S:-200}" python3 benchmarks/score.py --tiny --device cuda --images 400 \
    --tiny-images 400 --workers 0 4 8 --batch-size 32 --workdir "$(mktemp -d)"
true
