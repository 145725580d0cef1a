"""How far is a plan from the best possible tree? Exhaustive check per component.

Requests that share no block with each other are independent, so the prefix tree's
size is the sum over connected components of the "shares a block" graph. For every
component small enough (``--max-orderings`` orderings of its requests' shared
blocks), this tries all of them and compares the smallest tree with
``cp_engine.plan_batch`` (and ContextPilot's cached plan, when present).

    python -m benchmarks.bench_optimality                 # HotpotQA pooled N=1,000
    python -m benchmarks.bench_optimality --workload synthetic --n 100

Prints one JSON line and writes benchmarks/results/optimality_<workload>.json.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from benchmarks import workloads as W
from cp_engine.planner import _tree_size, plan_batch

RESULTS = Path(__file__).resolve().parent / "results"


def components(contexts: list[list[int]]) -> list[list[int]]:
    """Request indices grouped by connected component of the shared-block graph."""
    owner = list(range(len(contexts)))

    def root(x: int) -> int:
        while owner[x] != x:
            owner[x] = owner[owner[x]]
            x = owner[x]
        return x

    first: dict[int, int] = {}
    for i, ctx in enumerate(contexts):
        for b in set(ctx):
            if b in first:
                owner[root(i)] = root(first[b])
            else:
                first[b] = i
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(contexts)):
        groups[root(i)].append(i)
    return list(groups.values())


def best_tree(shared: list[list[int]]) -> int:
    """Smallest prefix tree over all orderings of each request's shared blocks."""
    return min(_tree_size(list(o)) for o in itertools.product(*(itertools.permutations(s) for s in shared)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=("hotpotqa", "hotpotkb", "synthetic"), default="hotpotqa")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--max-orderings", type=int, default=200_000)
    args = ap.parse_args(argv)
    wl = {"hotpotqa": W.hotpotqa, "hotpotkb": W.hotpotqa_kb, "synthetic": W.synthetic}[args.workload](args.n)
    ctx = wl.contexts
    freq: dict[int, int] = defaultdict(int)
    for c in ctx:
        for b in set(c):
            freq[b] += 1
    ours = plan_batch(ctx).contexts
    peer = None
    try:
        from benchmarks.peer_client import cached_plan

        cached = cached_plan(ctx)
        peer = cached["contexts"] if cached else None
    except Exception:
        peer = None

    def shared_only(orders, members):
        return [[b for b in orders[i] if freq[b] > 1] for i in members]

    out = {"workload": wl.name, "checked_components": 0, "skipped_components": 0,
           "requests_checked": 0, "requests_sharing": 0, "ours_extra_nodes": 0, "peer_extra_nodes": 0}
    for members in components(ctx):
        if len(members) < 2:
            continue
        out["requests_sharing"] += len(members)
        shared = shared_only(ctx, members)
        if math.prod(math.factorial(len(s)) for s in shared) > args.max_orderings:
            out["skipped_components"] += 1
            continue
        best = best_tree(shared)
        out["checked_components"] += 1
        out["requests_checked"] += len(members)
        out["ours_extra_nodes"] += _tree_size(shared_only(ours, members)) - best
        if peer is not None:
            out["peer_extra_nodes"] += _tree_size(shared_only(peer, members)) - best
    if peer is None:
        out["peer_extra_nodes"] = None
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"optimality_{wl.name}.json").write_text(json.dumps(out, indent=1))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
