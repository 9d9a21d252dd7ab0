#!/usr/bin/env bash
# The two token-distribution-shift studies (README, "cut tds"), on the first N held-out prompts
# (greedy answers, at most 128 tokens). Outputs in saved_models/tds_studies/<run>/tds.{json,png,html}
# and saved_models/tds_studies/summary.md.
#   smollm2_cut       SmolLM2-135M-Instruct -> the default online run's CUT model after its last round
#                     (python -m cut.compare --config configs/online_instructions.yaml, or
#                     bash scripts/online_loop.sh; AFTER=... to point elsewhere)
#   gemma_cut         Gemma 3 270M base -> the same base after one CUT round on its own judged answers
#                     (configs/online_instructions_gemma.yaml; needs CUT_GEMMA=1 bash scripts/setup.sh)
#   gemma_cut_urial   the same answers, the base scored in the URIAL context (does it close the gap?)
#   gemma_urial       the base's own URIAL answers (cut urial): the base in the URIAL context vs plain
# Set STUDIES="smollm2" or "gemma" to run one of them.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${N:-64}
STUDIES=${STUDIES:-"smollm2 gemma"}
OUT=saved_models/tds_studies
PY=.venv/bin/python
SMOL=saved_models/SmolLM2-135M-Instruct
AFTER=${AFTER:-saved_models/online_instructions/cut/round_3/model}
GEMMA=saved_models/gemma-3-270m
DATA=data/instructions_heldout.json
export TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
tds() { "$PY" -m cut.analysis.tds --limit "$N" --max_new_tokens 128 --batch_size 16 --cutoff_len 1024 "$@"; }
timed() { local name=$1; shift; local t0=$SECONDS; "$@"; echo "$name $((SECONDS - t0))" >> "$OUT/seconds.txt"; }
answers() {  # tds.json's records -> an answer file another tds run scores as given
  "$PY" -c 'import json, sys
rows = json.load(open(sys.argv[1]))["records"]
json.dump([{k: r[k] for k in ("instruction", "input", "output")} for r in rows], open(sys.argv[2], "w"), indent=1)' "$1" "$2"
}

if [[ " $STUDIES " == *" smollm2 "* ]]; then
  [ -d "$AFTER" ] || { echo "tds_studies: $AFTER is missing: run the default online run first" >&2; exit 2; }
  timed smollm2_cut tds --base_model "$SMOL" --aligned_model "$AFTER" --data_path "$DATA" \
    --prompt_template_name chat --output_dir "$OUT/smollm2_cut"
fi

if [[ " $STUDIES " == *" gemma "* ]]; then
  [ -d "$GEMMA" ] || timed gemma_convert "$PY" -m cut.gemma --dest "$GEMMA"
  timed gemma_online "$PY" -m cut.online --config configs/online_instructions_gemma.yaml
  GCUT=saved_models/online_gemma/round_1/model
  timed gemma_cut tds --base_model "$GEMMA" --aligned_model "$GCUT" --data_path "$DATA" \
    --prompt_template_name alpaca --output_dir "$OUT/gemma_cut"
  answers "$OUT/gemma_cut/tds.json" "$OUT/gemma_cut_answers.json"
  timed gemma_cut_urial tds --base_model "$GEMMA" --aligned_model "$GCUT" --data_path "$OUT/gemma_cut_answers.json" \
    --prompt_template_name alpaca --base_prompt urial --output_dir "$OUT/gemma_cut_urial"
  timed gemma_urial_answers "$PY" -m cut.urial --model "$GEMMA" --data_path "$DATA" --limit "$N" \
    --output_file "$OUT/gemma_urial_answers.json" --batch_size 16 --max_new_tokens 128
  timed gemma_urial tds --base_model "$GEMMA" --aligned_model "$GEMMA" --data_path "$OUT/gemma_urial_answers.json" \
    --prompt_template_name urial --base_prompt plain --output_dir "$OUT/gemma_urial"
fi

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
secs = dict(l.split() for l in (out / "seconds.txt").read_text().splitlines()) if (out / "seconds.txt").exists() else {}
rows = ["| run | base context | aligned | answers | tokens | unshifted | marginal | shifted | mean KL | most shifted tokens | s |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
for name in ("smollm2_cut", "gemma_cut", "gemma_cut_urial", "gemma_urial"):
    p = out / name / "tds.json"
    if not p.exists():
        continue
    r = json.loads(p.read_text()); s = r["summary"]; f = s["fractions"]
    top = ", ".join(repr(t["token"]) for t in s["top_shifted"][:6])
    rows.append(f"| {name} | {r['base_prompt'].split(':')[0]} | {r['aligned_model_name']} ({r['prompt_template'].split(':')[0]}) | "
                f"{r['counts']['scored']} | {s['tokens']} | {f['unshifted']:.1%} | {f['marginal']:.1%} | {f['shifted']:.1%} | "
                f"{s['mean_kl']:.3f} | {top} | {secs.get(name, '—')} |")
text = "\n".join(rows) + "\n"
(out / "summary.md").write_text(text)
print(text)
EOF
