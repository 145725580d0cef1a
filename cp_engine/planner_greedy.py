"""The frequency-greedy candidate tree: split the batch by its most valuable shared block.

In: each request's shared blocks (``sets``: lists of distinct dense ids), a weight
per block and, optionally, the batch's ``Postings``. Out: a ``_Greedy``, each
request's shared prefix and the blocks it has left, with the size and weight of the
prefixes' tree. The split: within a group, the block worth most among its free
members ((holders - 1) x weight, ties to the lower id) goes next in each holder's
prefix, the holders form a group of their own, split later; a group stops when no
block has two free holders. Every path here (pairs as one run, small groups by
scanning, unit weights packed into ints, large groups in NumPy, the general heap)
gives that split exactly; the inputs are not modified.
"""
from __future__ import annotations

import heapq
import itertools
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from .planner_counts import count_elements
from .planner_postings import Postings
from .planner_tree import tail_order


# Groups up to this size find a block's holders by looking at each member (where the
# NumPy split below does not apply).
_GREEDY_SCAN_GROUP = 32
# Where the batch has at most _TABLE_UNIVERSE distinct blocks, groups of at least
# _TABLE_GROUP take the NumPy split (where it applies), not only those above
# _GREEDY_SCAN_GROUP: with its rows gathered by take, a step there costs less than
# scanning the members even in groups of four (the greedy split at N = 1,000:
# synthetic 5.1 -> 4.0 ms, knowledge base 3.9 -> 3.3 ms). Each group's counts and each
# step's maximum span the whole universe, so with many distinct blocks (pooled
# HotpotQA N = 5,000: 38,351) small groups keep scanning. Groups of three and pairs
# keep their set operations. Only with unit weights: under token weights each group
# and each step also recomputes a value array over the universe, and small groups
# scan for less (plan time, knowledge base N = 1,000 / 2,000: 1.06x / 1.04x faster
# scanning; SQuAD 1,000: 1.04x).
_TABLE_GROUP = 4
_TABLE_UNIVERSE = 8192


# The greedy split of a large group runs in NumPy when each request's blocks fit a
# table row of at most this many times the mean length (the table is the batch, padded).
_SPLIT_PAD = 4


class _SplitTable:
    """The greedy split of large groups in NumPy, over the batch as a padded table:
    each step takes the block worth most ((free holders - 1) x weight, ties to the
    lower id) and hands it to its free holders, as the heap of the general loop does.

    ``for_batch`` gives None where it does not apply: weights negative or not finite
    (there the heap's lazy order is not the value order) or lengths too uneven.
    """

    def __init__(self, postings: Postings, wv: np.ndarray, longest: int) -> None:
        sizes, blocks, indptr = postings.sizes, postings.blocks, postings.indptr
        self.n, self.universe = sizes.size, postings.freq.size
        # Row r: request r's blocks, padded with `universe` (a column that never counts).
        self.table = np.full((self.n, longest), self.universe, dtype=np.int64)
        self.table[postings.owner, np.arange(blocks.size) - indptr[postings.owner]] = blocks
        self.wv = np.append(wv[:self.universe], 0.0)
        self.postings = postings
        # Unit weights: a block's value is its count less one, so the first largest
        # count is the first largest value and no value array is kept.
        self.unit = bool(np.all(wv[:self.universe] == 1.0))

    @classmethod
    def for_batch(cls, postings: Postings, w: list[float]) -> "_SplitTable | None":
        sizes = postings.sizes
        longest = int(sizes.max()) if sizes.size else 0
        if not sizes.size or longest * sizes.size > _SPLIT_PAD * max(postings.blocks.size, 1):
            return None
        wv = np.asarray(w, dtype=np.float64)
        if wv.size < postings.freq.size or not np.all(np.isfinite(wv)) or wv.min(initial=0.0) < 0:
            return None
        return cls(postings, wv, longest)

    def split(self, group: list[int], whole: bool, w: list[float], rem: list[set[int]],
              prefix: list[list[int]], stack: list[list[int]]) -> tuple[int, float]:
        """Split ``group`` (``whole``: the batch, nothing taken yet); returns the
        (nodes, weight) handed out."""
        members = np.asarray(group, dtype=np.int64)
        if whole:
            count = np.append(self.postings.freq, 0)
        else:
            count = np.bincount(self.table.take(members, 0).ravel(), minlength=self.universe + 1)
            count[prefix[group[0]]] = 0  # every member holds the group's prefix, taken already
        count[self.universe] = 0
        wv, table, unit = self.wv, self.table, self.unit
        value = count if unit else np.where(count > 1, (count - 1) * wv, -np.inf)
        free = np.zeros(self.n, dtype=bool)
        free[members] = True
        holders, starts = self.postings.holders, self.postings.lists()[1]
        nodes, weight = 0, 0.0
        while True:
            b = int(value.argmax())
            if count[b] < 2:
                return nodes, weight
            h = holders[starts[b]:starts[b + 1]]
            sub = h[free[h]]
            free[sub] = False
            taken = table.take(sub, 0).ravel()  # (take: a third of the time of table[sub])
            np.subtract.at(count, taken, 1)
            if not unit:
                left = count[taken]
                value[taken] = np.where(left > 1, (left - 1) * wv[taken], -np.inf)
            _give(b, sub.tolist(), rem, prefix, stack)
            nodes += 1
            weight += w[b]


