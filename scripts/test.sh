#!/usr/bin/env bash
# The test suite: set up, then pytest (multi-process DDP / DeepSpeed tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cut/torch_extensions}
exec .venv/bin/python -m pytest "$@"
