"""The plugin-overhead benchmarks' own logic: the engine-free micro-benchmark end to
end at a tiny size (real vLLM request objects, real tokenizer), and the A/B's
summaries and py-spy attribution on made-up inputs (the A/B itself needs servers)."""
from __future__ import annotations

import math

import pytest

from benchmarks.common.results import read_result
from benchmarks.reliability import ab
from cp_engine.devtools.stats import ratio_ci
from cp_engine.hooks import channel


def test_micro_overhead_quick_run_times_every_stage_of_a_rewrite_and_none_on_pass_through(tmp_path):
    from benchmarks.micro import overhead

    out = tmp_path / "overhead.json"
    argv = ["--quick", "--indexed", "300", "--requests", "80", "--receiver-seconds", "1", "--out", str(out)]
    assert overhead.main(argv) == 0
    data, prov = read_result(out)
    assert prov["command"] == "python -m benchmarks.micro.overhead " + " ".join(argv)
    (run,) = data["runs"]
    assert run["indexed"] == 300 and run["index_requests"] >= 300
    kinds = run["kinds"]
    assert set(kinds) == {"chat", "passthrough", "completion"} and sum(k["n"] for k in kinds.values()) == 80
    for kind in ("chat", "completion"):
        stages, share = kinds[kind]["stages_us_p50"], kinds[kind]["stages_share"]
        for stage in ("marks", "rewrite: index lookup", "stage: index record", "stage: hints",
                      "accept (dedup commit, counters)"):
            assert stages.get(stage, 0) > 0 and share[stage] == 1.0, (kind, stage)
        assert 0 < share["stage: tokenizer ratio"] <= 1.0  # sampled
    assert "rewrite: namespace key" in kinds["chat"]["stages_us_p50"]
    # An unmarked request is tested and handed to vLLM: its marks are never parsed and
    # there is no index, hint or commit work at all.
    assert set(kinds["passthrough"]["stages_us_p50"]) == {"read arguments", "pass-through test"}
    assert kinds["chat"]["stages_share"]["pass-through test"] == 1.0  # tested, then rewritten
    assert run["evict_apply_us"] > 0
    # The receiver thread got every message, with and without the batching window;
    # with it, each wake-up is followed by a whole window without one.
    plain, batched = run["receiver"]
    assert (plain["gap_ms"], batched["gap_ms"]) == (0, channel.DEFAULT_GAP_MS)
    for x in run["receiver"]:
        assert x["received"] == x["messages"] >= 12 and x["thread_cpu_s"] > 0
    assert 1 <= batched["wakeups"] <= 1 + 1000 * batched["wall_s"] / batched["gap_ms"]
    table = out.with_name(out.stem + ".table.md").read_text()
    assert "| 300 |" in table and "rewrite: index lookup" in table
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def _round(pair, side, rps, p50, api, loop=None):
    out = {"pair": pair, "side": side, "requests": int(rps * 60), "errors": 0, "rps": rps, "p50_s": p50,
           "p99_s": 2 * p50, "api_cpu_us_per_req": api, "engine_cpu_us_per_req": 1000.0, "load_1min": 2.0}
    if loop is not None:
        out["api_loop_cpu_us_per_req"] = loop
    return out