@dataclass
class _Greedy:
    """The greedy split's result: ``prefix[r]``, the shared prefix request ``r`` gets;
    ``rest[r]``, its other blocks; ``nodes`` and ``weight``, the prefix tree of all
    prefixes (a node per block each split or pair run hands out, and their weight)."""

    prefix: list[list[int]]
    rest: list[set[int]]
    nodes: int
    weight: float

    def tree(self, w: list[float] | None) -> tuple[int, float]:
        """``tree_measure`` of the greedy orders (each prefix, then its rest), counted
        without building them: no rest block is ever shared (requests left with the same
        prefix share no rest block, and a request holding a block its group split on was
        taken by that split), so the tree is the prefix tree plus one node per rest block.
        ``w``: the weights (None: 1 each); the sum is in a different order than
        ``tree_measure``'s, which is the same number only for whole weights."""
        nodes = self.nodes + sum(map(len, self.rest))
        if w is None:
            return nodes, float(nodes)
        return nodes, self.weight + sum(w[b] for left in self.rest for b in left)

    def orders(self, rank: list[int], sorted_from: list[int] | None = None) -> list[list[int]]:
        """Each request's greedy order: its prefix, then the rest most popular first.
        ``sorted_from``: filled with where each rest starts."""
        if sorted_from is not None:
            sorted_from.extend(map(len, self.prefix))
        return [head + tail_order(list(left), rank) if left else list(head)
                for head, left in zip(self.prefix, self.rest)]


def greedy_prefixes(sets: list[list[int]], w: list[float], postings: Postings | None = None) -> _Greedy:
    """Frequency-greedy split: the shared prefix each request gets from the greedy tree.

    ``postings``: the batch's postings of ``sets`` (the first group is the whole batch,
    whose postings they are).
    """
    prefix: list[list[int]] = [[] for _ in sets]
    rem = [set(s) for s in sets]
    stack = [list(range(len(sets)))]
    nodes, weight = 0, 0.0
    first = True
    table = None  # the NumPy split for large groups, where it applies
    unit = w.count(1.0) == len(w)  # (counted in C)
    while stack:
        group = stack.pop()
        if len(group) < 2:
            continue
        if len(group) == 2:
            # Two requests: the split takes their common blocks one per level, most
            # valuable first (value w[b], ties to the lower id), as one run.
            a, b = group
            common = rem[a] & rem[b]
            if common:
                run = sorted(common, key=lambda x: (-w[x], x))
                prefix[a] += run
                prefix[b] += run
                rem[a] -= common
                rem[b] -= common
                nodes += len(run)
                weight += sum(w[x] for x in run)
            continue
        # A small group counts its blocks in C and, at each pop, finds the block's free
        # holders by looking at each free member (a few); a large one keeps its
        # postings and counts up to date instead.
        small = len(group) <= _GREEDY_SCAN_GROUP
        whole = first and postings is not None  # the whole batch, nothing taken yet
        if first and postings is not None:
            table = _SplitTable.for_batch(postings, w)
        first = False
        if table is not None and (not small or (len(group) >= _TABLE_GROUP and table.universe <= _TABLE_UNIVERSE and table.unit)):
            split = table.split(group, whole, w, rem, prefix, stack)
            nodes += split[0]
            weight += split[1]
            continue
        if small and unit:
            given = (_split_three_unit(group, rem, prefix, stack) if len(group) == 3
                     else _split_small_unit(group, rem, prefix, stack, len(w)))
            nodes += given
            weight += given  # (a sum of 1.0s: the same float)
            continue
        if small:
            counts = {}
            count_elements(counts, itertools.chain.from_iterable(map(rem.__getitem__, group)))
            free = group
        else:
            if whole:  # the batch's postings
                holders, starts = postings.lists()
                postings_of = {b: holders[starts[b]:starts[b + 1]]
                               for b in np.flatnonzero(postings.freq > 1).tolist()}
            else:
                postings_of = defaultdict(list)
                for r in group:
                    for b in rem[r]:
                        postings_of[b].append(r)
            counts = {b: len(p) for b, p in postings_of.items() if len(p) >= 2}
            taken: set[int] = set()
        # Value of putting b next for its whole group: (copies − 1) × tokens saved.
        heap = [(-(c - 1) * w[b], b) for b, c in counts.items() if c > 1]
        heapq.heapify(heap)
        while heap:
            neg, b = heapq.heappop(heap)
            if small:
                sub = [r for r in free if b in rem[r]]
                c = len(sub)
            else:
                c = counts[b]
            if c < 2:
                continue
            value = -(c - 1) * w[b]
            if value != neg:  # stale entry: fewer free holders than when pushed
                heapq.heappush(heap, (value, b))
                continue
            if small:
                free = [r for r in free if b not in rem[r]]
                if len(free) < 2:
                    # No block has two free holders left: every later pop would be skipped.
                    heap = ()
            else:
                sub = [r for r in postings_of[b] if r not in taken]
                taken.update(sub)
                for r in sub:
                    for x in rem[r]:
                        if x in counts:
                            counts[x] -= 1
            _give(b, sub, rem, prefix, stack)
            nodes += 1
            weight += w[b]
    return _Greedy(prefix, rem, nodes, weight)


