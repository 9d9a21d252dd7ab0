#!/usr/bin/env bash
# The online loop: generate -> judge -> train -> merge, round after round (resumable: rerun
# the same command after a crash). Default: SmolLM2-135M-Instruct on verifiable instructions, the
# rule-based verifier judge, span DPO (the held-out winner,
# docs/judgment.md), 3 rounds; configs/online_arithmetic.yaml is the arithmetic run.
#   bash scripts/online_loop.sh [configs/online_instructions.yaml] [--rounds 3] [--output_dir DIR]
# With the side venv scripts/setup_vllm.sh builds (.venv-vllm), the loop runs there and its engine
# `auto` samples and scores with vLLM (2.2x faster on the 320 held-out prompts here, same greedy
# answers: benchmarks/engines.md); CUT_PYTHON=.venv/bin/python keeps it on transformers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
config=${1:-configs/online_instructions.yaml}
shift || true
python=${CUT_PYTHON:-.venv/bin/python}
if [ -z "${CUT_PYTHON:-}" ] && [ -f .venv-vllm/.cut-installed ]; then
  python=.venv-vllm/bin/python
  echo "online_loop: running in .venv-vllm (vLLM); CUT_PYTHON=.venv/bin/python for the transformers engine"
fi
exec "$python" -m cut.online --config "$config" "$@"
