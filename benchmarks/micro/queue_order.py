"""Per-operation cost of the cache-aware waiting order (cp_engine/queue_order.py) as the
number of waiting requests grows: it should stay flat (O(d log c), not O(n)).

    python -m benchmarks.micro.queue_order [--sizes 1000,10000,50000] [--depth 32]

Workload: requests in 64 prefix families, each key a shared family head plus a
branching tail (like block hashes of RAG prompts that share system prompt + first
documents). Prints microseconds per add / peek+pop, and the one-shot list sort
(``schedule_order``, SGLang's calc_priority path) in milliseconds.
"""
from __future__ import annotations

import argparse
import json
import random
import time

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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--depth", type=int, default=32)
    args = ap.parse_args()
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run(n, args.depth).items()}))


if __name__ == "__main__":
    main()
