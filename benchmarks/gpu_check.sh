#!/usr/bin/env bash
# One-shot GPU check for the lent H100/H200 (docs: docs/models.md, Performance). Needs the project's wheels in .whl/
# (mamba-ssm, causal-conv1d, jsonargparse, albumentations built for the GPU machine's torch 2.11 / Python 3.12).
#   device run:  bash benchmarks/gpu_check.sh   with carry [".whl"]
# One process per table; each stage has its own time limit and a failing stage does not stop the next; logs go to
# $OUT when it is set. The default stages fit in about 7 minutes on an H200 (the lease is 15 minutes with start-up).
# STAGES picks stages (default: gpu_tests ops agreement models compiled fit score; profile runs when named).
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

DEFAULT_STAGES="gpu_tests ops agreement models compiled fit score"
wanted() { [[ " ${STAGES:-$DEFAULT_STAGES} " == *" $1 "* ]]; }  # STAGES="ops models" ...

wanted gpu_tests && stage gpu_tests "${GPU_TESTS_S:-90}" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
# the op table: SS2D's scan at QMamba-T's four stage shapes, batch 32, bf16; Triton tiles besides the default
wanted ops && stage ops "${OPS_S:-75}" python3 benchmarks/ordered_scan.py --tiles ${TILES:-128x32x4 32x32x4 64x64x4}
wanted agreement && stage agreement "${AGREEMENT_S:-60}" python3 benchmarks/gpu_check.py agreement
wanted models && stage models "${MODELS_S:-120}" python3 benchmarks/gpu_check.py models --batches 64 128
wanted compiled && stage compiled "${COMPILED_S:-150}" python3 benchmarks/gpu_check.py models --compiled \
    --batches ${COMPILED_BATCHES:-64} --backends ${COMPILED_BACKENDS:-triton}
wanted fit && stage fit "${FIT_S:-60}" python3 benchmarks/gpu_check.py fit --fit-steps 50
wanted score && stage score "${SCORE_S:-60}" python3 benchmarks/score.py --tiny --device cuda --images 200 \
    --tiny-images 200 --workers 0 8 --batch-size 32 --precision fp32 bf16 --workdir "$(mktemp -d)"
wanted profile && stage profile "${PROFILE_S:-120}" python3 benchmarks/profile_step.py --device cuda
true
