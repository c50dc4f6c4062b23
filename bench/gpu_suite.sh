#!/usr/bin/env bash
# The whole GPU suite in one call (< 10 min on one H100): install carried wheels, run the CUDA tests, the kernel
# microbenchmarks and the end-to-end step benchmark, and leave CSV/PNG/log under $OUT (default bench/results).
#   bash bench/gpu_suite.sh [parts...]     parts: tests infonce pooling e2e e2e_big e2e_profile bench (default:
#                                          tests infonce pooling e2e; e2e, e2e_big, bench each fit one 10-minute call)
# Carried wheels (bitsandbytes, liger-kernel) are read from .whl/ when present: the device has no registry.
# Fetch them here first, at the versions requirements/lock-gpu.txt pins: bash scripts/gpu_wheels.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
parts=${*:-tests infonce pooling e2e}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
for part in $parts; do
  echo "=== $part $(date -u +%H:%M:%S)"
  case $part in
    tests)   python3 -m pytest -q -p no:cacheprovider -m gpu tests/ 2>&1 | tail -15 ;;
    infonce) python3 bench/bench_infonce.py --device cuda --out-dir "$OUT" ;;
    pooling) [ -f bench/bench_pooling.py ] && python3 bench/bench_pooling.py --device cuda --out "$OUT/pooling_cuda.csv" ;;
    # e2e: GradCache step on Mistral-7B shape (nf4 + LoRA), the sentence-transformers peer and the levers, budgeted
    # to fit one 10-minute call (rows are written as they come: a cut-off run keeps what it measured).
    e2e)     python3 bench/bench_e2e.py --device cuda --out-dir "$OUT" --budget-s "${E2E_BUDGET_S:-480}" ;;
    # e2e_profile: the headline step once more under torch.profiler (where the time goes), ~3 minutes
    e2e_profile) python3 bench/bench_e2e.py --device cuda --levers baseline --profile --out-dir "$OUT/profile" ;;
    # e2e_big: 2048 queries + 2048 positives + 2048 hard negatives per step (the 80 GB target): its own call.
    e2e_big) python3 bench/bench_e2e.py --device cuda --part e2e_big --out-dir "$OUT" ;;
    # bench: the whole `embforge bench` suite (kernels and pooling at their short sweep, e2e on the rest of
    # 8 minutes) writing the summary that becomes bench/baselines/<device>.json when committed.
    bench)   python3 -m embforge bench --device cuda --out-dir "$OUT" --update-baseline --baseline "$OUT/" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)"
