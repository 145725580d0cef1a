"""Planning time against batch size N on four workloads, one plot and table.

    python -m benchmarks.planner.scaling                          # N = 1k..50k, peer at 1k and 5k
    python -m benchmarks.planner.scaling --before 63f0a1c        # also time the planner at that commit
    python -m benchmarks.planner.scaling --ns 1000 5000 --families hotpotkb
    python -m benchmarks.planner.scaling --quick                  # N = 1k, 2k, synthetic only: results/scaling_quick.*

Workloads (benchmarks.common.workloads): the peer's synthetic Zipf RAG, HotpotQA BM25 top-10
over the pooled corpus, and the knowledge-base workload (BM25 top-10 over ~2,000
paragraphs), and SQuAD v2.0 dev (BM25 top-12 over its 1,204 paragraphs, up to 11,873
questions). HotpotQA dev has 7,405 questions (7,205 outside the knowledge base), so
above that the extra requests are compound questions: two seeded random questions
asked as one query, retrieved like the rest (labelled ``compound`` in the JSON).

Side by side in one run, per point: ``cp_engine.plan_batch`` (this tree), the planner
of ``--before REV`` (its planner modules taken from git into a temporary package) and
ContextPilot 0.5.0 (its own venv, benchmarks/peer; run fresh, never from the plan
cache, at ``--peer-ns``), interleaved so a load change on the shared machine
hits all of them. Times are of the planning call only (the peer's as its runner
measures it, wall clock): the median of ``--repeat`` calls (1 above
``--repeat-max-n``), CPU time beside ours. Plan quality for each: prefix-tree nodes
of the scheduled plan and the hit ratio of a block-level prefix cache, unbounded and
LRU 250 / 1,000 blocks (``cp_engine.sim``). The fitted growth exponent (slope of log
time against log N, by wall clock and by CPU time) is reported per workload; above
the largest N the peer was run at, its time is a quadratic extrapolation, drawn
dashed and marked ``~``.

Writes benchmarks/results/scaling.json, scaling.table.md and scaling.png (the shared
results writer); ``--plot`` redoes the fitted growth, table and PNG from the JSON.
"""
from __future__ import annotations

