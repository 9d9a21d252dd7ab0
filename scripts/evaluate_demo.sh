#!/usr/bin/env bash
# The demo's model before vs after CUT, judged per aspect and pairwise by a local model, and a ReAlign
# example: cut evaluate / cut realign end to end, offline. The judge and the rewriter are the embedded
# SmolLM2-135M-Instruct: a 135M judge's scores are worth little (README, "cut evaluate"); this shows
# the pipeline and its reports, not a verdict. Needs the demo's merged model (bash scripts/demo.sh).
# N=24 prompts by default; outputs in saved_models/evaluate_demo/ (judge runs under $VERDICT/). VERDICT=probabilities
# (default) reads each aspect's verdict from the judge's next-token probabilities; VERDICT=generate
# decodes its JSON reply (which a 135M judge rarely writes).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-24}
VERDICT=${VERDICT:-probabilities}
OUT=saved_models/evaluate_demo
RUNS=$OUT/$VERDICT
BASE=saved_models/SmolLM2-135M-Instruct
AFTER=saved_models/demo/ratio/merged
PY=.venv/bin/python
[ -d "$AFTER" ] || { echo "evaluate_demo: $AFTER is missing: run bash scripts/demo.sh first" >&2; exit 2; }
mkdir -p "$OUT"
gen() { "$PY" -m cut.generate --model "$1" --data_path data/instructions_heldout.json --limit "$N" \
  --output_file "$2" --prompt_template_name chat --batch_size "$N" --max_new_tokens 128 --generator "$3"; }
gen "$BASE" "$OUT/before.json" before
gen "$AFTER" "$OUT/after.json" after
judge=(--judge local --model "$BASE" --batch_size "$N" --max_new_tokens 384 --verdict "$VERDICT")
"$PY" -m cut.evaluation.evaluate --mode score --input_file "$OUT/before.json" --output_dir "$RUNS/score_before" "${judge[@]}"
"$PY" -m cut.evaluation.evaluate --mode score --input_file "$OUT/after.json" --output_dir "$RUNS/score_after" "${judge[@]}"
"$PY" -m cut.evaluation.evaluate --mode compare --runs "$RUNS/score_before" "$RUNS/score_after" \
  --labels before,after --output_dir "$RUNS/compare"
"$PY" -m cut.evaluation.evaluate --mode pairwise --output_a "$OUT/before.json" --output_b "$OUT/after.json" \
  --output_dir "$RUNS/pairwise" "${judge[@]}"
"$PY" -m cut.realign --input_file "$OUT/before.json" --output_file "$OUT/realigned.json" --rewriter local \
  --model "$BASE" --max_new_tokens 256 --batch_size "$N"
