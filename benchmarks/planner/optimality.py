"""How far is a plan from the best possible tree? Exhaustive check per component.

Requests that share no block with each other are independent, so the prefix tree's
size is the sum over connected components of the "shares a block" graph. For every
component small enough (``--max-orderings`` orderings of its requests' shared
blocks), this tries all of them and compares the smallest tree with
``cp_engine.plan_batch`` (and ContextPilot's cached plan, when present).

    python -m benchmarks.planner.optimality                 # HotpotQA pooled N=1,000
    python -m benchmarks.planner.optimality --workload synthetic --n 100
    python -m benchmarks.planner.optimality --quick      # synthetic N=20: results/optimality_quick.*

Components too large to enumerate go to an exact branch and bound
(``exact_best_hits``); where its node budget runs out they keep an upper bound on
their hits instead (``hit_upper_bound``, or what the search proved beyond it). So
the run also bounds the best hit count any prefix plan can reach on the whole
workload (the optimum where proven, the bound elsewhere): if even that is below a
target, no planner can meet it.

Writes benchmarks/results/optimality_<workload>.json and its table (the shared results writer).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import math
import operator
import sys
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.common import workloads as W
from benchmarks.common.results import provenance, write_result
from cp_engine import plan_batch
from cp_engine.planner_tree import tree_size



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


def min_hitting_set(sets: list[frozenset]) -> int:
    """Fewest blocks such that every set contains one of them (exact branch and bound).

    Lower bound for pruning: a greedy packing of pairwise disjoint sets, each of
    which needs its own block.
    """
    forced = {next(iter(s)) for s in sets if len(s) == 1}
    rest = [s for s in sets if not (s & forced)]
    best = [len(rest)]  # one block per set always works

    def solve(open_sets: list[frozenset], used: int) -> None:
        if not open_sets:
            best[0] = min(best[0], used)
            return
        taken: set = set()
        packing = 0
        for s in sorted(open_sets, key=len):
            if not (s & taken):
                taken |= s
                packing += 1
        if used + packing >= best[0]:
            return
        pick_from = min(open_sets, key=len)
        count = Counter(b for s in open_sets for b in s)
        for b in sorted(pick_from, key=lambda b: (-count[b], b)):
            solve([s for s in open_sets if b not in s], used + 1)

    solve(rest, 0)
    return len(forced) + best[0]


def _forest_edges(n: int, edges: list[tuple[int, int]]) -> int:
    """Edges of a spanning forest of the graph on ``n`` vertices (n minus its components)."""
    owner = list(range(n))

    def root(x: int) -> int:
        while owner[x] != x:
            owner[x] = owner[owner[x]]
            x = owner[x]
        return x

    joined = 0
    for i, j in edges:
        a, b = root(i), root(j)
        if a != b:
            owner[a] = b
            joined += 1
    return joined


def hit_upper_bound(shared: list[list[int]]) -> int:
    """Upper bound on the hits (blocks served by a shared node) of any plan of these requests.

    ``shared``: each request's blocks that some other request also has (only those can
    lie on a shared path). Hits = sum over depths d of (requests reaching depth d −
    distinct nodes at depth d). Depth 1: the distinct first blocks form a hitting set
    of the requests' block sets, so at most n − (minimum hitting set). Depth d ≥ 2:
    requests under one node share its d blocks, so each node's requests are a clique
    of the graph "shares ≥ d blocks", and the hits at that depth are at most the edges
    of a spanning forest of it.
    """
    sets = [frozenset(s) for s in shared if s]
    if len(sets) < 2:
        return 0
    bound = len(sets) - min_hitting_set(sets)
    overlap = {(i, j): len(sets[i] & sets[j]) for i, j in itertools.combinations(range(len(sets)), 2)}
    depth = 2
    while True:
        edges = [pair for pair, k in overlap.items() if k >= depth]
        if not edges:
            return bound
        bound += _forest_edges(len(sets), edges)
        depth += 1


class BudgetExceeded(Exception):
    """The exact search visited its node budget before it proved an optimum."""


def _bits(mask: int):
    """Yield the single-bit masks (blocks) of ``mask``, lowest first."""
    while mask:
        low = mask & -mask
        yield low
        mask ^= low


def _drop_private(group: set[int]) -> tuple[int, set[int]]:
    """Remove blocks held by one request only; returns (their count, reduced requests).

    A block b only one request has costs exactly one node: deleting b from that path
    removes ≥ 1 node (each b node merges into its parent), and putting b last adds
    exactly one leaf. Identical requests can follow one path, so duplicates (and
    requests left empty) are dropped at no cost.
    """
    cost = 0
    while True:
        seen = twice = 0
        for m in group:
            twice |= seen & m
            seen |= m
        private = seen & ~twice
        if not private:
            return cost, group
        cost += private.bit_count()
        group = {m & ~private for m in group} - {0}


def _split(group: set[int]) -> list[list[int]]:
    """Connected components of the "shares a block" relation among ``group``."""
    comps: list[tuple[int, list[int]]] = []
    for m in group:
        union, members = m, [m]
        keep = []
        for cu, cm in comps:
            if cu & m:
                union |= cu
                members += cm
            else:
                keep.append((cu, cm))
        comps = keep + [(union, members)]
    return [members for _, members in comps]


def _reduce(masks) -> tuple[int, list[tuple[int, ...]]]:
    """Split a forest problem into a fixed cost and irreducible components.

    Contract: min trie size of ``masks`` (requests as block bitmasks) == the returned
    cost + the sum of the returned components' min trie sizes. Each component is a
    sorted tuple of ≥ 2 distinct, connected requests in which every block is held by
    ≥ 2 requests and no block by all of them.
    """
    cost = 0
    pending = [set(masks) - {0}]
    out = []
    while pending:
        extra, group = _drop_private(pending.pop())
        cost += extra
        for comp in _split(group):
            common = functools.reduce(operator.and_, comp)
            if len(comp) == 1:
                cost += comp[0].bit_count()
            elif common:
                # A block every request of a component has can go first for all of them:
                # deleting it from any plan saves ≥ 1 node, and one shared root costs 1.
                cost += common.bit_count()
                pending.append({m & ~common for m in comp})
            else:
                out.append(tuple(sorted(comp)))
    return cost, out


def _union_size(masks) -> int:
    """Distinct blocks of ``masks``: each needs ≥ 1 node, a lower bound on the tree."""
    return functools.reduce(operator.or_, masks, 0).bit_count()


class _TrieSearch:
    """Memoized branch and bound for the smallest prefix forest of block sets.

    A state is a tuple of block bitmasks (one per request, each ordered freely). At the
    root every request picks a first block and requests picking the same block b share
    one node, so min size = min over (b, group G of requests holding b) of
    1 + size(G minus b) + size(the others). The others may pick b again in their own
    subproblem; that plan has two b roots, which the trie would merge into a smaller
    one, so it never undercuts the true optimum and the recursion stays exact.
    """

    def __init__(self, budget: int):
        self.budget = budget
        self.exact: dict[tuple[int, ...], int] = {}
        self.lower: dict[tuple[int, ...], int] = {}

    def floor(self, state: tuple[int, ...]) -> int:
        """A proven lower bound on one component's min size (memoized).

        Each block needs a node (the union), and hits can't beat ``hit_upper_bound``.
        """
        if state not in self.lower:
            hits = hit_upper_bound([list(_bits(m)) for m in state])
            self.lower[state] = max(_union_size(state), sum(m.bit_count() for m in state) - hits)
        return self.lower[state]

    def bound(self, masks) -> int:
        """A proven lower bound on the min forest size of ``masks``."""
        cost, comps = _reduce(masks)
        return cost + sum(self.floor(c) for c in comps)

    def forest(self, masks, ub: int) -> int:
        """Min forest size of ``masks`` if it is < ``ub``; otherwise a proven lower bound ≥ ``ub``."""
        cost, comps = _reduce(masks)
        lbs = [self.floor(c) for c in comps]
        total = cost + sum(lbs)
        for comp, lb in zip(comps, lbs):
            if total >= ub:
                return total
            # This component gets whatever room the others' lower bounds leave.
            total += self.solve(comp, ub - (total - lb)) - lb
        return total

    def _pick(self, state: tuple[int, ...]) -> int:
        """The request whose first block has the fewest (block, group) branches."""
        count = Counter(b for m in state for b in _bits(m))
        return min(state, key=lambda m: (sum(1 << (count[b] - 1) for b in _bits(m)), m.bit_count()))

    def solve(self, state: tuple[int, ...], ub: int) -> int:
        """Like ``forest`` for one irreducible component (a ``_reduce`` output)."""
        if state in self.exact:
            return self.exact[state]
        lb = self.floor(state)
        if lb >= ub:
            return lb
        self.budget -= 1
        if self.budget < 0:
            raise BudgetExceeded
        best = ub
        first = self._pick(state)
        for b in _bits(first):
            holders = [m for m in state if m & b and m != first]
            others = [m for m in state if not m & b]
            # Larger groups first: sharing is what makes trees small, so the incumbent drops early.
            for size in range(len(holders), -1, -1):
                for joined in itertools.combinations(holders, size):
                    rest = others + [m for m in holders if m not in joined]
                    rest_lb = self.bound(rest)
                    under = self.forest([m ^ b for m in (first, *joined)], best - 1 - rest_lb)
                    if 1 + under + rest_lb >= best:
                        continue
                    best = min(best, 1 + under + self.forest(rest, best - 1 - under))
        if best < ub:
            self.exact[state] = best
        else:
            self.lower[state] = ub
        return best


def _masks(shared: list[list[int]]) -> list[int]:
    """Each request's blocks as a bitmask (blocks relabelled 0..m-1); rejects repeated blocks."""
    labels = {b: 1 << i for i, b in enumerate(sorted({b for s in shared for b in s}))}
    if any(len(set(s)) != len(s) for s in shared):
        raise ValueError("a request repeats a block")
    return [sum(labels[b] for b in s) for s in shared]


