#!/usr/bin/env bash
# The GPU checks in one call, for a lent CUDA machine (this workplace's `device` tool runs it from the repository
# root with $OUT for files to bring back). Elsewhere: `OUT=some/folder bash scripts/gpu_check.sh`.
# diffusers is not on that machine: carry its wheel (and importlib_metadata's) in .whl/.
set -uo pipefail
OUT=${OUT:-docs/results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
timeout "${TEST_TIMEOUT:-150}" python3 -m pytest -q -n 0 -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -25
for dtype in float16 bfloat16; do
  timeout "${BENCH_TIMEOUT:-420}" python3 scripts/benchmark.py gpu --dtype "$dtype" --repeats 3 \
    --budget "${COMPILE_BUDGET:-240}" --results "$OUT" 2>&1 | grep -v "Warning\|warn(" | tee "$OUT/bench-$dtype.log" \
    | grep "^\[gpu\]\|^|\|Error\|error"
done