def _split_small_unit(group: list[int], rem: list[set[int]], prefix: list[list[int]],
                      stack: list[list[int]], universe: int) -> int:
    """``greedy_prefixes``' split of a small group where every weight is 1; returns the
    blocks handed out. The heap loop there, its entries ``(-(count - 1), block)`` packed
    into one int, ``(len(group) + 1 - count) * universe + block``, ordered as the
    tuples are (most free holders first, then the lower id): ints compare faster."""
    counts: dict[int, int] = {}
    count_elements(counts, itertools.chain.from_iterable(map(rem.__getitem__, group)))
    most = len(group) + 1
    heap = [(most - c) * universe + b for b, c in counts.items() if c > 1]
    heapq.heapify(heap)
    free = group
    given = 0
    while heap:
        level, b = divmod(heapq.heappop(heap), universe)
        sub = [r for r in free if b in rem[r]]
        c = len(sub)
        if c < 2:
            continue
        if most - c != level:  # stale entry: fewer free holders than when pushed
            heapq.heappush(heap, (most - c) * universe + b)
            continue
        free = [r for r in free if b not in rem[r]]
        if len(free) < 2:
            heap = ()  # no block has two free holders left
        _give(b, sub, rem, prefix, stack)
        given += 1
    return given


def _split_three_unit(group: list[int], rem: list[set[int]], prefix: list[list[int]],
                      stack: list[list[int]]) -> int:
    """``_split_small_unit`` of a group of three, by set operations; returns the blocks
    handed out (0 or 1). Its first pop is the lowest block all three hold, else the
    lowest two of them hold; either leaves fewer than two free members, so nothing more
    is handed out until the new group is split."""
    a, b, c = group
    ra, rb, rc = rem[a], rem[b], rem[c]
    ab = ra & rb
    every = ab & rc
    if every:
        _give(min(every), [a, b, c], rem, prefix, stack)
        return 1
    ac, bc = ra & rc, rb & rc
    if not (ab or ac or bc):
        return 0
    x = min(itertools.chain(ab, ac, bc))
    _give(x, [a, b] if x in ab else [a, c] if x in ac else [b, c], rem, prefix, stack)
    return 1


def _give(b: int, members: list[int], rem: list[set[int]], prefix: list[list[int]], stack: list[list[int]]) -> None:
    """The greedy split hands ``b`` to ``members``: next in each one's prefix, out of
    its rest; they form a group of their own, split next."""
    for r in members:
        rem[r].discard(b)
        prefix[r].append(b)
    stack.append(members)
