#!/usr/bin/env bash
# Demo ablation: in-batch negatives only (batch.negatives=0), same 20 steps, same data; scored like the demo.
set -euo pipefail
cd "$(dirname "$0")/../../../.."; . .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
R=runs/abl_noneg; rm -rf $R; mkdir -p $R
t0=$SECONDS
embforge train --config configs/cpu-demo.yaml --set 'data.train=[runs/demo/train.mined.jsonl]' --set batch.negatives=0 --set output_dir=$R/train > $R/train_result.json
echo "train $((SECONDS-t0))"
python -m embforge.engine.demo_report eval --model $R/train/final --out $R/eval_trained.json
cp runs/demo/eval_base.json runs/demo/eval_minilm.json $R/
echo "total $((SECONDS-t0))"
