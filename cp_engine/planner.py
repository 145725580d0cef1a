"""Offline batch planner: reorder each request's blocks and schedule the batch.

``plan_batch(contexts)`` returns a ``BatchPlan`` whose ``contexts[i]`` is a
permutation of ``contexts[i]`` and whose ``order`` is a permutation of
``range(len(contexts))``. Served in ``order``, the reordered requests share long
block prefixes, so an engine's prefix cache reuses their KV.

How: with an unbounded cache, blocks served from cache = total blocks − nodes of the
prefix tree of all served sequences, so the planner builds a small tree:
0. blocks held by a single request are set aside (they go last, in retrieval order):
   they can never be shared, and on real retrieval they are most of the blocks;
1. candidate trees: a frequency-greedy split (most valuable shared block first,
   recursively per group), and — where rarer shared blocks carry the sharing, as with
   real BM25 retrieval — bottom-up clustering that merges the most alike requests;
   with token lengths the candidates are compared by token weight (what the cache
   serves), else by node count;
2. local search: take one request out of the tree and put it back below the deepest
   node whose path it fully contains — this never grows the tree, and it repairs
   requests that the first pass tore from the group they share most with; it runs
   on the smaller candidate tree only;
3. a depth-first schedule, largest subtree first, so a bounded LRU cache still holds
   the shared prefix while its group runs.
No N×N matrix is built: work is proportional to the total number of blocks.

This module holds the public API, input checks and weights, and the order of the
steps; each step is a module of its own: ``planner_greedy`` and ``planner_merge``
(the two candidate trees), ``planner_local`` (the local search), ``planner_tree``
(tree sizes without a tree, the tails' order, the schedule).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
from dataclasses import dataclass, field
from typing import Callable, Hashable, Mapping, Sequence

import numpy as np

from .planner_greedy import greedy_prefixes
from .planner_local import local_search
from .planner_merge import cluster_by_knn, cluster_by_postings, cluster_cap, table_fits
from .planner_postings import Postings
from .planner_tree import depth_first_order, live_weight, popularity_rank, tree_measure, whole_weights
from .trie import BlockTrie


@dataclass(frozen=True)
class BatchPlan:
    """Result of ``plan_batch``: per-request block order and execution order."""

    contexts: list[list]
    order: list[int]
    stats: dict = field(default_factory=dict, compare=False)

    def scheduled(self) -> list[list]:
        """Reordered contexts in execution order."""
        return [self.contexts[i] for i in self.order]


@dataclass(frozen=True)
class PartnerSearch:
    """A k-nearest-partner search the clustering can use instead of posting lists.

    The core has none of its own; a scoring backend supplies it (the overlap kernels:
    ``cp_engine.kernels.planning.PARTNER_SEARCH``, plugged into ``cp_engine.plan_batch``).
    ``find(sets, k, weights)``: for every request (a list of distinct dense block ids),
    the indices of up to ``k`` other requests sharing the most block weight
    (``weights[b]``: tokens of block ``b``), best first, -1 in empty slots.
    ``use_for(n)``: whether ``partners="auto"`` takes it for a batch of ``n`` requests
    whose hot blocks rule out the posting-list search.
    """

    find: Callable[[list[list[int]], int, list[float]], Sequence[Sequence[int]]]
    use_for: Callable[[int], bool]


def _validate(contexts) -> list[list]:
    """The contexts as lists (TypeError where a context is not a list of blocks)."""
    if isinstance(contexts, (str, bytes)) or not hasattr(contexts, "__len__"):
        raise TypeError("plan_batch expects a list of block lists")
    out = []
    for i, ctx in enumerate(contexts):
        if type(ctx) is not list:  # (a list is only read: no copy)
            if isinstance(ctx, (str, bytes)) or not hasattr(ctx, "__iter__"):
                raise TypeError(f"contexts[{i}] must be a list of blocks, got {type(ctx).__name__}")
            ctx = list(ctx)
        out.append(ctx)
    return out


def _unhashable(ctxs: list[list]) -> None:
    """Raise the TypeError that names the first context holding an unhashable block."""
    for i, ctx in enumerate(ctxs):
        for b in ctx:
            try:
                hash(b)
            except TypeError:
                raise TypeError(f"contexts[{i}] holds an unhashable block of type {type(b).__name__}") from None


def _repeating(flat: np.ndarray, sizes: np.ndarray, universe: int) -> list[bool]:
    """Per request (``sizes[r]`` dense ids of ``flat`` each, end to end), whether it
    holds a block twice: equal neighbours among the sorted (request, block) keys."""
    owner = np.repeat(np.arange(sizes.size, dtype=np.int64), sizes)
    keys = np.sort(owner * universe + flat)
    twice = keys[1:] == keys[:-1]
    out = [False] * sizes.size
    if twice.any():
        for r in np.unique(keys[1:][twice] // universe).tolist():
            out[r] = True
    return out


def _weights_for(contexts: list[list], token_lengths, dense: dict) -> list[float]:
    """Per-dense-id token weight (1.0 each when no lengths are given)."""
    w = [1.0] * len(dense)
    if token_lengths is None:
        return w
    if isinstance(token_lengths, Mapping):
        for block, d in dense.items():
            w[d] = float(token_lengths.get(block, 1.0))
        return w
    if len(token_lengths) != len(contexts):
        raise ValueError("token_lengths must be a mapping or one list per context")
    for i, (ctx, lens) in enumerate(zip(contexts, token_lengths)):
        if len(lens) != len(ctx):
            raise ValueError(f"token_lengths[{i}] has {len(lens)} entries for {len(ctx)} blocks")
        for b, n in zip(ctx, lens):
            w[dense[b]] = float(n)
    return w


# kNN-graph clustering (partners from a PartnerSearch) for batches whose hot blocks
# make the posting-list search too costly. Measured with the overlap kernels'
# search (`python -m benchmarks.planner.partners`,
# benchmarks/results/planner_partners.table.md): on synthetic N=5,000 the kNN path beats
# the greedy tree (hit 0.318 vs 0.314) but the NumPy kernel alone takes about as long
# as the whole greedy planner on 2 CPU cores, so that search tells "auto" to take it
# only when it runs on a GPU, and "auto" asks only from KNN_MIN_REQUESTS, below which
# the posting search is cheap; ``partners="kernel"`` forces it anywhere.
KNN_MIN_REQUESTS = 1024
KNN_PARTNERS = 16


def plan_batch(contexts, token_lengths=None, *, local_search_passes: int = 2,
               strategy: str = "auto", partners: str = "auto",
               partner_search: PartnerSearch | None = None) -> BatchPlan:
    """Plan a batch for prefix sharing (see module docstring).

    ``contexts``: list of block lists (blocks are any hashables, e.g. text or ids;
    equal blocks are the same block). ``token_lengths``: optional mapping
    block → tokens, or one list of lengths per context; weights the choice of shared
    prefixes. Repeated blocks inside one request keep their first place in the shared
    order; the extra copies go to the end of that request.

    ``strategy``: ``"greedy"`` (top-down split by the most valuable shared block),
    ``"cluster"`` (bottom-up merging of the most alike requests), or ``"auto"``: both
    where clustering can pay off, keeping the smaller prefix tree.

    ``partners``: where the clustering finds candidate partners: ``"postings"``
    (inverted index, hot blocks capped), ``"kernel"`` (kNN graph from
    ``partner_search``, which must then be given), or ``"auto"``: postings, and
    ``partner_search`` for large hot-block batches where its ``use_for`` says so.
    ``cp_engine.plan_batch`` passes the overlap kernels' search (GPU when available,
    else NumPy); without one this core planner only uses its posting lists.
    """
    if strategy not in ("auto", "greedy", "cluster"):
        raise ValueError(f"strategy must be auto, greedy or cluster, got {strategy!r}")
    if partners not in ("auto", "postings", "kernel"):
        raise ValueError(f"partners must be auto, postings or kernel, got {partners!r}")
    if partners == "kernel" and partner_search is None:
        raise ValueError("partners='kernel' needs a partner_search (cp_engine.plan_batch passes the kernels' one)")
    with _gc_paused():
        return _plan(contexts, token_lengths, local_search_passes, strategy, partners, partner_search)


@contextlib.contextmanager
def _gc_paused():
    """Cyclic GC off for the block, restored after (even on error).

    Planning allocates millions of small lists, sets and tuples and builds no
    reference cycles, so the collector's passes over them only cost time (about 10%
    of a knowledge-base N=5,000 plan); everything is freed by reference counting.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _plan(contexts, token_lengths, local_search_passes: int, strategy: str, partners: str,
          partner_search: PartnerSearch | None) -> BatchPlan:
    """plan_batch's body, arguments already checked."""
    ctxs = _validate(contexts)
    # Dense ids in first-seen order, numbered in C: the first-seen keys, then 0, 1, ...
    try:
        dense: dict[Hashable, int] = dict.fromkeys(itertools.chain.from_iterable(ctxs))
    except TypeError:
        _unhashable(ctxs)
        raise
    dense = dict(zip(dense, range(len(dense))))
    originals: list[Hashable] = list(dense)
    number = dense.__getitem__
    extras: list[list[int]] | None = None  # each request's repeated blocks, where any
    # The whole batch numbered in one pass; requests holding a block twice (found in
    # NumPy, not by a set per request) are numbered again one by one.
    sizes = np.fromiter(map(len, ctxs), dtype=np.int64, count=len(ctxs))
    flat = np.fromiter(map(number, itertools.chain.from_iterable(ctxs)), dtype=np.int64,
                       count=int(sizes.sum()))
    repeats = _repeating(flat, sizes, len(originals))
    if any(repeats):
        ids: list[list[int]] = []
        extras = []
        for ctx, repeat in zip(ctxs, repeats):
            numbered = list(map(number, ctx))
            if not repeat:
                ids.append(numbered)
                extras.append([])
                continue
            seen: set[int] = set()
            uniq, dup = [], []
            for d in numbered:
                (dup if d in seen else uniq).append(d)
                seen.add(d)
            ids.append(uniq)
            extras.append(dup)
        sizes = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(sizes.sum()))
    w = _weights_for(ctxs, token_lengths, dense)
    # A block held by one request can never be shared: plan only the shared blocks
    # and append each request's lone blocks, in their original order, at the end. The
    # tree is then exactly the shared-block tree plus one node per lone block, and
    # on sparse real retrieval (most blocks lone) every later step does far less work.
    counts = np.bincount(flat, minlength=len(originals))
    freq = counts.tolist()
    shared = counts[flat] > 1
    # Split each request's ids by the mask in NumPy: both parts keep their order.
    ends = np.zeros(len(ctxs) + 1, dtype=np.int64)
    np.cumsum(sizes, out=ends[1:])
    kept = np.zeros(flat.size + 1, dtype=np.int64)
    np.cumsum(shared, out=kept[1:])
    cut = kept[ends]  # shared ids before each request's start
    flat_shared = flat[shared]
    shared_ids, lone_ids = flat_shared.tolist(), flat[~shared].tolist()
    cuts, lone_cuts = cut.tolist(), (ends - cut).tolist()
    sets = [shared_ids[cuts[i]:cuts[i + 1]] for i in range(len(ctxs))]
    lone = [lone_ids[lone_cuts[i]:lone_cuts[i + 1]] for i in range(len(ctxs))]
    lone_count = len(lone_ids)

    postings = Postings.from_flat(flat_shared, cut[1:] - cut[:-1], len(originals))
    rank = popularity_rank(freq)
    # Candidates' orders; the greedy one is built only if it is the one kept.
    candidates: list[tuple[str, list[list[int]] | None]] = []
    greedy = None
    if strategy in ("auto", "greedy"):
        greedy = greedy_prefixes(sets, w, postings)
        candidates.append(("greedy", None))
    cap = cluster_cap(freq) if strategy == "auto" else max(freq, default=1)
    if cap is not None and cap < max(freq, default=1) and w.count(1.0) == len(w) and table_fits(len(sets), freq):
        # The cap bounds Python's posting counts; with unit weights and the count table
        # the long postings are counted in vector passes instead, so no block is left
        # out and every cluster gets its exact best partners (synthetic N = 2,000: a
        # smaller tree, and the ranked searches the cap forced cost more than the table).
        cap = max(freq)
    overlaps: list = []  # each request's first partners, when the clustering counts them
    held: list = []  # the requests' Membership, when the clustering's count table holds it
    # Per candidate, where each order's sorted tail starts (for the local search).
    sorted_from: dict[str, list[int]] = {}
    use_knn = partners == "kernel" or (
        partners == "auto" and strategy == "auto" and cap is None and len(sets) >= KNN_MIN_REQUESTS
        and any(f > 1 for f in freq) and partner_search is not None and partner_search.use_for(len(sets)))
    if strategy != "greedy" and use_knn:
        knn = partner_search.find(sets, KNN_PARTNERS, w)
        candidates.append(("cluster_knn", cluster_by_knn(sets, w, freq, knn, candidates=KNN_PARTNERS)))
    elif strategy == "cluster" or (strategy == "auto" and cap is not None):
        sorted_from["cluster"] = []
        candidates.append(("cluster", cluster_by_postings(sets, w, freq, hot_cap=cap, overlaps=overlaps,
                                                           postings=postings, rank=rank,
                                                           sorted_from=sorted_from["cluster"],
                                                           membership=held)))

    # Local search only on the smaller candidate tree: its gains are small next to the
    # gap between the candidates (measured on synthetic, HotpotQA and knowledge-base
    # workloads, the smaller tree before local search was always the smaller after).
    # "Smaller" is what the cache must compute: token weight when lengths are given,
    # node count otherwise. They disagree on the engine benchmark's Zipf RAG batch
    # (N=400): the clustered tree has 1% more nodes than the greedy one yet shares 6.6%
    # more tokens (chars/4 lengths; +4% cached tokens in vLLM's 128-token blocks).
    weighted = token_lengths is not None and w.count(1.0) != len(w)
    lone_weight = sum(w[b] for solo in lone for b in solo) if weighted else 0.0
    whole = not weighted or whole_weights(w)  # then a tree's weight sums the same in any order
    built = []
    tried = {}
    tries = {}
    for name, orders in candidates:
        size, cost = 0, 0.0
        if len(candidates) > 1:
            if orders is None and whole:
                size, cost = greedy.tree(w if weighted else None)
            elif whole:
                # The clustering's tree is usually the one kept: build it now and read
                # its size, rather than measure it and build it again.
                trie = BlockTrie()
                tries[name] = (trie, trie.insert_all(orders, w))
                size, cost = trie.size, trie.total_weight if weighted else float(trie.size)
            else:
                if orders is None:
                    orders = greedy.orders(rank, sorted_from.setdefault(name, []))
                size, cost = tree_measure(orders, w if weighted else None)
        tried[name] = {"tree_nodes_before_local_search": size + lone_count}
        if weighted and len(candidates) > 1:
            tried[name]["tree_tokens_before_local_search"] = cost + lone_weight
        built.append((cost, len(built), name, orders))
    _, _, name, orders = min(built)
    if orders is None:
        orders = greedy.orders(rank, sorted_from.setdefault(name, []))
    if name in tries:
        trie, paths = tries[name]
    else:
        trie = BlockTrie()
        paths = trie.insert_all(orders, w)
    tried[name]["tree_nodes_before_local_search"] = trie.size + lone_count
    passes = (local_search(trie, orders, paths, w, freq, local_search_passes,
                            overlaps if len(overlaps) == len(orders) else None, rank=rank,
                            sorted_from=sorted_from.get(name), held=held[0] if held else None)
              if local_search_passes else 0)
    tried[name].update(tree_nodes=trie.size + lone_count, passes=passes)
    if weighted:
        tried[name]["tree_tokens"] = live_weight(trie) + lone_weight
    schedule = depth_first_order(trie, paths)

    # Back to the caller's blocks (a map over the list's item lookup: no Python step per block).
    original = originals.__getitem__
    if extras is None:
        out = [list(map(original, o + solo if solo else o)) for o, solo in zip(orders, lone)]
    else:
        out = [list(map(original, itertools.chain(o, solo, extra))) for o, solo, extra in zip(orders, lone, extras)]
    total = len(shared_ids) + lone_count
    tree_nodes = trie.size + lone_count
    stats = {
        "requests": len(ctxs),
        "unique_blocks": len(originals),
        "total_blocks": total,
        "strategy": name,
        "strategies": tried,
        "tree_nodes": tree_nodes,
        # Exact for a block-level cache with unlimited capacity (distinct blocks only).
        "predicted_hit_ratio": (total - tree_nodes) / total if total else 0.0,
    }
    return BatchPlan(contexts=out, order=schedule, stats=stats)
