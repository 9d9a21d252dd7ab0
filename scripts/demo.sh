#!/usr/bin/env bash
# The default run, from nothing: set up, convert the embedded SmolLM2-135M-Instruct, CUT-train it
# with LoRA on data/demo_judgments.json twice (ratio flags, span flags), merge each, and report how
# every flagged token moved. Extra flags go to both cut.train runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m cut.demo "$@"
