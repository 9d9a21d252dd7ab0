#!/usr/bin/env bash
# Serves a merged cut model (the folder `cut merge` writes) with FastChat on 127.0.0.1: its
# controller, one model worker on the CPU and its OpenAI-compatible API server. Prints the base_url
# once the model answers /v1/models; Ctrl-C stops all three.
#
#   scripts/serve_fastchat.sh MERGED_DIR [model_worker flags, e.g. --conv-template alpaca]
#   scripts/serve_fastchat.sh --setup-only      # build the side venv and exit
#
# The side venv (.venv-fastchat, or $CUT_FASTCHAT_VENV) holds fschat 0.2.36 on the project's torch;
# safe to rerun (a second run installs nothing). FastChat chooses its conversation template from
# the folder's name and never reads the tokenizer's chat template: a cut folder gets "one_shot".
# Pass --conv-template NAME, or send the prompt the model was trained with to /v1/completions.
# Env: CUT_FASTCHAT_PORT (API port, default 8000; controller and worker take the next two),
# CUT_FASTCHAT_LOGS (log folder, default a new temporary one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${CUT_FASTCHAT_VENV:-.venv-fastchat}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
pipq() { "$VPY" -m pip install --disable-pip-version-check -q "$@" 2>&1 | grep -v "is ignored" || true; }
stamp=$VENV/.cut-installed
if [ ! -f "$stamp" ]; then
  # torch first and pinned, so fschat's unpinned torch cannot pull another build
  pipq torch==2.13.0
  echo "torch==2.13.0" > "$VENV/constraints.txt"
  pipq -c "$VENV/constraints.txt" "fschat[model_worker]==0.2.36" openai
  # importing the worker opens its log file in $LOGDIR (default: the working directory)
  LOGDIR=$VENV "$VPY" -c "import fastchat.serve.model_worker" || { echo "serve_fastchat: fschat did not install" >&2; exit 1; }
  touch "$stamp"
fi
"$VPY" -c "import importlib.metadata as md; print('serve_fastchat: ' + ', '.join(f'{n} {md.version(n)}' for n in ('fschat', 'torch', 'transformers')))"
[ "${1:-}" = "--setup-only" ] && exit 0
MODEL=${1:?usage: scripts/serve_fastchat.sh MERGED_DIR [model_worker flags] | --setup-only}
shift
[ -f "$MODEL/config.json" ] || { echo "serve_fastchat: $MODEL: no config.json (not a merged model folder)" >&2; exit 2; }
MODEL=$(cd "$MODEL" && pwd)
API=${CUT_FASTCHAT_PORT:-8000}
CTL=$((API + 1))
WORKER=$((API + 2))
LOGS=${CUT_FASTCHAT_LOGS:-$(mktemp -d -t cut-fastchat.XXXXXX)}
mkdir -p "$LOGS"
export LOGDIR=$LOGS  # FastChat's own log files go there too, not into the working directory
export NO_PROXY=127.0.0.1 no_proxy=127.0.0.1  # FastChat's processes talk over loopback only
unset http_proxy HTTP_PROXY https_proxy HTTPS_PROXY all_proxy ALL_PROXY

# fschat 0.2.36 reads config.rope_scaling["factor"] whenever rope_scaling is set; transformers 5
# sets it to the rope parameters ({"rope_type": "default", ...}, no factor) for every Llama, and
# the worker dies with KeyError: 'factor'. The worker runs with that one function made to read a
# missing factor as 1 (no scaling), as transformers 4 configs said it.
WORKER_MAIN='
import runpy
import fastchat.utils as utils

def get_context_length(config):
    factor = (getattr(config, "rope_scaling", None) or {}).get("factor") or 1
    for key in utils.SEQUENCE_LENGTH_KEYS:
        if getattr(config, key, None) is not None:
            return int(factor * getattr(config, key))
    return 2048

utils.get_context_length = get_context_length
runpy.run_module("fastchat.serve.model_worker", run_name="__main__", alter_sys=True)
'
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap "exit 130" INT TERM  # the EXIT trap then stops all three
"$VPY" -m fastchat.serve.controller --host 127.0.0.1 --port "$CTL" > "$LOGS/controller.log" 2>&1 &
pids+=($!)
"$VPY" -c "$WORKER_MAIN" --host 127.0.0.1 --port "$WORKER" --worker-address "http://127.0.0.1:$WORKER" \
  --controller-address "http://127.0.0.1:$CTL" --device cpu --model-path "$MODEL" "$@" \
  > "$LOGS/model_worker.log" 2>&1 &
pids+=($!)
"$VPY" -m fastchat.serve.openai_api_server --host 127.0.0.1 --port "$API" \
  --controller-address "http://127.0.0.1:$CTL" > "$LOGS/openai_api_server.log" 2>&1 &
pids+=($!)
# ready when the API server lists a model (the worker has loaded it and registered)
for _ in $(seq 600); do
  for pid in "${pids[@]}"; do
    kill -0 "$pid" 2>/dev/null || { echo "serve_fastchat: a process exited; logs in $LOGS" >&2; tail -n 20 "$LOGS"/*.log >&2; exit 1; }
  done
  if "$VPY" -c "import json, sys, urllib.request as u
o = u.build_opener(u.ProxyHandler({}))
sys.exit(0 if json.load(o.open('http://127.0.0.1:$API/v1/models', timeout=2))['data'] else 1)" 2>/dev/null; then
    echo "serve_fastchat: logs in $LOGS"
    echo "base_url=http://127.0.0.1:$API/v1"
    wait -n "${pids[@]}" || true
    echo "serve_fastchat: a process exited; logs in $LOGS" >&2
    exit 1
  fi
  sleep 1
done
echo "serve_fastchat: not ready after 600 s; logs in $LOGS" >&2
exit 1