def test_ab_summary_takes_medians_per_side_and_ratios_within_pairs():
    rounds = [_round(0, "on", 9.0, 1.1, 600.0, 450.0), _round(0, "off", 10.0, 1.0, 500.0, 400.0),
              _round(1, "off", 5.0, 2.0, 500.0, 400.0), _round(1, "on", 5.0, 2.0, 520.0, 410.0),
              _round(2, "on", 8.0, 1.0, 700.0)]  # an unfinished pair: in the medians, not the ratios
    s = ab.summarize(rounds)
    assert s["sides"]["on"]["rps"] == {"median": 8.0, "min": 5.0, "max": 9.0}
    assert s["ratios"]["rps"] == {"median": 0.95, "min": 0.9, "max": 1.0}
    assert s["api_cpu_us_per_req_diff"] == {"median": 60.0, "min": 20.0, "max": 100.0}
    # Split by thread: pair 0 is +50 in the event loop and +50 elsewhere, pair 1 +10 / +10.
    assert s["api_loop_cpu_us_per_req_diff"] == {"median": 30.0, "min": 10.0, "max": 50.0}
    assert s["api_other_cpu_us_per_req_diff"] == {"median": 30.0, "min": 10.0, "max": 50.0}
    table = ab.table({"summary": s, "rounds": [{**r} for r in rounds],
                      "config": {"traffic": "soak", "pairs": 3, "round_s": 60, "clients": 64, "host": "h"}})
    assert "| on/off per pair | 0.95 (0.9..1) |" in table
    assert "measured inside the server" not in table  # no round counted hook CPU
    # Pairs 0 and 1 give throughput ratios 0.9 and 1.0: geometric mean sqrt(0.9), and a
    # t-interval with 1 degree of freedom (12.706 x the standard error of the logs).
    ci = s["ratio_ci"]["rps"]
    assert ci["pairs"] == 2 and ci["geomean"] == round(0.9 ** 0.5, 6)
    half = 12.706 * abs(math.log(0.9)) / 2
    assert ci["low"] == round(0.9 ** 0.5 * math.exp(-half), 6) and ci["high"] == round(0.9 ** 0.5 * math.exp(half), 6)
    assert f"throughput {ci['geomean']:.3f} ({ci['low']:.3f}..{ci['high']:.3f})" in table


def test_ratio_ci_is_a_t_interval_on_log_ratios_and_refuses_too_few_or_bad_ratios():
    from cp_engine.devtools.stats import ratio_ci

    mean, low, high = ratio_ci([1.0, 1.0, 1.0])
    assert (mean, low, high) == (1.0, 1.0, 1.0)  # no spread, no width
    ratios = [0.98, 1.01, 1.03, 0.99, 1.00, 1.02]
    logs = [math.log(r) for r in ratios]
    m = sum(logs) / 6
    sd = (sum((x - m) ** 2 for x in logs) / 5) ** 0.5
    mean, low, high = ratio_ci(ratios)
    assert mean == pytest.approx(math.exp(m))
    assert math.log(high / mean) == pytest.approx(2.571 * sd / 6 ** 0.5)  # t(0.975, 5 df)
    assert math.log(mean / low) == pytest.approx(2.571 * sd / 6 ** 0.5)
    assert ratio_ci(ratios * 10)[2] - ratio_ci(ratios * 10)[1] < high - low  # more pairs, narrower
    for bad in ([], [1.0], [1.0, 0.0], [1.0, -2.0]):
        assert all(math.isnan(x) for x in ratio_ci(bad))


def test_t_quantile_past_the_table_continues_it():
    from cp_engine.devtools import stats

    z = 1.959964
    expand = lambda df: z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)  # noqa: E731
    for df in range(20, 31):  # the expansion agrees with the table where both exist
        assert abs(expand(df) - stats._t975(df)) < 0.002
    # Known quantiles past it (t 0.975 at 31, 40, 60, 120 degrees of freedom).
    for df, t in ((31, 2.040), (40, 2.021), (60, 2.000), (120, 1.980)):
        assert abs(stats._t975(df) - t) < 0.001
    assert stats._t975(31) > stats._t975(1000) > 1.96


def test_ab_summary_reports_the_hooks_own_cpu_from_plugin_rounds_only():
    rounds = [{**_round(0, "on", 9.0, 1.1, 600.0), "hook_cpu_us_per_call": 150.0, "hook_calls": 540},
              _round(0, "off", 10.0, 1.0, 500.0),
              _round(1, "off", 5.0, 2.0, 500.0),
              {**_round(1, "on", 5.0, 2.0, 520.0), "hook_cpu_us_per_call": 190.0, "hook_calls": 300}]
    s = ab.summarize(rounds)
    assert s["hook_cpu_us_per_call"] == {"median": 170.0, "min": 150.0, "max": 190.0}
    table = ab.table({"summary": s, "rounds": rounds,
                      "config": {"traffic": "soak", "pairs": 2, "round_s": 60, "clients": 64, "host": "h"}})
    assert "170 (150..190) µs per request through the hooks" in table


