"""Scale-out simulation: R replicas behind a router, each with its own LRU prefix cache
and (plugin arms) its own cp_engine index, on the engine benchmark's batched Zipf RAG.

No servers: ``benchmarks.scaleout.replica`` models each replica (token-bounded prefix
cache at block granularity, the plugin's online reordering with eviction sync) and
``cp_engine.scaleout.routing`` supplies the policies. Requests go out one at a time in
workload order. Arms (policy, what the router sees, plugin on each replica):

- ``round_robin``: no look at the request.
- ``prefix_aware``: a cache-aware router on the prompt text. Plugin off, that text has
  the blocks in retrieval order. Plugin on, blocks travel in ``context_blocks`` and
  the prompt text holds only the system prompt and question (``prefix_blind``), unless
  the client also renders the block set in canonical order for the router
  (``prefix_canonical``: ``cp_engine.scaleout.key.canonical_order``).
- ``block_affinity``: consistent hashing of the block-set key (bottom-1 MinHash of the
  block ids) with bounded load.

Per arm and replica count: hit ratio (prompt tokens served from cache), recomputed
tokens, and load skew: the hottest replica's share of requests (and of recomputed
tokens), also as a multiple of the even share 1/R.

    python -m benchmarks.scaleout.simulate                # N=8,000, R=1,8,16,32,64
    python -m benchmarks.scaleout.simulate --quick        # N=1,000, R=1,8: results/scaleout_sim_quick.*
    python -m benchmarks.scaleout.simulate --capacity 0   # unbounded caches
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

from cp_engine.blocks import block_id, estimate_tokens
from cp_engine.scaleout.key import canonical_order, key_hash
from cp_engine.scaleout.routing import RouteRequest, hottest_share, make_policy

from .replica import Replica

SYSTEM_UNIT = ("system",)


@dataclass(frozen=True)
class Arm:
    name: str
    policy: str
    plugin: bool
    view: str  # what a prefix-aware router matches: "retrieval", "blind" or "canonical"


ARMS = (
    Arm("round_robin", "round_robin", False, "retrieval"),
    Arm("prefix_aware", "prefix_aware", False, "retrieval"),
    Arm("block_affinity", "block_affinity", False, "retrieval"),
    Arm("round_robin+plugin", "round_robin", True, "blind"),
    Arm("prefix_blind+plugin", "prefix_aware", True, "blind"),
    Arm("prefix_canonical+plugin", "prefix_aware", True, "canonical"),
    Arm("block_affinity+plugin", "block_affinity", True, "blind"),
)


@dataclass(frozen=True)
class SimRequest:
    blocks: tuple[int, ...]  # block ids in retrieval order
    tokens: tuple[int, ...]
    question: int  # the question's tokens (never shared)


def requests_of(rag) -> list[SimRequest]:
    """The workload's requests with real block ids (BLAKE2b of each paragraph's text)."""
    out = []
    for docs, q in zip(rag.docs, rag.queries):
        out.append(SimRequest(tuple(block_id(t) for t in docs), tuple(estimate_tokens(t) for t in docs),
                              estimate_tokens(q)))
    return out


def router_view(req: SimRequest, i: int, view: str, system_tokens: int, lead: int = 1) -> RouteRequest:
    head, tail = [(SYSTEM_UNIT, system_tokens)], [(("q", i), req.question)]
    if view == "retrieval":
        body = list(zip(req.blocks, req.tokens))
    elif view == "canonical":
        lens = dict(zip(req.blocks, req.tokens))
        body = [(b, lens[b]) for b in canonical_order(req.blocks)]
    elif view == "blind":
        body = []
    else:
        raise ValueError(view)
    pairs = head + body + tail
    return RouteRequest(tuple(u for u, _ in pairs), tuple(n for _, n in pairs), key_hash(req.blocks, lead))


WORKLOADS = ("rag_zipf", "hotpot_kb")


def load_workload(name: str, n: int):
    from benchmarks.common import workloads as W
    from benchmarks.engine.workloads import Rag, rag_zipf

    if name == "rag_zipf":
        return rag_zipf(n)
    wl = W.hotpotqa_kb(n)
    return Rag(f"hotpot_kb_{n}_k10", wl, wl.texts, list(wl.queries))


def run_arm(arm: Arm, reqs: list[SimRequest], replicas: int, capacity: int | None, system_tokens: int,
            factor: float, threshold: float, lead: int = 1) -> dict:
    """One arm over the requests in order (``lead``: ids in the block-set key)."""
    tree = capacity if capacity is not None else 1 << 40
    policy = make_policy(arm.policy, replicas, tree_tokens=tree, factor=factor, threshold=threshold)
    pool = [Replica(capacity, arm.plugin) for _ in range(replicas)]
    head = [(SYSTEM_UNIT, system_tokens)]
    chosen, recomputed = [], [0] * replicas
    prompt = served = 0
    t0 = time.perf_counter()
    for i, req in enumerate(reqs):
        r = policy.route(router_view(req, i, arm.view, system_tokens, lead))
        total, hit = pool[r].serve(req.blocks, req.tokens, head, [(("q", i), req.question)])
        chosen.append(r)
        prompt, served = prompt + total, served + hit
        recomputed[r] += total - hit
    share = hottest_share(chosen, replicas)
    return {"arm": arm.name, "policy": arm.policy, "plugin": arm.plugin, "view": arm.view, "replicas": replicas,
            "prompt_tokens": prompt, "cached_tokens": served, "recomputed_tokens": prompt - served,
            "hit_ratio": served / prompt if prompt else 0.0, "hottest_share": share,
            "hottest_share_x_even": share * replicas,
            "hottest_recompute_share": max(recomputed) / max(1, prompt - served),
            "seconds": round(time.perf_counter() - t0, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=1,000, R=1,8")
    ap.add_argument("--n", type=int, help="requests (default 8,000; 1,000 with --quick)")
    ap.add_argument("--replicas", help="comma-separated replica counts (default 1,8,16,32,64)")
    ap.add_argument("--capacity", type=int, default=65536,
                    help="prefix-cache tokens per replica (0: unbounded); the router's trees get the same bound")
    ap.add_argument("--factor", type=float, default=1.25, help="load bound: at most factor x the even share")
    ap.add_argument("--threshold", type=float, default=0.5,
                    help="prefix_aware: least match share to follow the cache (SGLang/vllm-router default 0.5)")
    ap.add_argument("--workload", choices=WORKLOADS, default="rag_zipf",
                    help="rag_zipf: the engine benchmark's Zipf RAG; hotpot_kb: HotpotQA questions, BM25 "
                         "top-10 over a 200-question knowledge base (related questions retrieve overlapping sets)")
    ap.add_argument("--arms", default=",".join(a.name for a in ARMS))
    ap.add_argument("--out", help="results JSON (default results/scaleout_sim[_quick].json)")
    ap.add_argument("--plot", action="store_true", help="redraw table and PNG from the JSON only")
    args = ap.parse_args(argv)

    from benchmarks.common.results import RESULTS, provenance, redraw, write_result
    from benchmarks.engine.arms import SYSTEM

    out = Path(args.out) if args.out else RESULTS / ("scaleout_sim_quick.json" if args.quick else "scaleout_sim.json")
    if args.plot:
        redraw(out, table=markdown, plot=plot)
        return 0
    prov = provenance("benchmarks.scaleout.simulate", argv)
    n = args.n or (1000 if args.quick else 8000)
    counts = [int(x) for x in (args.replicas or ("1,8" if args.quick else "1,8,16,32,64")).split(",")]
    wanted = set(args.arms.split(","))
    unknown = wanted - {a.name for a in ARMS}
    if unknown:
        ap.error(f"unknown arms: {', '.join(sorted(unknown))}")
    capacity = args.capacity or None
    rag = load_workload(args.workload, n)
    reqs = requests_of(rag)
    system_tokens = estimate_tokens(SYSTEM)
    rows = []
    for replicas in counts:
        for arm in (a for a in ARMS if a.name in wanted):
            row = run_arm(arm, reqs, replicas, capacity, system_tokens, args.factor, args.threshold)
            rows.append(row)
            print(f"R={replicas:>3} {arm.name:<26} hit {row['hit_ratio']:.3f} hottest {row['hottest_share']:.3f} "
                  f"({row['hottest_share_x_even']:.2f}x even) {row['seconds']}s", flush=True)
    data = {"workload": rag.name, "requests": n, "capacity_tokens": capacity, "factor": args.factor,
            "threshold": args.threshold, "system_tokens": system_tokens, "rows": rows}
    write_result(out, data, table=markdown, plot=plot, prov=prov)
    return 0


def markdown(data: dict) -> str:
    cap = f"{data['capacity_tokens']:,}-token" if data["capacity_tokens"] else "unbounded"
    lines = [f"{data['workload']}, {data['requests']:,} requests in order, {cap} LRU prefix cache per replica "
             f"(block granularity), load bound {data['factor']}x the even share, prefix_aware threshold "
             f"{data['threshold']}. Ratios: recomputed tokens of round_robin (same plugin setting, or plugin off) / the arm's.",
             "",
             "| replicas | arm | hit ratio | recomputed tok | vs round-robin | vs plugin-off round-robin "
             "| hottest share (x even) | hottest recompute share |", "|---|---|---|---|---|---|---|---|"]
    rr = {(r["replicas"], r["plugin"]): r for r in data["rows"] if r["policy"] == "round_robin"}

    def ratio(base: dict | None, r: dict) -> str:
        return f"{base['recomputed_tokens'] / r['recomputed_tokens']:.2f}×" if base and r["recomputed_tokens"] else "–"

    for r in data["rows"]:
        same, off = rr.get((r["replicas"], r["plugin"])), rr.get((r["replicas"], False))
        lines.append(f"| {r['replicas']} | {r['arm']} | {r['hit_ratio']:.3f} | {r['recomputed_tokens']:,} | "
                     f"{ratio(same, r)} | {ratio(off, r)} | {r['hottest_share']:.3f} ({r['hottest_share_x_even']:.2f}×) | "
                     f"{r['hottest_recompute_share']:.3f} |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    arms = list(dict.fromkeys(r["arm"] for r in data["rows"]))
    for arm in arms:
        rows = sorted((r for r in data["rows"] if r["arm"] == arm), key=lambda r: r["replicas"])
        xs = [r["replicas"] for r in rows]
        style = "-" if rows[0]["plugin"] else "--"
        left.plot(xs, [r["hit_ratio"] for r in rows], style, marker="o", label=arm)
        right.plot(xs, [r["hottest_share_x_even"] for r in rows], style, marker="o", label=arm)
    left.set(xscale="log", xlabel="replicas", ylabel="prompt tokens served from cache",
             title="hit ratio (dashed: plugin off)")
    right.set(xscale="log", xlabel="replicas", ylabel="hottest replica's share x replicas",
              title="load skew (1 = even)")
    for ax in (left, right):
        xs = sorted({r["replicas"] for r in data["rows"]})
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.grid(alpha=0.3)
    left.legend(fontsize=7)
    fig.suptitle(f"{data['workload']}: {data['requests']:,} requests, "
                 f"{data['capacity_tokens'] or 'unbounded'} tokens per replica", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
