#!/usr/bin/env bash
# The test suite: set up, then pytest (multi-process DDP / DeepSpeed tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/cut/torch_extensions}
# a run killed while DeepSpeed JIT-compiled an op leaves its lock behind, and every later build
# waits on it forever; a compile takes about 2 minutes, so a lock older than 15 is stale
find "$TORCH_EXTENSIONS_DIR" -maxdepth 2 -name lock -mmin +15 -print -delete 2>/dev/null || true
exec .venv/bin/python -m pytest "$@"