def exact_best_hits(shared: list[list[int]], incumbent_hits: int = 0, budget: int = 200_000) -> tuple[int, bool]:
    """Most hits (blocks − tree nodes) any ordering of ``shared`` can reach: (bound, exact).

    Contract: ``bound`` ≥ the true optimum always; ``exact`` says it is the optimum.
    ``incumbent_hits``: hits of a known plan (a valid lower end; 0 if none). The search
    raises a proven lower bound on the tree size one node at a time, starting from
    ``hit_upper_bound``: each round asks only for a tree of that size, which prunes hard,
    and its memo carries over. When ``budget`` search nodes run out, the last proven
    bound is returned with ``exact`` False.
    """
    total = sum(map(len, shared))
    masks = _masks(shared)
    search = _TrieSearch(budget)
    floor = total - hit_upper_bound(shared)  # proven: no tree is smaller
    while floor < total - incumbent_hits:
        try:
            size = search.forest(masks, floor + 1)
        except BudgetExceeded:
            return total - floor, False
        if size <= floor:
            return total - size, True
        floor = size
    return total - floor, True


def best_tree(shared: list[list[int]]) -> int:
    """Smallest prefix tree over all orderings of each request's shared blocks."""
    return min(tree_size(list(o)) for o in itertools.product(*(itertools.permutations(s) for s in shared)))


