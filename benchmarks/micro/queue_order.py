"""Per-operation cost of the cache-aware waiting order (cp_engine/queue_order.py) as the
number of waiting requests grows: it should stay flat (O(d log c), not O(n)).

    python -m benchmarks.micro.queue_order [--sizes 1000,10000,50000] [--depth 32]
    python -m benchmarks.micro.queue_order --quick    # 1,000 and 10,000: results/queue_order_quick.*

Workload: requests in 64 prefix families, each key a shared family head plus a
branching tail (like block hashes of RAG prompts that share system prompt + first
documents). Prints microseconds per add / peek+pop, and the one-shot list sort
(``schedule_order``, SGLang's calc_priority path) in milliseconds; results/queue_order.json,
.table.md and .png through the shared results writer.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

from benchmarks.common.results import RESULTS, provenance, write_result
from cp_engine.queue_order import PrefixScheduler, schedule_order


def keys(n: int, depth: int, seed: int = 0) -> list[tuple]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        fam = rng.randrange(64)
        head = [("f", fam, i) for i in range(depth // 2)]
        tail = [rng.randrange(4) for _ in range(depth - depth // 2)]
        out.append(tuple(head + tail))
    return out


def run(n: int, depth: int) -> dict:
    ks = keys(n, depth)
    items = [object() for _ in range(n)]
    sched = PrefixScheduler(max_wait_s=1e9)
    t0 = time.perf_counter()
    for it, k in zip(items, ks):
        sched.add(it, k)
    t1 = time.perf_counter()
    while sched:
        sched.peek()
        sched.pop()
    t2 = time.perf_counter()
    schedule_order(ks)
    t3 = time.perf_counter()
    return {"n": n, "depth": depth, "add_us": (t1 - t0) / n * 1e6, "peek_pop_us": (t2 - t1) / n * 1e6,
            "sort_ms": (t3 - t2) * 1e3}


def markdown(data: dict) -> str:
    lines = [f"Keys of depth {data['depth']} in 64 prefix families.", "",
             "| waiting requests | add µs | peek + pop µs | one-shot sort ms |", "|---|---|---|---|"]
    lines += [f"| {r['n']:,} | {r['add_us']:.2f} | {r['peek_pop_us']:.2f} | {r['sort_ms']:.1f} |" for r in data["rows"]]
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ns = [r["n"] for r in data["rows"]]
    for key, label in (("add_us", "add"), ("peek_pop_us", "peek + pop")):
        ax.plot(ns, [r[key] for r in data["rows"]], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("waiting requests")
    ax.set_ylabel("µs per operation (flat = independent of queue length)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 and 10,000 waiting requests")
    ap.add_argument("--sizes", default=None, help="default 1000,10000,50000")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--out", type=Path, help="results JSON (default: results/queue_order[_quick].json)")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.micro.queue_order", argv)
    sizes = args.sizes or ("1000,10000" if args.quick else "1000,10000,50000")
    rows = [{k: round(v, 2) if isinstance(v, float) else v for k, v in run(int(n), args.depth).items()}
            for n in sizes.split(",")]
    out = args.out or RESULTS / ("queue_order_quick.json" if args.quick else "queue_order.json")
    write_result(out, {"depth": args.depth, "rows": rows}, table=markdown, plot=plot, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
