"""Per-operation cost of the cache-aware waiting order (hooks/scheduling.py) as the
number of waiting requests grows: it should stay flat (O(d log c), not O(n)).

    python -m benchmarks.bench_queue [--sizes 1000,10000,50000] [--depth 32]
    nice -n 5 python -m benchmarks.bench_queue --kernel     # kernel path crossover

Workload: requests in 64 prefix families, each key a shared family head plus a
branching tail (like block hashes of RAG prompts that share system prompt + first
documents). Prints microseconds per add / peek+pop, and the one-shot list sort
(``schedule_order``, SGLang's calc_priority path) in milliseconds.

``--kernel`` measures what ``hooks.scheduling.KERNEL_MIN_WAITING`` is set from:
``schedule_order(keys, last_key=...)`` with the radix walk vs with the prefix kernel
(NumPy backend) finding the last served key's group, best of three, at growing queue
lengths; ``kernel_only_ms`` is the ``topk_overlap`` call alone on keys already turned
into dense ids (a lower bound for the kernel path). Results: kernels_queue.json.
"""
from __future__ import annotations

import argparse
import json
import random
import time

from cp_engine.hooks.scheduling import PrefixScheduler, schedule_order


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


def kernel_crossover(sizes: list[int], depth: int) -> list[dict]:
    from benchmarks.bench_kernels import time_cpu as _best  # best of three after a warm-up
    from cp_engine.kernels import topk_overlap

    rows = []
    for n in sizes:
        ks = keys(n, depth)
        last = ks[n // 2]
        walk = _best(lambda: schedule_order(ks, last_key=last, kernel_min_waiting=None))
        kern = _best(lambda: schedule_order(ks, last_key=last, kernel_min_waiting=0, backend="numpy"))
        dense: dict = {}
        ids = [[dense.setdefault(p, len(dense)) for p in k] for k in ks]
        cur = [dense[p] for p in last]
        only = _best(lambda: topk_overlap([cur], ids, n, metric="prefix", backend="numpy"))
        row = {"n": n, "depth": depth, "walk_ms": walk * 1e3, "kernel_path_ms": kern * 1e3,
               "kernel_only_ms": only * 1e3}
        rows.append(row)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,10000,50000")
    ap.add_argument("--depth", type=int, default=32)
    ap.add_argument("--kernel", action="store_true", help="kernel path vs radix walk in schedule_order")
    args = ap.parse_args()
    if args.kernel:
        from pathlib import Path

        rows = kernel_crossover([64, 256, 1000, 4000, 16000, 50000], args.depth)
        out = Path(__file__).resolve().parent / "results" / "kernels_queue.json"
        out.write_text(json.dumps({"backend": "numpy", "rows": rows}, indent=1))
        print("wrote", out)
        return
    for n in (int(s) for s in args.sizes.split(",")):
        print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in run(n, args.depth).items()}))


if __name__ == "__main__":
    main()