def test_ab_thread_rows_take_medians_per_side_and_name_pools_once(tmp_path):
    before = {1: 1.0, 2: 0.5, 3: 0.2}
    after = {1: 1.5, 2: 0.7, 3: 0.2, 4: 0.1}  # thread 4 started during the round
    names = {1: "MainThread", 2: "ThreadPoolExecutor-3", 4: "ThreadPoolExecutor-3"}
    got = ab.by_thread(before, after, names, n=100)
    assert got == {"MainThread": 5000.0, "ThreadPoolExecutor-3": 3000.0}  # idle thread 3 left out
    rounds = [{**_round(0, "on", 9.0, 1.0, 600.0), "threads_us_per_req": {"MainThread": 500.0, "rx": 90.0}},
              {**_round(0, "off", 9.0, 1.0, 500.0), "threads_us_per_req": {"MainThread": 450.0}},
              {**_round(1, "off", 9.0, 1.0, 500.0), "threads_us_per_req": {"MainThread": 470.0, "rx": 10.0}},
              {**_round(1, "on", 9.0, 1.0, 600.0), "threads_us_per_req": {"MainThread": 520.0, "rx": 70.0}}]
    s = ab.summarize(rounds)
    assert s["threads_us_per_req"] == {"rx": {"on": 80.0, "off": 5.0}, "MainThread": {"on": 510.0, "off": 460.0}}
    table = ab.table({"summary": s, "rounds": rounds,
                      "config": {"traffic": "soak", "pairs": 2, "round_s": 45, "clients": 64, "host": "h",
                                 "same_server": True}})
    assert "| `rx` | 80 | 5 | +75.0 |" in table and "One plugin server" in table
    import os

    mine = ab.thread_cpu(os.getpid())  # this process: its own threads, read from /proc
    assert os.getpid() in mine and all(v >= 0 for v in mine.values())


class _Server:
    """What ``ab.hook_cpu`` reads: a server's parsed ``/metrics`` (hand-written fake)."""

    def __init__(self, samples):
        self.samples = samples

    def metrics(self):
        if isinstance(self.samples, Exception):
            raise self.samples
        return self.samples


def test_hook_cpu_sums_every_hook_and_reads_zero_without_the_plugin():
    on = _Server({'cp_engine_hook_cpu_seconds_total{hook="chat_rewrite"}': 0.5,
                  'cp_engine_hook_cpu_seconds_total{hook="completion_rewrite"}': 0.25,
                  'cp_engine_hook_calls_total{hook="chat_rewrite"}': 3000.0,
                  'cp_engine_hook_calls_total{hook="completion_rewrite"}': 1000.0,
                  'vllm:num_requests_running{model_name="m"}': 4.0})
    assert ab.hook_cpu(on) == (0.75, 4000.0)
    assert ab.hook_cpu(_Server({"vllm:num_requests_running": 1.0})) == (0.0, 0.0)
    assert ab.hook_cpu(_Server(ConnectionError("down"))) == (0.0, 0.0)


def test_profile_summary_counts_only_samples_spent_in_plugin_code(tmp_path):
    api = 'process 7:"python vllm serve m"'
    core = 'process 7:"python vllm serve m";process 8:"VLLM::EngineCore"'
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        # the rewrite itself, and a tokenizer call it makes: the plugin's
        f"{api};run (asyncio/events.py:80);call (hooks/vllm/serving_patch.py:53);prepare (cp_engine/pipeline.py:120) 5",
        f"{api};call (hooks/vllm/serving_patch.py:53);observe (hooks/tokenratio.py:40);encode (tokenizers/x.py:1) 2",
        # vLLM working inside the wrapper's call-through: not the plugin's
        f"{api};call (hooks/vllm/serving_patch.py:69);create_chat_completion (vllm/entrypoints/x.py:9) 11",
        f"{api};select (selectors.py:415) 30",
        f"{core};evict_wrapper (hooks/vllm/eviction.py:128);send (hooks/channel.py:392) 3",
        f"{core};step (vllm/v1/engine/core.py:1) 97",
    ]) + "\n")
    s = ab.profile_summary(raw)
    (api_key,) = [k for k in s if k.startswith("process 7")]
    (core_key,) = [k for k in s if k.startswith("process 8")]
    assert s[api_key]["samples"] == 48 and s[api_key]["plugin_samples"] == 7
    assert s[core_key]["samples"] == 100 and s[core_key]["plugin_share"] == 0.03
    assert sum(s[api_key]["plugin_entries"].values()) == 7


