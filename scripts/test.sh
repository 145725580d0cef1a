#!/usr/bin/env bash
# Set up the test environments from scratch (idempotent) and run the test suite.
#   bash scripts/test.sh            # everything CI runs
#   bash scripts/test.sh -k index   # extra args go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# uv installs without bytecode, so with PYTHONDONTWRITEBYTECODE set every fresh
# interpreter (each server process, each patch-ordering subprocess) recompiles vLLM,
# torch and transformers from source: ~2x the CPU of `import vllm`. The first import
# writes the .pyc files into the venvs; every later one reads them.
unset PYTHONDONTWRITEBYTECODE

# Wall time of each phase, printed as one table at the end (where CI time goes).
PHASES=()
t_phase=$(date +%s)
phase_done() { local now; now=$(date +%s); PHASES+=("$1 $((now - t_phase))"); t_phase=$now; }
report_phases() { printf '[test.sh] phase seconds:\n'; printf '  %-28s %5s\n' ${PHASES[@]}; }
# The 1-minute load average once a minute, printed at the end: whether the two cores
# were saturated (load >= 2) or idle, and when.
mkdir -p build
load_log=build/ci-load.txt
: >"$load_log"
( t0=$(date +%s); while sleep 60; do
    echo "$(( ($(date +%s) - t0) / 60 )) $(cut -d' ' -f1 /proc/loadavg)" >>"$load_log"; done ) </dev/null >/dev/null 2>&1 &
load_pid=$!
trap 'kill "$load_pid" 2>/dev/null' EXIT
report_load() { printf '[test.sh] 1-min load average by minute: %s\n' "$(awk '{printf "%s:%s ", $1, $2}' "$load_log")"; }

# The oldest supported vLLM release too: patch drift and the real scheduler/block pool
# (the live smoke of every release is in scripts/vllm_matrix.sh; too slow for CI).
# CP_CI_OLDEST_VLLM=0 skips it (e.g. offline with only the main wheels cached). It runs
# in the background beside the main suite: most of it is single-threaded interpreter
# start-up, and so is most of a live-server start, so two cores take both at once.
matrix_pid=""
matrix_out=build/ci-vllm-oldest
if [ "${CP_CI_OLDEST_VLLM:-1}" = "1" ] && [ $# -eq 0 ]; then
  rm -rf "$matrix_out"
  mkdir -p "$matrix_out"
  MATRIX_GROUPS=engine MATRIX_OUT="$matrix_out" bash scripts/vllm_matrix.sh 0.27.1 \
    >"$matrix_out/matrix.out" 2>&1 &
  matrix_pid=$!
fi

setup_main_venv
phase_done main-venv
# The SGLang suite runs beside the main one as soon as its venv is built: it uses its
# own engine and venv, and the main suite leaves one core to the background most of
# the time (its own tests are one process; the server pool starts at most two).
sglang_pid=""
sglang_out=build/ci-sglang
if [ -f scripts/setup_sglang_env.sh ]; then
  rm -rf "$sglang_out"
  mkdir -p "$sglang_out"
  (
    t0=$(date +%s)
    if ! bash scripts/setup_sglang_env.sh >"$sglang_out/venv.log" 2>&1; then
      echo "venv FAIL $(($(date +%s) - t0))" >"$sglang_out/seconds"; exit 90
    fi
    t1=$(date +%s)
    rc=0
    .venv-sglang/bin/python -m pytest -q -p no:cacheprovider tests/engine/test_sglang_evictions.py \
      tests/engine/test_sglang_ordering.py tests/engine/test_sglang_chat.py tests/engine/test_sglang_patching.py \
      tests/live/test_sglang_live.py \
      tests/engine/test_patch_table.py::test_sglang_row_drift_patch_unpatch --durations=15 \
      >"$sglang_out/pytest.log" 2>&1 || rc=$?  # ^ every SGLang patch-table row
    echo "venv $((t1 - t0)) pytest $(($(date +%s) - t1))" >"$sglang_out/seconds"
    exit $rc
  ) &
  sglang_pid=$!
fi

# Default selection excludes the long runs (soak, full fuzz): see README.
set +e
# Several servers start at once here (tests/server_pool.py): on a loaded 2-core box one
# can print nothing for minutes, so the start watchdog's stall window is wider.
export CP_VLLM_START_STALL_S="${CP_VLLM_START_STALL_S:-600}"
# The benchmark code's own tests live beside it (benchmarks/tests), engine-free. Live
# tests last: their servers start in the background meanwhile (tests/server_pool.py).
"$VENV/bin/python" -m pytest tests/unit benchmarks/tests tests/engine tests/live -m "not slow" \
  -p no:cacheprovider --ignore-glob='tests/*/test_sglang_*' --durations=25 -o console_output_style=times "$@"
rc=$?
phase_done pytest-main
rc2=0
if [ -n "$sglang_pid" ]; then
  wait "$sglang_pid" || rc2=$?
  [ $rc2 -eq 90 ] && cat "$sglang_out/venv.log"
  cat "$sglang_out/pytest.log" 2>/dev/null
  echo "[test.sh] SGLang suite beside the main one, seconds: $(cat "$sglang_out/seconds" 2>/dev/null)"
fi
phase_done wait-sglang-suite
rc3=0
if [ -n "$matrix_pid" ]; then
  wait "$matrix_pid"
  rc3=$?
  cat "$matrix_out/matrix.out"  # the per-group seconds (build, drift, core)
  if [ $rc3 -ne 0 ]; then
    for f in "$matrix_out"/*.log; do echo "== $f"; tail -n 40 "$f"; done
  fi
fi
phase_done wait-vllm-0.27.1-matrix
report_phases
report_load
set -e
[ $rc -ne 0 ] && exit $rc
[ $rc2 -ne 0 ] && exit $rc2
exit $rc3
