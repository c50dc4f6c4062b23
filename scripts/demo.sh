#!/usr/bin/env bash
# The main job, offline on CPU: synthesize a little data with a local LLM, train SmolLM2-135M into an embedder,
# evaluate before/after on chatterbot Q/A, export a sentence-transformers folder, and run the CPU kernel
# benchmark. Outputs under runs/demo/; the summary (stage times, loss, before/after table) in runs/demo/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf runs/demo/train runs/demo/export
mkdir -p runs/demo
: > runs/demo/stages.tsv
stage() {  # stage NAME CMD...: run, time, and record it
  local name=$1 t0=$SECONDS; shift
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> runs/demo/stages.tsv
}

echo "== 1/5 synth: E5 two-step generation against a local llama.cpp server (SmolLM2-135M-Instruct)"
stage synth embforge synth generate --local --out runs/demo/synth.jsonl --tasks-per-type 1 --examples-per-task 2 \
  --seed 0

echo "== 2/5 training data: Python stdlib documentation questions (+ whatever synth produced)"
stage data python -c "from embforge.engine.demo_data import build; print(build('runs/demo/train.jsonl'), 'stdlib examples')"

echo "== 3/5 train: GradCache + LoRA, evaluated on chatterbot before and after"
stage train_and_eval bash -c "embforge train --config configs/cpu-demo.yaml \
  --set 'data.train=[runs/demo/train.jsonl, runs/demo/synth.jsonl]' > runs/demo/train_result.json"

echo "== 4/5 export: embforge + sentence-transformers folders"
stage export embforge export --model runs/demo/train/final --out runs/demo/export --sentence-transformers \
  --instruction "Given a question, retrieve the answer that best replies to it"

echo "== 5/5 bench: InfoNCE kernel on CPU (chunked vs eager; peak memory flat in B)"
stage bench python bench/bench_infonce.py --device cpu --quick --out-dir runs/demo/bench

python -m embforge.engine.demo_report runs/demo | tee runs/demo/summary.md