def test_profile_diff_compares_the_api_servers_per_request_by_function(tmp_path):
    api_on, api_off = 'process 7:"python vllm serve m"', 'process 9:"python vllm serve m"'
    core = 'process 7:"python vllm serve m";process 8:"VLLM::EngineCore"'
    on, off = tmp_path / "on.txt", tmp_path / "off.txt"
    on.write_text("\n".join([
        f"{api_on};thread (7);run (asyncio/events.py:80);call (hooks/vllm/serving_patch.py:53) 40",
        f"{api_on};thread (7);run (asyncio/events.py:80);decode (vllm/detok.py:3) 60",
        f"{core};step (vllm/v1/engine/core.py:1) 500",  # a child process: not the API server
    ]) + "\n")
    off.write_text(f"{api_off};thread (9);run (asyncio/events.py:80);decode (vllm/detok.py:9) 50\n")
    d = ab.profile_diff(on, off, on_requests=10, off_requests=5, rate=100.0)
    # 100 samples / 100 Hz / 10 requests = 0.1 s per request on; 50 / 100 / 5 off.
    assert d["samples"] == {"on": 100, "off": 50}
    assert d["us_per_request"] == {"on": 100000.0, "off": 100000.0}
    rows = {f["function"]: f for f in d["functions"]}
    assert rows["call (hooks/vllm/serving_patch.py)"]["diff_us"] == 40000.0
    assert rows["decode (vllm/detok.py)"] == {"function": "decode (vllm/detok.py)", "on_us": 60000.0,
                                              "off_us": 100000.0, "diff_us": -40000.0}
    assert rows["run (asyncio/events.py)"]["diff_us"] == 0.0
    assert "step (vllm/v1/engine/core.py)" not in rows


def test_balanced_start_alternates_which_server_starts_first_over_fresh_sessions():
    assert ab.start_orders("balanced", 4, 4, same_server=False) == [
        (("on", "off"), range(0, 1)), (("off", "on"), range(1, 2)),
        (("on", "off"), range(2, 3)), (("off", "on"), range(3, 4))]
    assert ab.start_orders("balanced", 5, 2, same_server=False) == [(("on", "off"), range(0, 2)),
                                                                   (("off", "on"), range(2, 5))]
    assert ab.start_orders("balanced", 1, 2, same_server=False) == [(("on", "off"), range(0, 1))]
    assert ab.start_orders("off", 3, 2, same_server=False) == [(("off", "on"), range(0, 3))]
    # One server answers both sides: one session, whatever the order asked.
    assert ab.start_orders("balanced", 3, 2, same_server=True) == [(("on", "off"), range(0, 3))]


def test_ab_summary_splits_the_difference_by_the_server_started_first():
    rounds = [{**_round(0, "on", 9.0, 1.0, 700.0), "started_first": "on"},
              {**_round(0, "off", 9.0, 1.0, 500.0), "started_first": "on"},
              {**_round(1, "off", 9.0, 1.0, 600.0), "started_first": "off"},
              {**_round(1, "on", 9.0, 1.0, 550.0), "started_first": "off"}]
    s = ab.summarize(rounds)
    assert s["api_cpu_us_per_req_diff_by_start"] == {"off": {"median": -50.0, "min": -50.0, "max": -50.0},
                                                     "on": {"median": 200.0, "min": 200.0, "max": 200.0}}
    assert s["api_cpu_us_per_req_diff_order_free"] == 75.0  # what start order adds, +125 / -125, cancels
    table = ab.table({"summary": s, "rounds": rounds,
                      "config": {"traffic": "plain", "pairs": 2, "round_s": 30, "clients": 4, "host": "h"}})
    assert "By the server started first: off first -50 (-50..-50); on first 200 (200..200); " \
           "their mean, which cancels what start order adds: 75 µs." in table
    one_order = ab.summarize([{**r, "started_first": "on"} for r in rounds])
    assert "api_cpu_us_per_req_diff_by_start" not in one_order


