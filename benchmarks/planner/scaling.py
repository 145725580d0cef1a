"""Planning time against batch size N on the three simulation workloads, one plot.

    python -m benchmarks.planner.scaling                 # N = 1k, 2k, 5k, 10k, 20k, 50k
    python -m benchmarks.planner.scaling --ns 1000 5000  # a subset
    python -m benchmarks.planner.scaling --quick         # N = 1k, 2k, synthetic only: results/scaling_quick.*

Workloads (benchmarks.common.workloads): the peer's synthetic Zipf RAG, HotpotQA BM25 top-10
over the pooled corpus, and the knowledge-base workload (BM25 top-10 over ~2,000
paragraphs). HotpotQA dev has 7,405 questions (7,205 outside the knowledge base), so
above that the extra requests are compound questions: two seeded random questions
asked as one query, retrieved like the rest (labelled ``compound`` in the JSON).

``cp_engine.plan_batch`` is timed in this process (wall clock and CPU time of the
call, best of ``--repeat``), with the machine's load average recorded per point, and
the fitted growth exponent (slope of log time against log N) reported per workload.
ContextPilot's times come from benchmarks/results/sim.json (measured side by side
there, N = 1,000 and 5,000); above 5,000 they are extrapolated quadratically from its
N = 5,000 time and drawn dashed, labelled as extrapolation: the peer does not fit in
memory or time there on this machine.

Writes benchmarks/results/scaling.json, scaling.table.md and scaling.png (the shared
results writer).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `cp_engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.common import workloads as W  # noqa: E402
from benchmarks.common.results import RESULTS, provenance, read_result, write_result  # noqa: E402

NS = (1000, 2000, 5000, 10000, 20000, 50000)
QUICK_NS = (1000, 2000)
FAMILIES = ("synthetic", "hotpotqa", "hotpotkb")
LABELS = {"synthetic": "synthetic (Zipf)", "hotpotqa": "HotpotQA pooled BM25",
          "hotpotkb": "HotpotQA knowledge base BM25"}
K = 10


def _compound_queries(data: list[dict], pool: list[int], count: int, seed: int) -> list[str]:
    """``count`` queries, each two distinct questions of ``pool`` joined (seeded)."""
    rng = np.random.default_rng([seed, 3])
    pairs = rng.integers(0, len(pool), size=(count, 2))
    return [data[pool[a]]["question"] + " " + data[pool[b if b != a else (b + 1) % len(pool)]]["question"]
            for a, b in pairs]


def _hotpot_contexts(family: str, n: int) -> tuple[list[list[int]], int]:
    """Block lists for N HotpotQA requests; returns (contexts, compound count)."""
    import bm25s

    real = W.hotpotqa(n, k=K) if family == "hotpotqa" else W.hotpotqa_kb(n, k=K)
    contexts = list(real.contexts)
    extra = n - len(contexts)
    if extra <= 0:
        return contexts, 0
    key = f"scaling_{family}_compound{extra}_k{K}"
    cached = W._load(key)
    if cached is None:
        _, data, pooled = W._bm25()
        if family == "hotpotqa":
            pool = W._question_order(len(data), 0)
            retriever = pooled
        else:
            order, _, retriever = W.kb_retriever()
            pool = order[200:]
        queries = _compound_queries(data, pool, extra, seed=0)
        docs, _ = retriever.retrieve(bm25s.tokenize(queries, stopwords="en", show_progress=False),
                                     k=K, show_progress=False, n_threads=1)
        cached = {"contexts": [[int(d) for d in row] for row in docs]}
        W._store(key, cached)
    return contexts + cached["contexts"], extra


def contexts_for(family: str, n: int) -> tuple[list[list[int]], int]:
    if family == "synthetic":
        return W.synthetic(n).contexts, 0
    return _hotpot_contexts(family, n)


def time_plan(contexts, repeat: int) -> dict:
    from cp_engine import plan_batch

    best_wall = best_cpu = math.inf
    for _ in range(repeat):
        load = os.getloadavg()[0]
        w0, c0 = time.perf_counter(), time.process_time()
        plan = plan_batch(contexts)
        best_wall = min(best_wall, time.perf_counter() - w0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return {"seconds": best_wall, "cpu_seconds": best_cpu, "load_1min": load,
            "strategy": plan.stats["strategy"], "hit": plan.stats["predicted_hit_ratio"]}


def peer_times() -> dict[str, dict[int, float]]:
    """ContextPilot's planning seconds per family and N, from results/sim.json."""
    path = RESULTS / "sim.json"
    out: dict[str, dict[int, float]] = {}
    if not path.exists():
        return out
    for r in json.loads(path.read_text())["workloads"]:
        peer = r["methods"].get("contextpilot", {})
        if "seconds" in peer:
            out.setdefault(r["name"].split("_")[0], {})[r["requests"]] = peer["seconds"]
    return out


