"""Prefix trees of block orders: their size, the popularity order of tails, the schedule.

In: block orders (lists of dense block ids), per-block weights, block frequencies, or
a built ``BlockTrie`` and its requests' paths. Out: numbers and orders only; nothing
here changes its arguments. ``tree_measure`` counts the tree ``BlockTrie.insert_all``
would build, node for node, without building it. ``popularity_rank`` and
``tail_order`` define the one "most popular first, then lowest id" order every
candidate tree and the local search sort unshared tails by. ``depth_first_order`` is
the batch's execution order: each request exactly once, groups sharing a prefix
contiguous, largest subtree first.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from .trie import ROOT, BlockTrie


def whole_weights(w: list[float]) -> bool:
    """Whether every weight is a whole number and their sum is exact in a float (then
    sums of them are the same in any order)."""
    a = np.asarray(w, dtype=np.float64)
    return bool(np.all(np.mod(a, 1.0) == 0.0)) and float(np.abs(a).sum()) < 2.0 ** 53


def tree_size(orders: list[list[int]]) -> int:
    """Nodes of the prefix tree of ``orders`` (see ``tree_measure``)."""
    return tree_measure(orders)[0]


def tree_measure(orders: list[list[int]], w: list[float] | None = None) -> tuple[int, float]:
    """(nodes, total weight) of the prefix tree of ``orders``, a lighter count than
    building a BlockTrie; ``w`` is the weight per dense block id (None: 1 each).

    In sorted order each sequence shares with all earlier ones exactly its common
    prefix with its predecessor, so the tree adds its length minus that prefix; the
    sort runs in C, leaving a short Python loop per sequence.
    """
    nodes, weight = 0, 0.0
    prev: list[int] = []
    for order in sorted(orders):
        common = 0
        for a, b in zip(order, prev):
            if a != b:
                break
            common += 1
        nodes += len(order) - common
        weight += len(order) - common if w is None else sum(w[b] for b in order[common:])
        prev = order
    return nodes, weight


def live_weight(trie: BlockTrie) -> float:
    """Total weight of the trie's live nodes (tokens the cache must compute for them)."""
    return sum(trie.weight[n] for n in range(1, len(trie.parent)) if trie.is_live(n))


def popularity_rank(freq: list[int]) -> list[int]:
    """Each block's place in the order most popular first, then lowest id (the key
    ``tail_order`` sorts by, as one int so the sort needs no Python key function)."""
    f = np.asarray(freq, dtype=np.int64)
    by_rank = np.argsort(-f, kind="stable")  # stable: equal counts keep id order
    rank = np.empty(f.size, dtype=np.int64)
    rank[by_rank] = np.arange(f.size)
    return rank.tolist()


def tail_order(tail: list[int], rank: list[int]) -> list[int]:
    """``tail`` most popular first (``rank`` from ``popularity_rank``)."""
    # Unshared blocks go most-popular first so later re-insertions can hang below them.
    return sorted(tail, key=rank.__getitem__)


def depth_first_order(trie: BlockTrie, paths: list[list[int]]) -> list[int]:
    """The requests in depth-first order of their last nodes, largest subtree first.

    A node only one request passes through heads a chain down to that request's last
    node, which the walk would follow node by node with nothing else in between: the
    request is scheduled on reaching the chain's head instead.
    """
    refs = trie.refs
    ends: dict[int, list[int]] = defaultdict(list)
    alone: dict[int, int] = {}  # head of a chain only one request holds -> that request
    for r, path in enumerate(paths):
        if not path:
            ends[ROOT].append(r)
        elif refs[path[-1]] > 1:
            ends[path[-1]].append(r)
        else:
            # References only fall along a path: the chain starts at the first node
            # with one (its shared head is short, so it is found from the root side).
            i = 0
            while refs[path[i]] > 1:
                i += 1
            alone[path[i]] = r
    order: list[int] = []
    stack = [ROOT]
    children = trie.children
    while stack:
        node = stack.pop()
        r = alone.get(node)
        if r is not None:
            order.append(r)
            continue
        if node in ends:
            order.extend(ends[node])
        kids = children[node]
        if len(kids) > 1:
            # Largest subtree (most requests) first, ties to the lower number; pushed
            # reversed onto the stack. Two sorts in C: by number descending, then
            # (stable) by references.
            stack.extend(sorted(sorted(kids.values(), reverse=True), key=refs.__getitem__))
        elif kids:
            stack.extend(kids.values())
    return order
