#!/usr/bin/env bash
# The slow live tests kept out of the default CI run (`-m slow`), with what each needs:
#   llama.cpp behind the proxy   tests/live/test_proxy_llamacpp_live.py
#                                (.venv-llamacpp + GGUF: scripts/setup_llamacpp.sh, run if missing)
#   two replicas behind a router tests/live/test_scaleout_router_live.py
#                                (vllm-router: CP_ENGINE_VLLM_ROUTER, else PATH, else installed
#                                 into a scratch venv, build/vllm-router-venv; SGLang's router:
#                                 CP_ENGINE_SGLANG_ROUTER, a python that imports sglang_router,
#                                 else installed into build/sglang-router-venv)
#   --api-server-count 2         tests/live/test_scaleout_api_servers_live.py
#   --data-parallel-size 2       tests/live/test_scaleout_dp_live.py
#
#   bash scripts/slow_tests.sh            # all four
#   bash scripts/slow_tests.sh router     # only the files whose name contains "router"
#
# Each file runs under the live-server lock (CP_ENGINE_LIVE_LOCK, default
# /tmp/cp_engine_live.lock: one engine at a time on a shared machine) and `nice`
# (SLOW_TESTS_NICE, default 10). Ends with one line per file: PASS, FAIL, or SKIP
# (nothing ran or a test skipped itself: the job did not check what it is for).
# Exits non-zero unless every file passed.
set -uo pipefail
cd "$(dirname "$0")/.."

VENV="${CP_ENGINE_VENV:-$PWD/.venv}"
LOCK="${CP_ENGINE_LIVE_LOCK:-/tmp/cp_engine_live.lock}"
NICE="${SLOW_TESTS_NICE:-10}"
ROUTER_VERSION="${VLLM_ROUTER_VERSION:-0.1.17}"
SGLANG_ROUTER_VERSION="${SGLANG_ROUTER_VERSION:-0.3.2}"
OUT=build/slow-tests
mkdir -p "$OUT"
unset PYTHONDONTWRITEBYTECODE  # as scripts/test.sh: server processes reuse the .pyc files
export CP_VLLM_START_STALL_S="${CP_VLLM_START_STALL_S:-600}"  # a loaded 2-core box starts slowly

FILES=(tests/live/test_proxy_llamacpp_live.py
       tests/live/test_scaleout_router_live.py
       tests/live/test_scaleout_api_servers_live.py
       tests/live/test_scaleout_dp_live.py)
if [ $# -gt 0 ]; then
  picked=()
  for f in "${FILES[@]}"; do for w in "$@"; do [[ $f == *"$w"* ]] && picked+=("$f") && break; done; done
  FILES=("${picked[@]}")
fi
[ ${#FILES[@]} -gt 0 ] || { echo "[slow] no test file matches: $*" >&2; exit 2; }

say() { echo "[slow] $*" >&2; }

need_llamacpp() {
  # LLAMACPP_PYTHON / LLAMACPP_MODEL (benchmarks/proxy/llama_server.py's defaults) or a setup run.
  "$VENV/bin/python" -c "from benchmarks.proxy.llama_server import locate; raise SystemExit(locate() is None)" \
    && return 0
  say "no llama.cpp venv/model: running scripts/setup_llamacpp.sh"
  local lines
  lines="$(bash scripts/setup_llamacpp.sh)" || return 1
  export "$(grep '^LLAMACPP_PYTHON=' <<<"$lines")" "$(grep '^LLAMACPP_MODEL=' <<<"$lines")"
}

# scratch_venv DIR PACKAGE==VERSION: a venv at DIR holding the package (kept between runs)
scratch_venv() {
  say "installing $2 into $1"
  if command -v uv >/dev/null 2>&1; then
    uv venv -q -p python3.11 "$1" && uv pip install -q -p "$1/bin/python" "$2"
  else
    python3 -m venv "$1" && "$1/bin/pip" install -q "$2"
  fi
}

need_routers() { need_vllm_router && need_sglang_router; }

need_sglang_router() {
  if [ -n "${CP_ENGINE_SGLANG_ROUTER:-}" ]; then
    "$CP_ENGINE_SGLANG_ROUTER" -c "import sglang_router" 2>/dev/null \
      || { say "CP_ENGINE_SGLANG_ROUTER=$CP_ENGINE_SGLANG_ROUTER cannot import sglang_router"; return 1; }
    return 0
  fi
  local scratch="$PWD/build/sglang-router-venv"
  if ! "$scratch/bin/python" -c "import sglang_router" 2>/dev/null; then
    scratch_venv "$scratch" "sglang-router==$SGLANG_ROUTER_VERSION" || return 1
  fi
  export CP_ENGINE_SGLANG_ROUTER="$scratch/bin/python"
}

need_vllm_router() {
  if [ -n "${CP_ENGINE_VLLM_ROUTER:-}" ]; then
    [ -x "$CP_ENGINE_VLLM_ROUTER" ] || { say "CP_ENGINE_VLLM_ROUTER=$CP_ENGINE_VLLM_ROUTER is not executable"; return 1; }
    return 0
  fi
  command -v vllm-router >/dev/null 2>&1 && return 0
  local scratch="$PWD/build/vllm-router-venv"
  if [ ! -x "$scratch/bin/vllm-router" ]; then
    scratch_venv "$scratch" "vllm-router==$ROUTER_VERSION" || return 1
  fi
  export CP_ENGINE_VLLM_ROUTER="$scratch/bin/vllm-router"
}

# counts FILE.xml -> "tests failures errors skipped" from pytest's JUnit report
counts() {
  "$VENV/bin/python" - "$1" <<'PY'
import sys, xml.etree.ElementTree as ET
try:
    root = ET.parse(sys.argv[1]).getroot()
except (OSError, ET.ParseError):
    print("0 0 1 0"); raise SystemExit
suites = [root] if root.tag == "testsuite" else list(root)
print(*(sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")))
PY
}

SUMMARY=()
failed=0
for f in "${FILES[@]}"; do
  name="$(basename "$f" .py)"
  prep=0
  case "$f" in
    *llamacpp*) need_llamacpp || prep=1 ;;
    *router*) need_routers || prep=1 ;;
  esac
  if [ $prep -ne 0 ]; then
    SUMMARY+=("FAIL  $f  (its prerequisite could not be set up)"); failed=1; continue
  fi
  say "$f (waiting for $LOCK)"
  t0=$(date +%s)
  flock "$LOCK" nice -n "$NICE" "$VENV/bin/python" -m pytest -m slow -p no:cacheprovider -rs \
    --junitxml="$OUT/$name.xml" "$f" 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  read -r n nfail nerr nskip <<<"$(counts "$OUT/$name.xml")"
  secs=$(( $(date +%s) - t0 ))
  detail="$n tests, $nfail failed, $nerr errors, $nskip skipped, ${secs}s; log $OUT/$name.log"
  if [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; then status=FAIL
  elif [ "$n" -eq 0 ] || [ "$nskip" -gt 0 ] || [ "$rc" -eq 5 ]; then status=SKIP
  else status=PASS
  fi
  [ $status = PASS ] || failed=1
  SUMMARY+=("$status  $f  ($detail)")
done

echo "[slow] summary:"
printf '  %s\n' "${SUMMARY[@]}"
exit $failed
