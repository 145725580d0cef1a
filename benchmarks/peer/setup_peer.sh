#!/usr/bin/env bash
# Create benchmarks/.peer-venv with the peer (ContextPilot 0.5.0) for side-by-side runs.
# The peer lives in its own venv so none of its ~98 dependencies touch ours.
# Exits 0 with a message when the peer cannot be installed (offline, no python3.11):
# the benchmarks then skip the peer column.
set -u
here="$(cd "$(dirname "$0")" && pwd)"
venv="$here/../.peer-venv"
py="${PEER_PYTHON:-python3.11}"

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import contextpilot" 2>/dev/null; then
    echo "peer venv ready: $venv"
    exit 0
fi
if ! command -v "$py" >/dev/null 2>&1; then
    echo "SKIP: $py not found; the peer column will be skipped" >&2
    exit 0
fi
echo "installing contextpilot==0.5.0 into $venv (about 2.5 min)..."
if command -v uv >/dev/null 2>&1; then
    uv venv -q -p "$py" "$venv" && uv pip install -q -p "$venv/bin/python" contextpilot==0.5.0 psutil
else
    "$py" -m venv "$venv" && "$venv/bin/pip" install -q contextpilot==0.5.0 psutil
fi
if [ $? -ne 0 ] || ! "$venv/bin/python" -c "import contextpilot" 2>/dev/null; then
    echo "SKIP: could not install contextpilot==0.5.0 (offline?); the peer column will be skipped" >&2
    rm -rf "$venv"
    exit 0
fi
echo "peer venv ready: $venv"
