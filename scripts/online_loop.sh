#!/usr/bin/env bash
# The online loop: generate -> judge -> train -> merge, round after round (resumable: rerun
# the same command after a crash). Default: SmolLM2-135M-Instruct on verifiable instructions, the
# rule-based verifier judge, span DPO (the held-out winner,
# docs/judgment.md), 3 rounds; configs/online_arithmetic.yaml is the arithmetic run.
#   bash scripts/online_loop.sh [configs/online_instructions.yaml] [--rounds 3] [--output_dir DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
config=${1:-configs/online_instructions.yaml}
shift || true
exec .venv/bin/python -m cut.online --config "$config" "$@"
