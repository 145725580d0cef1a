"""A cluster's shared-block counts against every live cluster, in one NumPy pass.

The clustering asks, after each merge, which live clusters share the most blocks
with the new one. Counting posting lists in Python costs one step per posting entry;
where blocks are held by many clusters (dense sharing) that is hundreds to thousands
of steps per question. ``SharedCounts`` keeps a block × cluster 0/1 table instead, so
one question is a gather-and-sum of the cluster's block rows: a few vector passes over
one row per block, whatever the postings' lengths.

The table holds every cluster the clustering can create (N requests + N - 1 merges)
as a column from the start; a cluster's column is filled when it is created and a
merged-away cluster is masked out by ``alive``, never cleared.

``count_elements(mapping, iterable)`` adds one to ``mapping[x]`` per ``x``: the C
loop behind ``Counter.update`` without its per-call checks, which the greedy split
and the merge loop count blocks and partners with.
"""
from __future__ import annotations

import itertools
import math
from typing import Iterable

import numpy as np

from .planner_postings import Postings
from .planner_tree import whole_weights

try:
    from _collections import _count_elements as count_elements
except ImportError:  # pragma: no cover - Pythons without the C helper
    def count_elements(mapping: dict, iterable) -> None:
        get = mapping.get
        for x in iterable:
            mapping[x] = get(x, 0) + 1


class SharedCounts:
    """Block × cluster membership table for unit-weight overlap counts.

    ``blocks``: the dense block ids that can be shared (each a row; one more row at
    the end, no block's, is left for a caller's per-cluster term); ``clusters``:
    how many cluster numbers there can be. ``add(c, members)`` records cluster ``c``
    (live); ``kill(c)`` marks it merged away; ``count(x, members)`` gives, for every
    cluster number, how many of ``members`` (x's blocks) the live cluster holds
    (0 for dead clusters and for ``x`` itself).
    """

    def __init__(self, blocks: Iterable[int], clusters: int, universe: int, dtype=np.uint8) -> None:
        rows = np.full(universe, -1, dtype=np.int64)
        blocks = np.fromiter(blocks, dtype=np.int64)
        rows[blocks] = np.arange(blocks.size)
        self.rows = rows
        self.table = np.zeros((blocks.size + 1, clusters), dtype=dtype)
        # What a holder's cell reads, per row: None for 1 (counts), else the block's
        # weight (see ``weighted``).
        self.row_weight: np.ndarray | None = None
        self.alive = np.zeros(clusters, dtype=np.uint8)
        # Per cluster, its rows, where known (None until first needed): a cluster asked
        # about again needs no conversion of its blocks.
        self.cells: list[np.ndarray | None] = [None] * clusters

    @classmethod
    def for_requests(cls, sets: list[list[int]], clusters: int, universe: int) -> "SharedCounts":
        """The table with requests ``0..len(sets)-1`` recorded (``sets``: their blocks)."""
        sizes = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
        flat = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int64, count=int(sizes.sum()))
        out = cls(np.unique(flat), clusters, universe)
        out.table[out.rows[flat], np.repeat(np.arange(len(sets)), sizes)] = 1
        out.alive[:len(sets)] = 1
        return out

    @classmethod
    def for_postings(cls, postings: "Postings", clusters: int) -> "SharedCounts":
        """``for_requests`` of the sets ``postings`` indexes (its universe), from its arrays."""
        out = cls(np.flatnonzero(postings.freq), clusters, postings.freq.size)
        out.table[out.rows[postings.blocks], postings.owner] = 1
        out.alive[:postings.sizes.size] = 1
        return out

    @classmethod
    def weighted(cls, postings: "Postings", clusters: int, weights: np.ndarray, dtype) -> "SharedCounts":
        """``for_postings`` whose cells hold each block's whole weight instead of 1, so
        ``count`` sums the weight a live cluster shares (``dtype``: wide enough for any
        one cluster's sum)."""
        out = cls(np.flatnonzero(postings.freq), clusters, postings.freq.size, dtype)
        out.row_weight = np.append(weights[np.flatnonzero(postings.freq)], 0).astype(dtype)
        out.table[out.rows[postings.blocks], postings.owner] = weights[postings.blocks].astype(dtype)
        out.alive[:postings.sizes.size] = 1
        return out

    def add(self, c: int, members: Iterable[int]) -> None:
        r = self.rows[np.fromiter(members, dtype=np.int64)]
        self.table[r, c] = 1 if self.row_weight is None else self.row_weight[r]
        self.alive[c] = 1
        self.cells[c] = r

    def kill(self, c: int) -> None:
        self.alive[c] = 0

    def count(self, x: int, members) -> np.ndarray:
        """Shared-block count of x's ``members`` with every live cluster but x.

        Exact while x holds fewer than 256 blocks (uint8 sums); the caller counts
        larger clusters its own way. A ``weighted`` table gives the weight shared, in
        its own type.
        """
        r = self.rows[np.fromiter(members, dtype=np.int64, count=len(members))]
        counts = np.add.reduce(self.table.take(r, axis=0), axis=0, dtype=self.table.dtype)  # (take: faster than table[r])
        counts *= self.alive
        counts[x] = 0
        return counts


def whole_and_at_least_one(weights: np.ndarray, blocks: np.ndarray) -> bool:
    """Whether every weight of ``blocks`` is a whole number of at least 1, all of them
    summing below 2**53: then sums of them are exact in any order (as integers or as
    floats) and a positive sum marks a partner that shares a block, so a table of sums
    gives a per-entry loop's answer."""
    used = weights[blocks]
    return not used.size or (used.min() >= 1 and whole_weights(used))


def best_summed(ids: np.ndarray, sums: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` of ``ids`` with the largest ``sums``, ties to the lower id (a sort by
    (sum descending, id), as ``heapq.nlargest`` with the key ``(sum, -id)`` orders them)."""
    return ids[np.lexsort((ids, -sums))[:k]]


def best_counted(counts: np.ndarray, top: int, floor: float, k: int) -> list[int]:
    """The clusters counted at least ``floor``: all of them, ascending, when there are at
    most ``k``; else the ``k`` with the most, ties to the lower number, in that order.

    ``top``: ``counts.max()``. The same list as sorting them by (count descending,
    number), but counts are small integers, so the best ``k`` are taken level by level
    from ``top`` down: a few vector passes instead of a sort of every cluster above the
    floor (hundreds where blocks are held by hundreds of clusters).
    """
    floor = math.ceil(floor)
    ranked = np.flatnonzero(counts >= floor)
    if ranked.size <= k:
        return ranked.tolist()
    out: list[int] = []
    for level in range(top, floor - 1, -1):
        out += np.flatnonzero(counts == level)[:k - len(out)].tolist()
        if len(out) == k:
            break
    return out