def test_perf_diff_puts_each_sides_native_time_per_request_by_object_and_symbol():
    from collections import Counter

    seconds = {"on": Counter({"f (libpython.so)": 0.30, "g (libc.so)": 0.10}),
               "off": Counter({"f (libpython.so)": 0.10, "g (libc.so)": 0.10, "h (libc.so)": 0.05})}
    d = ab.perf_diff(seconds, {"on": 100, "off": 50})
    assert d["us_per_request"] == {"on": 4000.0, "off": 5000.0}
    assert {r["name"]: r["diff_us"] for r in d["by_symbol"]} == {
        "f (libpython.so)": 1000.0, "g (libc.so)": -1000.0, "h (libc.so)": -1000.0}
    assert {"name": "h (libc.so)", "on_us": 0.0, "off_us": 1000.0, "diff_us": -1000.0} in d["by_symbol"]
    assert {r["name"]: r["diff_us"] for r in d["by_object"]} == {"libc.so": -2000.0, "libpython.so": 1000.0}
    table = ab.table({"summary": ab.summarize([]), "rounds": [], "perf_diff": {"api": d},
                      "config": {"traffic": "plain", "pairs": 0, "round_s": 30, "clients": 4, "host": "h"}})
    assert "| `libc.so` | 1000 | 3000 | -2000 |" in table


def test_perf_seconds_keeps_each_process_groups_samples(tmp_path):
    import shutil
    import subprocess
    import sys

    import pytest

    if shutil.which("perf") is None:
        pytest.skip("perf is not installed")
    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 3: pass"])
    out = tmp_path / "perf.data"
    rec = subprocess.run(["perf", "record", "-q", "-a", "-e", "cpu-clock", "-F", "199", "-o", str(out),
                          "--", "sleep", "1.5"], capture_output=True)
    busy.wait()
    if rec.returncode != 0 or not out.exists():
        pytest.skip(f"perf record cannot sample the machine here: {rec.stderr.decode()[-200:]}")
    got = ab.perf_seconds(out, {"busy": {busy.pid}, "none": {-1}})
    assert got["none"] == {}
    # The busy loop's samples, by its interpreter's symbols. How many depends on the
    # machine's load (2 cores shared with a test run: 0.4 s of the 1.5 s window seen),
    # so only a floor of ten samples at 199 Hz and the window's ceiling are fixed.
    assert 0.05 < sum(got["busy"].values()) < 2.0
    assert any("python" in name for name in got["busy"])


def test_session_interval_averages_each_sessions_pairs_first():
    # Sessions 0 and 1 hold two pairs each (ratios 0.9, 1.0 and 1.0, 1.1), session 2 one
    # (0.95); a pair without a recorded session is left out of the session interval.
    ratios = {0: (0, 0.9), 1: (0, 1.0), 2: (1, 1.0), 3: (1, 1.1), 4: (2, 0.95), 5: (None, 0.5)}
    rounds = []
    for pair, (session, r) in ratios.items():
        extra = {} if session is None else {"session": session}
        rounds += [{**_round(pair, "on", 10.0 * r, 1.0, 500.0), **extra},
                   {**_round(pair, "off", 10.0, 1.0, 500.0), **extra}]
    s = ab.summarize(rounds)
    means = [math.sqrt(0.9 * 1.0), math.sqrt(1.0 * 1.1), 0.95]
    want = ratio_ci(means)
    got = s["ratio_ci_sessions"]["rps"]
    assert got["sessions"] == 3
    assert (got["geomean"], got["low"], got["high"]) == tuple(round(x, 6) for x in want)
    assert s["ratio_ci"]["rps"]["pairs"] == 6  # the pair interval still counts every pair
    table = ab.table({"summary": s, "rounds": rounds,
                      "config": {"traffic": "plain", "pairs": 6, "round_s": 45, "clients": 64, "host": "h"}})
    assert "over 3 server sessions" in table and f"throughput {want[0]:.3f} ({want[1]:.3f}..{want[2]:.3f})" in table
    # One session only: no session interval.
    assert "ratio_ci_sessions" not in ab.summarize([{**r, "session": 0} for r in rounds])


