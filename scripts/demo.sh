#!/usr/bin/env bash
# The main job, offline on CPU: synthesize a little data with a local LLM, train SmolLM2-135M into an embedder,
# evaluate before/after on chatterbot Q/A, and run the CPU kernel benchmark. Outputs under runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p runs/demo

echo "== 1/4 synth: E5 two-step generation against a local llama.cpp server (SmolLM2-135M-Instruct)"
embforge synth generate --local --out runs/demo/synth.jsonl --tasks-per-type 1 --examples-per-task 2 --seed 0

echo "== 2/4 training data: Python stdlib documentation questions (+ whatever synth produced)"
python -c "from embforge.engine.demo_data import build; print(build('runs/demo/train.jsonl'), 'stdlib examples')"

echo "== 3/4 train: GradCache + LoRA, evaluated on chatterbot before and after"
embforge train --config configs/cpu-demo.yaml \
  --set 'data.train=[runs/demo/train.jsonl, runs/demo/synth.jsonl]' | tee runs/demo/train_result.json
python - <<'PY'
import json
r = json.load(open("runs/demo/train_result.json"))
b, a = r["eval"].get("before", {}), r["eval"].get("after", {})
print(f"\n{'metric':<14}{'before':>10}{'after':>10}")
for k in ("ndcg_at_10", "mrr_at_10", "recall_at_10", "recall_at_100", "map_at_100"):
    if k in b and k in a:
        print(f"{k:<14}{b[k]:>10.4f}{a[k]:>10.4f}")
PY

echo "== 4/4 bench: InfoNCE kernel on CPU (chunked vs eager; peak memory flat in B)"
python bench/bench_infonce.py --device cpu --quick --out-dir runs/demo/bench
