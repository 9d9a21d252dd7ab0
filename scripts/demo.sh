#!/usr/bin/env bash
# The default run, from nothing: set up, convert the embedded SmolLM2-135M-Instruct, CUT-train it
# with LoRA on data/demo_judgments.json, merge, and report what changed. Extra flags go to cut.train.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m cut.demo "$@"
