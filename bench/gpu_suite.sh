#!/usr/bin/env bash
# The GPU suite in parts that each fit one 10-minute device call with margin; full logs under $OUT (default
# bench/results/gpu). Exits non-zero when any part errors or any test fails (every pipe runs under pipefail).
#
#   bash bench/gpu_suite.sh smoke                 first, < 3 min: environment report, the installed torch's varlen
#                                                 signature, then `pytest -m gpu` (every CUDA test)
#   bash bench/gpu_suite.sh infonce pooling       kernel microbenchmarks (one call)
#   bash bench/gpu_suite.sh e2e                   GradCache step on the 7B shape, budget E2E_BUDGET_S (default 420)
#   bash bench/gpu_suite.sh e2e_big | e2e_profile | bench     each its own call
#
# docs/bench.md "Next device window" gives the order and expected durations. Carried wheels (bitsandbytes,
# liger-kernel) are read from .whl/ (bash scripts/gpu_wheels.sh); on a CUDA machine smoke fails without them
# (their tests would skip silently) unless GPU_SUITE_ALLOW_MISSING=1.
#
# Knobs (tests and CPU dry runs): GPU_SUITE_TESTS (pytest paths, default tests/), GPU_SUITE_DRY_RUN=1 (a machine
# without CUDA runs smoke anyway: every gpu test skips, which on a CUDA machine is itself a failure),
# SMOKE_TIMEOUT_S (default 240), PART_TIMEOUT_S (default 560: a part is cut before the 10-minute call limit).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
failed=()

fail() { echo "GPU-SUITE FAIL: $*" | tee -a "$OUT/summary.txt" >&2; failed+=("$1"); }

if ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >"$OUT/wheels.log" 2>&1 || fail wheels "installing .whl/ failed (see $OUT/wheels.log)"
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
if [ "${GPU_SUITE_DRY_RUN:-0}" = 1 ]; then export TRITON_INTERPRET=1; else export TRITON_INTERPRET=0; fi

# Prints the report; exits 3 when CUDA is missing (and this is no dry run) or carried packages are missing on CUDA.
env_report() {
  "$PY" - <<'EOF'
import importlib, importlib.util, inspect, os, platform, sys
dry = os.environ.get("GPU_SUITE_DRY_RUN") == "1"
print("date", __import__("datetime").datetime.now(__import__("datetime").timezone.utc).isoformat(timespec="seconds"))
print("python", platform.python_version(), sys.executable)
versions = {}
for mod in ("torch", "triton", "transformers", "peft", "tokenizers", "safetensors", "sentence_transformers",
            "bitsandbytes", "liger_kernel", "flash_attn"):
    try:
        m = importlib.import_module(mod)
        versions[mod] = getattr(m, "__version__", "?")
    except Exception as e:   # a broken optional install is reported, not fatal here
        versions[mod] = f"missing ({type(e).__name__})"
    print(f"{mod:22s} {versions[mod]}")
import torch
cuda = torch.cuda.is_available()
print("cuda", cuda, "cuda runtime", torch.version.cuda)
if cuda:
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", "sm", f"{p.major}{p.minor}", "count", torch.cuda.device_count())
print("cpu capability", torch.backends.cpu.get_cpu_capability())
if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
    from torch.nn.attention.varlen import varlen_attn
    print("varlen_attn", inspect.signature(varlen_attn))
else:
    print("varlen_attn: none in this torch (packing on CUDA needs flash-attn)")
print("nccl", torch.distributed.is_nccl_available() if torch.distributed.is_available() else False)
if not cuda and not dry:
    print("GPU-SUITE: no CUDA device (GPU_SUITE_DRY_RUN=1 runs smoke on CPU anyway)", file=sys.stderr)
    sys.exit(3)
missing = [m for m in ("bitsandbytes", "liger_kernel") if versions[m].startswith("missing")]
if cuda and missing and os.environ.get("GPU_SUITE_ALLOW_MISSING") != "1":
    print(f"GPU-SUITE: {missing} not importable: carry .whl/ (bash scripts/gpu_wheels.sh) or set "
          "GPU_SUITE_ALLOW_MISSING=1; their tests would skip", file=sys.stderr)
    sys.exit(3)
EOF
}

# pytest -m gpu with a junit report; fails on any failure/error, and on a CUDA machine when no test ran at all.
gpu_tests() {
  local junit="$OUT/smoke_junit.xml"
  # shellcheck disable=SC2086
  timeout -k 10 "${SMOKE_TIMEOUT_S:-240}" "$PY" -m pytest -q -p no:cacheprovider -m gpu -rfEs \
    --junitxml="$junit" ${GPU_SUITE_TESTS:-tests/} 2>&1 | tee "$OUT/smoke_pytest.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { fail smoke "pytest -m gpu exited $rc (see $OUT/smoke_pytest.log)"; return; }
  "$PY" - "$junit" <<'EOF' || fail smoke "no GPU test ran on a machine with CUDA (see $OUT/smoke_pytest.log)"
import sys, xml.etree.ElementTree as ET
import torch
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
ran = sum(int(s.get("tests", 0)) - int(s.get("skipped", 0)) for s in suites)
print(f"GPU-SUITE: {ran} gpu tests ran")
sys.exit(1 if ran == 0 and torch.cuda.is_available() else 0)
EOF
}

run_part() {   # run_part NAME CMD...: the command's full output in $OUT/NAME.log, its exit status checked
  local name=$1
  shift
  timeout -k 10 "${PART_TIMEOUT_S:-560}" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || fail "$name" "exited $rc (see $OUT/$name.log)"
}

parts=${*:-smoke}
for part in $parts; do
  echo "=== $part $(date -u +%H:%M:%S)" | tee -a "$OUT/summary.txt"
  case $part in
    smoke)
      env_report 2>&1 | tee "$OUT/env.txt"
      rc=${PIPESTATUS[0]}
      if [ "$rc" != 0 ]; then fail smoke "environment check exited $rc (see $OUT/env.txt)"; else gpu_tests; fi ;;
    infonce) run_part infonce "$PY" bench/bench_infonce.py --device cuda --out-dir "$OUT" ;;
    pooling) run_part pooling "$PY" bench/bench_pooling.py --device cuda --out "$OUT/pooling_cuda.csv" ;;
    # GradCache step on the Mistral-7B shape (nf4 + LoRA), the sentence-transformers peer and the levers; rows are
    # written as they come, so a cut-off run keeps what it measured.
    e2e) run_part e2e "$PY" bench/bench_e2e.py --device cuda --out-dir "$OUT" --budget-s "${E2E_BUDGET_S:-420}" ;;
    e2e_profile) run_part e2e_profile "$PY" bench/bench_e2e.py --device cuda --levers baseline --profile \
                   --out-dir "$OUT/profile" ;;
    e2e_big) run_part e2e_big "$PY" bench/bench_e2e.py --device cuda --part e2e_big --out-dir "$OUT" ;;
    bench) run_part bench "$PY" -m embforge bench --device cuda --out-dir "$OUT" --update-baseline --baseline "$OUT/" ;;
    *) fail "$part" "unknown part (smoke infonce pooling e2e e2e_profile e2e_big bench)" ;;
  esac
done
echo "=== done $(date -u +%H:%M:%S)" | tee -a "$OUT/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "GPU-SUITE FAILED: ${failed[*]}" | tee -a "$OUT/summary.txt" >&2
  exit 1
fi
echo "GPU-SUITE OK: $parts" | tee -a "$OUT/summary.txt"