import argparse
import functools
import importlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` and `cp_engine` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from benchmarks.common import workloads as W  # noqa: E402
from benchmarks.common.results import RESULTS, ROOT, provenance, read_result, write_result  # noqa: E402

NS = (1000, 2000, 5000, 10000, 20000, 50000)
QUICK_NS = (1000, 2000)
PEER_NS = (1000, 5000)
FAMILIES = ("synthetic", "hotpotqa", "hotpotkb", "squad")
LABELS = {"synthetic": "synthetic (Zipf)", "hotpotqa": "HotpotQA pooled BM25",
          "hotpotkb": "HotpotQA knowledge base BM25", "squad": "SQuAD dev BM25 top-12"}
K = 10
SQUAD_QUESTIONS = 11873  # SQuAD v2.0 dev: no compound questions past them
CAPACITIES = (None, 250, 1000)
METHODS = ("ours", "before", "peer")
METHOD_LABELS = {"ours": "cp_engine", "before": "cp_engine before", "peer": "ContextPilot 0.5.0"}


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
    if family == "squad":
        return W.squad(n).contexts, 0
    return _hotpot_contexts(family, n)


def token_lengths_for(family: str, n: int, contexts: list[list[int]]) -> dict[int, int]:
    """Each block's token length (the chars/4 estimate ``build_batch_messages`` falls back
    to), for ``--token-lengths``: from the workload's texts, and for compound HotpotQA
    points from the corpus the blocks were retrieved from."""
    if family == "synthetic":
        return dict(W.synthetic(n).tokens)
    if family == "squad":
        return dict(W.squad(n).tokens)
    real = W.hotpotqa(n, k=K) if family == "hotpotqa" else W.hotpotqa_kb(n, k=K)
    tokens = dict(real.tokens)
    missing = {b for c in contexts for b in c if b not in tokens}  # the compound questions' blocks
    if missing:
        corpus = W._bm25()[0] if family == "hotpotqa" else W.kb_retriever()[1]
        tokens.update((b, W.estimate_tokens(corpus[b])) for b in missing)
    return tokens


def load_before(rev: str):
    """``plan_batch`` of the planner at git ``rev``: its cp_engine/planner*.py and
    trie.py, copied into a temporary package (they import only each other and numpy)."""
    names = subprocess.run(["git", "ls-tree", "--name-only", rev, "cp_engine/"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    tmp = Path(tempfile.mkdtemp(prefix="planner_before_"))
    pkg = tmp / "cp_engine_before"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in names:
        base = Path(name).name
        if base == "trie.py" or (base.startswith("planner") and base.endswith(".py")):
            text = subprocess.run(["git", "show", f"{rev}:{name}"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (pkg / base).write_text(text)
    sys.path.insert(0, str(tmp))
    return importlib.import_module("cp_engine_before.planner").plan_batch


def quality(plan_contexts: list[list], order: list[int]) -> dict:
    """Prefix-tree nodes of the scheduled plan and its hit ratio per cache size."""
    from cp_engine.planner_tree import tree_size
    from cp_engine.sim import simulate

    seq = [list(dict.fromkeys(plan_contexts[i])) for i in order]
    out = {"tree_nodes": tree_size(seq)}
    for cap in CAPACITIES:
        out["hit_" + ("inf" if cap is None else str(cap))] = simulate(seq, capacity=cap).hit_ratio
    return out


def time_call(fn, contexts) -> tuple[float, float, object]:
    """(wall s, CPU s, plan) of one planning call."""
    w0, c0 = time.perf_counter(), time.process_time()
    plan = fn(contexts)
    return time.perf_counter() - w0, time.process_time() - c0, plan


def measure_point(contexts, repeat: int, before, peer: bool, peer_repeat: int, lengths=None) -> dict:
    """Ours, before and the peer on one batch, interleaved call by call.

    Ours and before take turns going first: the first call after the peer's run (a
    process of its own that fills the caches and both cores for seconds) takes a few
    percent longer on this machine, so always going first would tilt their ratio.
    ``lengths``: token lengths for ours and before (the peer takes none).
    """
    from cp_engine import plan_batch
    from benchmarks.peer.client import peer_plan

    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
    plans: dict[str, tuple[list, list]] = {}
    loads = []
    planners = [("ours", plan_batch)] + ([("before", before)] if before is not None else [])
    if lengths is not None:
        planners = [(m, functools.partial(fn, token_lengths=lengths)) for m, fn in planners]
    for i in range(max(repeat, peer_repeat if peer else 0)):
        loads.append(os.getloadavg()[0])
        if i < repeat:
            for m, fn in (planners if i % 2 == 0 else planners[::-1]):
                wall, cpu, plan = time_call(fn, contexts)
                runs[m].append((wall, cpu))
                plans[m] = (plan.contexts, plan.order)
        if peer and i < peer_repeat:
            res = peer_plan(contexts, use_cache=False)
            if res is not None:
                runs["peer"].append((res["seconds"], res.get("cpu_seconds", float("nan"))))
                plans["peer"] = (res["contexts"], res["order"])
    out = {"load_1min": statistics.median(loads)}
    if "before" in plans:
        # The same plan, request for request: each block order and the schedule.
        out["same_plan_as_before"] = plans["ours"] == plans["before"]
    for m, times in runs.items():
        if not times:
            continue
        out[m] = {"seconds": statistics.median(t for t, _ in times), "runs": [t for t, _ in times],
                  **quality(*plans[m])}
        cpu = [c for _, c in times if c == c]  # the peer's where its runner reports it
        if cpu:
            out[m]["cpu_seconds"] = statistics.median(cpu)
    return out


def growth(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(time) against log(N)."""
    if len(points) < 2:
        return None
    x = np.log([p[0] for p in points])
    y = np.log([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def plot(data: dict, path: Path) -> None:
    """Two panels, same axes: wall clock (with the peer's extrapolation) and CPU time."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    for ax, key, growth_key in ((axes[0], "seconds", "growth_by_method"),
                                (axes[1], "cpu_seconds", "growth_cpu_by_method")):
        for i, fam in enumerate(FAMILIES):
            color = f"C{i}"
            rows = data["families"].get(fam)
            if not rows:
                continue
            for m, style, marker in (("ours", "-", "o"), ("before", ":", "x"), ("peer", "--", "s")):
                pts = [(p["requests"], p[m][key]) for p in rows["points"]
                       if m in p and p[m].get(key, float("nan")) == p[m].get(key)]
                if not pts:
                    continue
                g = rows.get(growth_key, {}).get(m)
                label = f"{METHOD_LABELS[m]}, {LABELS[fam]}" + (f" (N^{g:.2f})" if g is not None else "")
                ax.plot(*zip(*pts), marker=marker, linestyle=style, color=color, label=label,
                        alpha=1.0 if m == "ours" else 0.7)
            extra = sorted((int(n), t) for n, t in rows.get("peer_extrapolated", {}).items())
            measured = [(p["requests"], p["peer"]["seconds"]) for p in rows["points"] if "peer" in p]
            if key == "seconds" and extra and measured:
                xs, ys = zip(*([measured[-1]] + extra))
                ax.plot(xs, ys, color=color, linestyle="--", alpha=0.3,
                        label=f"ContextPilot, {LABELS[fam]} (quadratic extrapolation)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("N requests in the batch")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5)
    axes[0].set_ylabel("planning time, s (log; median of the run's calls)")
    axes[0].set_title("Batch planning time vs N: wall clock")
    axes[1].set_title("CPU time (the peer's: its process and pool workers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _trio(p: dict, key: str, fmt: str) -> str:
    return " / ".join(format(p[m][key], fmt) if m in p else "–" for m in METHODS)


def markdown(data: dict) -> str:
    meta = data["meta"]
    before = meta.get("before")
    ns = meta["peer_ns"]
    if meta.get("peer_only_at") and len(ns) > 1:
        where = f"N = {min(ns):,} on every workload and at " + ", ".join(meta["peer_only_at"])
    else:
        where = "N = " + (", ".join(f"{n:,}" for n in ns) or "none")
    weighted = ("Both cp_engine planners plan with each block's token length (chars/4), as build_batch_messages "
                "does; the peer takes no weights and is not run. ") if meta.get("token_lengths") else ""
    out = [weighted + f"Side by side in one run: cp_engine (this tree), {'cp_engine at ' + before if before else 'no earlier planner'} "
           f"and ContextPilot 0.5.0 (fresh runs in its venv, {where}), interleaved call by call. "
           f"Times: planning call only, wall clock, median of {meta['repeat']} calls up to N = {meta['repeat_max_n']:,} "
           f"(the peer's: {meta['peer_repeat']}), 1 above; CPU time beside it (the peer's: its process and the "
           "pool workers it spreads the distance computation over, so on 2 CPUs its wall time can be below its CPU "
           "time), and both ratios: wall and CPU; "
           "load = 1-minute load average (2 CPUs shared with other agents). `~`: the peer's time extrapolated "
           "quadratically from its largest measured N, not a measurement. Quality of each plan, as scheduled: "
           "prefix-tree nodes and block hit ratio, unbounded and LRU 250 / 1,000 blocks, written ours / before / peer.",
           "", "| workload | N | compound | ours s | CPU s | before s | peer s | peer CPU s | vs peer | vs peer CPU | "
           "vs before | load | tree nodes | hit ∞ | LRU 250 | LRU 1000 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for fam in FAMILIES:
        rows = data["families"].get(fam)
        if not rows:
            continue
        for p in rows["points"]:
            ours = p["ours"]["seconds"]
            n = str(p["requests"])
            if "peer" in p:
                peer, mark = p["peer"]["seconds"], ""
            elif n in rows.get("peer_extrapolated", {}):
                peer, mark = rows["peer_extrapolated"][n], "~"
            else:
                peer, mark = None, ""
            b = p.get("before", {}).get("seconds")
            cpu = p["ours"]["cpu_seconds"]
            peer_cpu = p.get("peer", {}).get("cpu_seconds")
            out.append(
                f"| {fam} | {p['requests']:,} | {p['compound']:,} | {ours:.3f} | {cpu:.3f} | "
                + (f"{b:.3f}" if b else "–") + " | " + (f"{mark}{peer:.1f}" if peer else "–") + " | "
                + (f"{peer_cpu:.1f}" if peer_cpu else "–") + " | "
                + (f"{mark}{peer / ours:.0f}×" if peer else "–") + " | "
                + (f"{peer_cpu / cpu:.0f}×" if peer_cpu else "–") + " | " + (f"{b / ours:.2f}×" if b else "–")
                + f" | {p['load_1min']:.1f} | {_trio(p, 'tree_nodes', ',')} | {_trio(p, 'hit_inf', '.4f')} | "
                f"{_trio(p, 'hit_250', '.4f')} | {_trio(p, 'hit_1000', '.4f')} |")
    grow = []
    for fam in FAMILIES:
        g = data["families"].get(fam, {}).get("growth_by_method", {})
        gc = data["families"].get(fam, {}).get("growth_cpu_by_method", {})
        if g:
            grow.append(f"{fam}: " + ", ".join(
                f"{METHOD_LABELS[m]} N^{g[m]:.2f}" + (f" (CPU N^{gc[m]:.2f})" if gc.get(m) is not None else "")
                for m in METHODS if g.get(m) is not None))
    out += ["", "Growth (slope of log time against log N over the measured points, wall clock, CPU time in "
            "brackets; the peer's over its N only): " + "; ".join(grow) + "."]
    compared = [(fam, p) for fam in FAMILIES for p in data["families"].get(fam, {}).get("points", [])
                if "same_plan_as_before" in p]
    if compared:
        differ = [f"{fam} {p['requests']:,}" for fam, p in compared if not p["same_plan_as_before"]]
        out += ["", f"Plans (every request's block order and the schedule) the same as {before}'s: "
                + ("at every point." if not differ else "not at " + ", ".join(differ) + ".")]
    out.append("")
    return "\n".join(out)


def add_peer_extrapolation(data: dict) -> None:
    """The peer's quadratic extrapolation above its largest measured N, per family."""
    data["peer_growth"] = {}
    for fam, rows in data["families"].items():
        measured = {p["requests"]: p["peer"]["seconds"] for p in rows["points"] if "peer" in p}
        top = max(measured, default=None)
        rows["peer_extrapolated"] = {str(p["requests"]): measured[top] * (p["requests"] / top) ** 2
                                     for p in rows["points"] if top and p["requests"] > top}
        if rows["growth_by_method"].get("peer") is not None:
            data["peer_growth"][fam] = rows["growth_by_method"]["peer"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"N = {QUICK_NS}, synthetic only, no peer (seconds)")
    ap.add_argument("--ns", type=int, nargs="+", default=None, help=f"default {NS}")
    ap.add_argument("--families", nargs="+", default=None, choices=FAMILIES, help="default: all (synthetic with --quick)")
    ap.add_argument("--repeat", type=int, default=3, help="timed calls per point, median kept")
    ap.add_argument("--repeat-max-n", type=int, default=5000, help="above this N: one call per point")
    ap.add_argument("--before", default=None, help="git revision whose planner is timed beside this tree's")
    ap.add_argument("--no-peer", action="store_true", help="skip ContextPilot")
    ap.add_argument("--peer-ns", type=int, nargs="+", default=list(PEER_NS),
                    help=f"the N the peer is run at (default {PEER_NS}: minutes each on 2 shared CPUs)")
    ap.add_argument("--peer-only-at", nargs="+", default=None, metavar="FAMILY:N",
                    help="run the peer only at these points (e.g. hotpotkb:5000), besides --peer-ns 1000")
    ap.add_argument("--peer-repeat", type=int, default=3, help="peer runs per point up to --repeat-max-n (else 1)")
    ap.add_argument("--token-lengths", action="store_true",
                    help="plan with each block's token length (chars/4), as build_batch_messages does; "
                         "ours and --before only (the peer takes no weights)")
    ap.add_argument("--out", type=Path, default=None,
                    help="results JSON (default: results/scaling.json, results/scaling_quick.json with --quick)")
    ap.add_argument("--plot", action="store_true",
                    help="only redo growth, table and PNG from --out's JSON (no planning)")
    args = ap.parse_args(argv)
    args.ns = args.ns or list(QUICK_NS if args.quick else NS)
    args.families = args.families or (["synthetic"] if args.quick else list(FAMILIES))
    if args.quick or args.token_lengths:
        args.no_peer = True
    out = args.out or RESULTS / ("scaling_quick.json" if args.quick else "scaling.json")
    if args.plot:
        data, prov = read_result(out)
        write_result(out, _finish(data), table=markdown, plot=plot, prov=prov)
        return 0
    prov = provenance("benchmarks.planner.scaling", argv)
    before = load_before(args.before) if args.before else None
    from benchmarks.peer.client import SETUP_HINT, peer_available

    peer_ok = not args.no_peer and peer_available()
    if not args.no_peer and not peer_ok:
        print(f"ContextPilot venv missing: no peer column ({SETUP_HINT})", file=sys.stderr)
    data = {"meta": {"token_lengths": args.token_lengths, "repeat": args.repeat, "repeat_max_n": args.repeat_max_n, "before": args.before,
                     "peer_ns": sorted(args.peer_ns) if peer_ok else [], "peer_only_at": args.peer_only_at, "peer_repeat": args.peer_repeat},
            "families": {}}
    for fam in args.families:
        points = []
        for n in sorted(args.ns):
            if fam == "squad" and n > SQUAD_QUESTIONS:
                print(f"squad N={n:,}: skipped (SQuAD dev has {SQUAD_QUESTIONS:,} questions)", file=sys.stderr)
                continue
            contexts, compound = contexts_for(fam, n)
            small = n <= args.repeat_max_n
            lengths = token_lengths_for(fam, n, contexts) if args.token_lengths else None
            res = measure_point(contexts, args.repeat if small else 1, before, peer_ok and _peer_point(args, fam, n),
                                args.peer_repeat if small else 1, lengths)
            from cp_engine import plan_batch

            res |= {"requests": n, "compound": compound, "strategy": plan_batch(contexts, lengths).stats["strategy"],
                    "seconds": res["ours"]["seconds"], "cpu_seconds": res["ours"]["cpu_seconds"]}
            points.append(res)
            same = res.get("same_plan_as_before")
            print(f"{fam} N={n:,}: " + ", ".join(f"{m} {res[m]['seconds']:.3f} s ({res[m]['tree_nodes']:,} nodes)"
                                                 for m in METHODS if m in res)
                  + ("" if same is None else f", same plan as before: {same}")
                  + f", load {res['load_1min']:.1f}", file=sys.stderr, flush=True)
            data["families"][fam] = {"points": points}
            write_result(out, _finish(data), table=markdown, plot=plot, prov=prov)  # partial results survive
    write_result(out, _finish(data), table=markdown, plot=plot, prov=prov)
    return 0


def _peer_point(args, fam: str, n: int) -> bool:
    """Whether the peer runs at this point: ``--peer-ns``, narrowed by ``--peer-only-at``
    above the smallest of them (its large runs take minutes each on a loaded machine)."""
    if n not in args.peer_ns:
        return False
    if args.peer_only_at is None or n == min(args.peer_ns):
        return True
    return f"{fam}:{n}" in args.peer_only_at


def _finish(data: dict) -> dict:
    """Growth per family and method, the peer's extrapolation; the results page reads
    ``families[f]["growth"]`` (ours) and ``peer_growth``."""
    for rows in data["families"].values():
        rows["growth_by_method"] = {m: growth([(p["requests"], p[m]["seconds"]) for p in rows["points"] if m in p])
                                    for m in METHODS}
        # By CPU time too: on the shared machine wall time carries the load of the moment.
        rows["growth_cpu_by_method"] = {
            m: growth([(p["requests"], p[m]["cpu_seconds"]) for p in rows["points"]
                       if m in p and p[m].get("cpu_seconds", float("nan")) == p[m].get("cpu_seconds")])
            for m in METHODS}
        rows["growth"] = rows["growth_by_method"]["ours"]
    add_peer_extrapolation(data)
    return data


if __name__ == "__main__":
    sys.exit(main())