def markdown(out: dict) -> str:
    """Hits of our plan, the peer's and the best any prefix plan can reach."""
    peer = out["peer_hits"]
    lines = ["| workload | blocks | cp_engine hits | ContextPilot hits | best possible (upper bound) | "
             "best / ContextPilot | components enumerated / branch and bound (exact) / bounded |",
             "|---|---|---|---|---|---|---|"]
    ratio = out.get("max_ratio_vs_peer_upper_bound")
    bounded = out["skipped_components"] - out["solved_exactly"]
    lines.append(f"| {out['workload']} | {out['total_blocks']:,} | {out['ours_hits']:,} | "
                 + (f"{peer:,}" if peer is not None else "–") + f" | {out['max_hits_upper_bound']:,} | "
                 + (f"{ratio:.4f}×" if ratio is not None else "–")
                 + f" | {out['checked_components']} / {out['solved_exactly']} / {bounded} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="synthetic N=20 (seconds)")
    ap.add_argument("--workload", choices=("hotpotqa", "hotpotkb", "synthetic"), default=None,
                    help="default hotpotqa (synthetic with --quick)")
    ap.add_argument("--n", type=int, default=None, help="default 1000 (20 with --quick)")
    ap.add_argument("--out", type=Path, help="results JSON (default: results/optimality_<workload>.json)")
    ap.add_argument("--max-orderings", type=int, default=200_000)
    # Search nodes per skipped component: the small ones close in < 100; more buys
    # nothing on the 169-request HotpotQA component but minutes.
    ap.add_argument("--exact-budget", type=int, default=500)
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.planner.optimality", argv)
    args.workload = args.workload or ("synthetic" if args.quick else "hotpotqa")
    args.n = args.n or (20 if args.quick else 1000)
    wl = {"hotpotqa": W.hotpotqa, "hotpotkb": W.hotpotqa_kb, "synthetic": W.synthetic}[args.workload](args.n)
    ctx = wl.contexts
    freq: dict[int, int] = defaultdict(int)
    for c in ctx:
        for b in set(c):
            freq[b] += 1
    ours = plan_batch(ctx).contexts
    peer = None
    try:
        from benchmarks.peer.client import cached_plan

        cached = cached_plan(ctx)
        peer = cached["contexts"] if cached else None
    except Exception:
        peer = None

    def shared_only(orders, members):
        return [[b for b in orders[i] if freq[b] > 1] for i in members]

    total_blocks = sum(len(c) for c in ctx)
    out = {"workload": wl.name, "checked_components": 0, "skipped_components": 0,
           "requests_checked": 0, "requests_sharing": 0, "ours_extra_nodes": 0, "peer_extra_nodes": 0,
           "total_blocks": total_blocks, "ours_hits": total_blocks - tree_size(ours),
           "peer_hits": total_blocks - tree_size(peer) if peer is not None else None,
           "max_hits_upper_bound": 0, "solved_exactly": 0, "skipped": []}
    for members in components(ctx):
        if len(members) < 2:
            continue
        out["requests_sharing"] += len(members)
        shared = shared_only(ctx, members)
        if math.prod(math.factorial(len(s)) for s in shared) > args.max_orderings:
            out["skipped_components"] += 1
            ours_hits = sum(map(len, shared)) - tree_size(shared_only(ours, members))
            # Our plan is a valid incumbent: the search only has to close the gap above it.
            bound, exact = exact_best_hits(shared, ours_hits, args.exact_budget)
            out["max_hits_upper_bound"] += bound
            out["solved_exactly"] += exact
            out["skipped"].append({"requests": len(members), "hit_upper_bound": bound, "exact": exact,
                                   "ours_hits": ours_hits})
            continue
        best = best_tree(shared)
        out["max_hits_upper_bound"] += sum(map(len, shared)) - best
        out["checked_components"] += 1
        out["requests_checked"] += len(members)
        out["ours_extra_nodes"] += tree_size(shared_only(ours, members)) - best
        if peer is not None:
            out["peer_extra_nodes"] += tree_size(shared_only(peer, members)) - best
    if peer is None:
        out["peer_extra_nodes"] = None
    else:  # the best ratio to the peer any prefix plan could reach on this workload
        out["max_ratio_vs_peer_upper_bound"] = round(out["max_hits_upper_bound"] / max(out["peer_hits"], 1), 4)
    name = args.out or ("optimality_quick" if args.quick else f"optimality_{wl.name}")
    write_result(name, out, table=markdown, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