def test_sessions_of_an_older_result_follow_its_start_orders():
    cfg = {"pairs": 5, "sessions": 2, "start_order": "balanced", "same_server": False}
    rounds = [{"pair": p, "side": side} for p in range(5) for side in ("on", "off")]
    got = ab.with_sessions({"config": cfg, "rounds": rounds})
    sessions = {r["pair"]: r["session"] for r in got}
    orders = ab.start_orders("balanced", 5, 2, False)
    assert sessions == {p: i for i, (_, pairs) in enumerate(orders) for p in pairs}
    assert sorted(set(sessions.values())) == [0, 1]
    # Recorded sessions are kept; one server or no session count: all one session.
    assert ab.with_sessions({"config": cfg, "rounds": [{"pair": 0, "session": 7}]}) == [{"pair": 0, "session": 7}]
    assert {r["session"] for r in ab.with_sessions({"config": {"same_server": True}, "rounds": rounds})} == {0}


def test_pooling_two_ab_results_numbers_their_pairs_apart_and_refuses_different_setups(tmp_path, capsys):
    from benchmarks.common.results import write_result

    def result(name, ratios, traffic="plain"):
        rounds = []
        for pair, r in enumerate(ratios):
            rounds += [_round(pair, "on", 10.0 * r, 1.0 / r, 500.0), _round(pair, "off", 10.0, 1.0, 500.0)]
        cfg = {"traffic": traffic, "clients": 64, "round_s": 45.0, "same_server": False}
        write_result(name, {"config": cfg, "rounds": rounds}, table="t", module="m", argv=[],
                     out_dir=tmp_path, echo=False)

    result("a", [0.98, 1.01])
    result("b", [1.00, 0.99, 1.02])
    s = ab.pooled(["a", "b"], out_dir=tmp_path)
    ratios = [0.98, 1.01, 1.00, 0.99, 1.02]
    mean = math.exp(sum(map(math.log, ratios)) / 5)
    assert s["ratio_ci"]["rps"]["pairs"] == 5 and s["ratio_ci"]["rps"]["geomean"] == round(mean, 6)
    assert s["ratios"]["rps"]["min"] == 0.98 and s["ratios"]["rps"]["max"] == 1.02
    lines = ab.pooled_lines(["a", "b"], s)
    assert "5 pairs" in lines and f"- rps: {mean:.3f}" in lines
    # Each result's rounds are one session here (no session count in their config),
    # numbered apart: two sessions, their pairs averaged first.
    sessions = [math.sqrt(0.98 * 1.01), (1.00 * 0.99 * 1.02) ** (1 / 3)]
    assert s["ratio_ci_sessions"]["rps"]["sessions"] == 2
    assert s["ratio_ci_sessions"]["rps"]["geomean"] == round(ratio_ci(sessions)[0], 6)
    assert "Over their 2 server sessions" in lines
    result("c", [1.0, 1.0], traffic="soak")
    with pytest.raises(ValueError, match="differ"):
        ab.pooled(["a", "c"], out_dir=tmp_path)
    assert ab.main(["--pool", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    assert "Pooled over" in capsys.readouterr().out


def test_engine_work_reads_hit_ratio_prompt_tokens_and_preemptions_from_counter_deltas():
    before = {"hits": 100.0, "queries": 1000.0, "prompt_tokens": 1000.0, "preemptions": 1.0}
    after = {"hits": 400.0, "queries": 5000.0, "prompt_tokens": 5000.0, "preemptions": 3.0}
    assert ab.engine_work(before, after, 4) == {"prefix_hit_ratio": 0.075, "prompt_tokens_per_req": 1000.0,
                                                "preemptions": 2}
    assert ab.engine_work(after, after, 4) == {}  # nothing prefilled: no ratio
    samples = {'vllm:prefix_cache_hits_total{engine="0",model_name="m"}': 7.0,
               'vllm:prefix_cache_queries_total{engine="0",model_name="m"}': 70.0}
    got = ab._engine_counters(samples)
    assert got["hits"] == 7.0 and got["queries"] == 70.0 and got["preemptions"] == 0.0
    rounds = []
    for pair, (on, off) in enumerate([(0.05, 0.06), (0.04, 0.04)]):
        rounds += [{**_round(pair, "on", 9.0, 1.0, 500.0), "prefix_hit_ratio": on},
                   {**_round(pair, "off", 9.0, 1.0, 500.0), "prefix_hit_ratio": off}]
    s = ab.summarize(rounds)
    assert s["prefix_hit_ratio"]["on"]["median"] == 0.045
    assert s["prefix_hit_ratio_diff"] == {"median": -0.005, "min": -0.01, "max": 0.0}
    table = ab.table({"summary": s, "rounds": rounds,
                      "config": {"traffic": "plain", "pairs": 2, "round_s": 45, "clients": 64, "host": "h"}})
    assert "prefix cache hit ratio" in table and "| 0.05 |" in table


def test_engine_sched_reads_run_and_wait_of_this_process_tree():
    import multiprocessing as mp
    import os
    import time

    ctx = mp.get_context("spawn")
    child = ctx.Process(target=time.sleep, args=(5,))
    child.start()
    try:
        got = {}
        for _ in range(50):  # the spawned child shows up under its own title
            got = ab.engine_sched(os.getpid())
            if got:
                break
            time.sleep(0.05)
        assert got, "the child process was not seen"
        # Starting an interpreter took CPU (its title depends on the executable's name).
        assert any(run > 0 for run, _ in got.values()) and all(wait >= 0 for _, wait in got.values())
    finally:
        child.terminate()
        child.join()
    for title, role in (("VLLM::EngineCore", "EngineCore"), ("VLLM::EngineCore_DP1", "EngineCore"),
                        ("VLLM::Worker", "Worker"), ("VLLM::Worker_TP0", "Worker"), ("python", "python")):
        assert ab.process_role(title) == role


def test_engine_sched_summary_gives_each_role_per_side_and_per_pair_differences():
    rounds = []
    for pair, (on, off) in enumerate([((0.96, 0.03), (0.98, 0.02)), ((0.97, 0.02), (0.97, 0.02))]):
        for side, (run, wait) in (("on", on), ("off", off)):
            rounds.append({**_round(pair, side, 9.0, 1.0, 500.0),
                           "engine_sched": {"Worker": {"run_per_s": run, "wait_per_s": wait},
                                            "resource_tracker": {"run_per_s": 0.0, "wait_per_s": 0.0}}})
    s = ab.summarize(rounds)
    assert "resource_tracker" not in s["engine_sched"]  # a helper that never ran is no row
    w = s["engine_sched"]["Worker"]
    assert w["run_per_s_diff"] == {"median": -0.01, "min": -0.02, "max": 0.0}
    assert w["on"]["wait_per_s"]["median"] == 0.025
    table = ab.table({"summary": s, "rounds": rounds,
                      "config": {"traffic": "plain", "pairs": 2, "round_s": 45, "clients": 64, "host": "h"}})
    assert "| Worker | 0.965 | 0.975 |" in table


def test_each_side_takes_the_outer_places_of_half_the_sessions():
    # Places 0..3 of a two-pair session; the side in places 0 and 3 alternates by session.
    def places(session):
        return [side for i in range(2) for side in ab.pair_sides(session, i)]

    assert places(0) == ["on", "off", "off", "on"]
    assert places(1) == ["off", "on", "on", "off"]
    outer = [places(s)[0] for s in range(6)]
    assert outer.count("on") == outer.count("off") == 3
    for s in range(6):  # every pair runs both sides once
        assert all(sorted(ab.pair_sides(s, i)) == ["off", "on"] for i in range(3))
