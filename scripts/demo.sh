#!/usr/bin/env bash
# The main job, offline on CPU: build real offline training data (Python docs, FOLDOC, Jargon File, manual pages,
# Debian package descriptions), mine hard negatives, train SmolLM2-135M into an embedder, and score the untrained
# base, the trained model and all-MiniLM-L6-v2 side by side on held-out sets (chatterbot Q/A, GCIDE word ->
# definition, GCIDE sense pairs). Export a sentence-transformers folder. Summary: runs/demo/summary.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# (setup.sh also installs the Debian dictionaries the data and held-out sets come from: docs/data.md)
CONFIG=${CONFIG:-configs/cpu-demo.yaml}
RUN=${RUN:-runs/demo}
rm -rf "$RUN/train" "$RUN/export" "$RUN"/eval_*.json
mkdir -p "$RUN"
: > "$RUN/stages.tsv"
stage() {  # stage NAME CMD...: run, time, and record it
  local name=$1 t0=$SECONDS; shift
  "$@"
  printf '%s\t%s\n' "$name" "$((SECONDS - t0))" >> "$RUN/stages.tsv"
}

echo "== 1/6 training data: real offline text, capped per source so no source dominates"
stage data embforge data build-demo --out "$RUN/train.jsonl" --cap-per-source "${CAP:-1200}"

# The demo mines with the lexical hashing encoder (17 s of CPU for 3.6k records); all-MiniLM-L6-v2 gives
# semantic negatives but costs minutes on 2 cores: MINER=minilm (configs/cpu-quality.yaml's run uses it).
MINER=${MINER:-hashing}
echo "== 2/6 mine: hard negatives (ranks 10-100, margin 0.95 x positive score) with $MINER"
stage mine embforge mine --data "$RUN/train.jsonl" --out "$RUN/train.mined.jsonl" --model "$MINER" \
  --ranks 10-100 --negatives 1 --margin 0.95 $([ "$MINER" = hashing ] || echo --max-seq-length 64)

echo "== 3/6 eval: untrained base and all-MiniLM-L6-v2 on the held-out sets"
stage eval_base embforge eval heldout --model "base:$CONFIG" --out "$RUN/eval_base.json"
stage eval_minilm embforge eval heldout --model minilm --out "$RUN/eval_minilm.json"

echo "== 4/6 train: GradCache + LoRA ($CONFIG)"
stage train bash -c "embforge train --config $CONFIG --set 'data.train=[$RUN/train.mined.jsonl]' \
  --set output_dir=$RUN/train > $RUN/train_result.json"

echo "== 5/6 eval: the trained model"
stage eval_trained embforge eval heldout --model "$RUN/train/final" --out "$RUN/eval_trained.json"

echo "== 6/6 export: embforge + sentence-transformers folders"
stage export embforge export --model "$RUN/train/final" --out "$RUN/export" --sentence-transformers \
  --instruction "Given a question, retrieve the answer that best replies to it"

embforge eval report "$RUN" | tee "$RUN/summary.md"
