"""The batch's postings (which requests hold each block), built once in NumPy.

The greedy split, the clustering and ``first_partners`` all start from the same
inverted index of the batch; building it once with a stable sort costs far less
than appending every (block, request) entry in Python, once per user.
"""
from __future__ import annotations

import itertools

import numpy as np


class Postings:
    """Block postings of ``sets`` (distinct dense block ids per request).

    Arrays: ``sizes[r]`` blocks of request ``r``; ``blocks`` every request's blocks
    end to end, request ``r``'s at ``indptr[r]:indptr[r + 1]``, and ``owner`` the
    request of each entry; ``freq[b]`` requests holding block ``b``; ``holders``
    those requests, ascending, at ``starts[b]:starts[b + 1]`` (``starts`` as an
    array; ``lists()`` gives both as Python lists, for slicing).
    """

    def __init__(self, sets: list[list[int]], universe: int | None = None) -> None:
        sizes = np.fromiter(map(len, sets), dtype=np.int64, count=len(sets))
        blocks = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int64, count=int(sizes.sum()))
        self._build(blocks, sizes, universe)

    @classmethod
    def from_flat(cls, blocks: np.ndarray, sizes: np.ndarray, universe: int | None = None) -> "Postings":
        """The postings of the sets ``blocks`` holds end to end, ``sizes[r]`` for request ``r``."""
        out = cls.__new__(cls)
        out._build(np.asarray(blocks, dtype=np.int64), np.asarray(sizes, dtype=np.int64), universe)
        return out

    def _build(self, blocks: np.ndarray, sizes: np.ndarray, universe: int | None) -> None:
        n = sizes.size
        self.sizes = sizes
        self.indptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.indptr[1:])
        self.blocks = blocks
        if universe is None:
            universe = int(blocks.max()) + 1 if blocks.size else 0
        self.owner = np.repeat(np.arange(n, dtype=np.int64), self.sizes)
        self.freq = np.bincount(self.blocks, minlength=universe)
        self.holders = _holders(self.blocks, self.owner, universe, n)
        self.starts = np.zeros(universe + 1, dtype=np.int64)
        np.cumsum(self.freq, out=self.starts[1:])
        self._lists: tuple[list[int], list[int]] | None = None

    def lists(self) -> tuple[list[int], list[int]]:
        """``(holders, starts)`` as Python lists (converted once, on first use)."""
        if self._lists is None:
            self._lists = (self.holders.tolist(), self.starts.tolist())
        return self._lists


def _holders(blocks: np.ndarray, owner: np.ndarray, universe: int, n: int) -> np.ndarray:
    """``owner`` ordered by block, equal blocks in request order (each block's holders
    ascend): ``owner[np.argsort(blocks, kind="stable")]``, by a faster sort.

    A stable sort of 64-bit keys is a merge sort; 16-bit keys get NumPy's radix sort
    (20x faster on 10,000 entries here). Otherwise the (block, request) pairs are unique
    keys, so any sort of ``block * n + request`` puts them in the same order.
    """
    if universe <= 1 << 16:
        return owner[np.argsort(blocks.astype(np.uint16), kind="stable")]
    if universe * max(n, 1) < 1 << 62:
        return np.sort(blocks * n + owner) % n
    return owner[np.argsort(blocks, kind="stable")]