def growth(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(N)."""
    if len(points) < 2:
        return None
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, fam in enumerate(FAMILIES):
        color = f"C{i}"
        rows = data["families"].get(fam)
        if not rows:
            continue
        pts = [(r["requests"], r["seconds"]) for r in rows["points"]]
        ax.plot(*zip(*pts), marker="o", color=color, label=f"cp_engine, {LABELS[fam]} (N^{rows['growth']:.2f})")
        measured = sorted(rows["peer_measured"].items())
        if measured:
            ax.plot([int(n) for n, _ in measured], [t for _, t in measured], marker="s", color=color,
                    linestyle=":", label=f"ContextPilot 0.5.0, {LABELS[fam]} (measured)")
        extra = sorted(rows["peer_extrapolated"].items())
        if extra and measured:
            last = measured[-1]
            xs = [int(last[0])] + [int(n) for n, _ in extra]
            ax.plot(xs, [last[1]] + [t for _, t in extra], color=color, linestyle="--", alpha=0.5,
                    label=f"ContextPilot, {LABELS[fam]} (quadratic extrapolation)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N requests in the batch")
    ax.set_ylabel("planning time, s (log)")
    ax.set_title("Batch planning time vs N")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(data: dict) -> str:
    meta = data["meta"]
    out = ["Times: wall clock of one "
           f"`cp_engine.plan_batch` call in-process, best of {meta['repeat']} (CPU time beside it), load "
           "average at the call (the CPU is shared with other agents). ContextPilot 0.5.0: measured in "
           "`python -m benchmarks.planner.sim` (results/sim.json, N = 1,000 and 5,000); above 5,000 its time is "
           "a quadratic extrapolation from N = 5,000 (`~`), not a measurement. Speedup = peer / cp_engine. "
           f"Peer times from {meta.get('peer_source', 'benchmarks/results/sim.json')}.",
           "", "| workload | N | compound | cp_engine s | CPU s | load | strategy | hit ∞ | peer s | speedup |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        rows = data["families"].get(fam)
        if not rows:
            continue
        for r in rows["points"]:
            n = str(r["requests"])
            if n in rows["peer_measured"]:
                peer, mark = rows["peer_measured"][n], ""
            elif n in rows["peer_extrapolated"]:
                peer, mark = rows["peer_extrapolated"][n], "~"
            else:
                peer = None
            speed = f"{mark}{peer / r['seconds']:.0f}×" if peer else "–"
            peer_s = f"{mark}{peer:.1f}" if peer else "–"
            out.append(f"| {fam} | {r['requests']:,} | {r['compound']:,} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                       f"{r['load_1min']:.1f} | {r['strategy']} | {r['hit']:.4f} | {peer_s} | {speed} |")
    out += ["", "Growth (slope of log time against log N, all points): " + ", ".join(
        f"{fam} N^{data['families'][fam]['growth']:.2f}" for fam in FAMILIES if fam in data["families"])
        + "; ContextPilot: " + ", ".join(
        f"{fam} N^{g:.2f} (1,000 → 5,000)" for fam, g in data["peer_growth"].items()) + ".", ""]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"N = {QUICK_NS}, synthetic only (seconds)")
    ap.add_argument("--ns", type=int, nargs="+", default=None, help=f"default {NS}")
    ap.add_argument("--families", nargs="+", default=None, choices=FAMILIES, help="default: all (synthetic with --quick)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per point (best kept)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: results/scaling.json, results/scaling_quick.json with --quick)")
    ap.add_argument("--peer-only", action="store_true",
                    help="re-read ContextPilot's times from results/sim.json into an existing scaling.json "
                         "(after re-running benchmarks.planner.sim) without re-timing cp_engine")
    args = ap.parse_args(argv)
    args.ns = args.ns or list(QUICK_NS if args.quick else NS)
    args.families = args.families or (["synthetic"] if args.quick else list(FAMILIES))
    out = args.out or RESULTS / ("scaling_quick.json" if args.quick else "scaling.json")
    if args.peer_only:
        data, prov = read_result(out)
    else:
        prov = provenance("benchmarks.planner.scaling", argv)
        data = {"meta": {"repeat": args.repeat}, "families": {}}
        for fam in args.families:
            points = []
            for n in sorted(args.ns):
                contexts, compound = contexts_for(fam, n)
                res = time_plan(contexts, args.repeat) | {"requests": n, "compound": compound}
                points.append(res)
                print(f"{fam} N={n:,}: {res['seconds']:.3f} s (CPU {res['cpu_seconds']:.3f} s, "
                      f"load {res['load_1min']:.1f}), {res['strategy']}", file=sys.stderr, flush=True)
            data["families"][fam] = {"points": points,
                                     "growth": growth([(p["requests"], p["seconds"]) for p in points])}
    add_peer(data, peer_times())
    write_result(out, data, table=markdown, plot=plot, prov=prov)
    return 0


def add_peer(data: dict, peers: dict[str, dict[int, float]]) -> None:
    """ContextPilot's measured times per family, and the quadratic extrapolation above them."""
    data["peer_growth"] = {}
    data["meta"]["peer_source"] = "benchmarks/results/sim.json, " + (
        read_result("sim")[1]["date"] if (RESULTS / "sim.json").exists() else "missing")
    for fam, rows in data["families"].items():
        measured = peers.get(fam, {})
        top = max(measured, default=None)
        rows["peer_measured"] = {str(n): t for n, t in sorted(measured.items())}
        rows["peer_extrapolated"] = {str(p["requests"]): measured[top] * (p["requests"] / top) ** 2
                                     for p in rows["points"] if top and p["requests"] > top}
        if len(measured) >= 2:
            data["peer_growth"][fam] = growth(sorted(measured.items()))


if __name__ == "__main__":
    sys.exit(main())
