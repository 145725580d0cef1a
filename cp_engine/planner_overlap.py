"""Every request's best clustering partner at once, counted in NumPy.

``first_partners(sets, hot_cap)`` answers, for each request ``x`` whose blocks are all
held by at most ``hot_cap`` requests, the question the clustering asks first: which
other requests share the most blocks with ``x`` (unit weights). It gives the same
answer as counting ``x``'s posting lists one request at a time, for all requests in a
few array passes: the pairs ``(x, y)`` of each block's postings are sorted and
counted, a chunk of rows at a time so memory stays bounded (about ``chunk_pairs``
pairs at once), and no N×N matrix is held.
"""
from __future__ import annotations

import itertools

import numpy as np

# Pairs sorted at once (int64 keys): 32 MB.
CHUNK_PAIRS = 1 << 22


def first_partners(sets: list[list[int]], hot_cap: int, candidates: int,
                   chunk_pairs: int = CHUNK_PAIRS) -> list[tuple[int, int, np.ndarray] | None]:
    """Per request: ``(top, y, ties)`` or None where a block of it is hot.

    ``sets``: distinct dense block ids per request. ``top``: most blocks ``x`` shares
    with any other request (0: none, then ``y`` is -1). ``ties``: every other request
    sharing ``top`` blocks, ascending. ``y``: among the ``candidates`` lowest-numbered
    ties, the one with the fewest blocks (then the lowest number), the tie rule of
    the one-at-a-time search. None: some block of ``x`` is held by more than
    ``hot_cap`` requests, so the caller searches for ``x`` its own way.
    """
    n = len(sets)
    if n == 0:
        return []
    sizes = np.fromiter(map(len, sets), dtype=np.int64, count=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(sizes, out=indptr[1:])
    blocks = np.fromiter(itertools.chain.from_iterable(sets), dtype=np.int64, count=int(indptr[-1]))
    owner = np.repeat(np.arange(n, dtype=np.int64), sizes)
    nblocks = int(blocks.max()) + 1 if blocks.size else 0
    freq = np.bincount(blocks, minlength=nblocks)
    # Postings: the requests holding each block, ascending (stable sort by block).
    holders = owner[np.argsort(blocks, kind="stable")]
    post_start = np.zeros(nblocks + 1, dtype=np.int64)
    np.cumsum(freq, out=post_start[1:])
    hot = np.bincount(owner, weights=(freq[blocks] > hot_cap), minlength=n) > 0

    out: list[tuple[int, int, np.ndarray] | None] = [None] * n
    # Rows per chunk: cut where the running pair count passes chunk_pairs.
    pairs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, weights=freq[blocks], minlength=n), out=pairs[1:])
    lo = 0
    while lo < n:
        hi = max(lo + 1, int(np.searchsorted(pairs, pairs[lo] + chunk_pairs, side="right")) - 1)
        hi = min(n, hi)
        _chunk(lo, hi, n, sizes, indptr, blocks, owner, freq, holders, post_start, hot, candidates, out)
        lo = hi
    return out


def _chunk(lo, hi, n, sizes, indptr, blocks, owner, freq, holders, post_start, hot, candidates, out) -> None:
    """Fill ``out[lo:hi]``: count the pairs of rows lo..hi-1 against all requests."""
    e0, e1 = int(indptr[lo]), int(indptr[hi])
    b = blocks[e0:e1]
    f = freq[b]
    total = int(f.sum())
    # Entry e expands to its block's postings: positions post_start[b]..+f, flattened.
    first = np.cumsum(f) - f
    pos = np.arange(total, dtype=np.int64) + np.repeat(post_start[b] - first, f)
    keys = np.repeat(owner[e0:e1] - lo, f) * n + holders[pos]
    # Sorting the pair keys counts them (runs of equal keys) without a dense table.
    keys.sort()
    if keys.size:
        starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
        counts = np.diff(np.append(starts, keys.size))
        keys = keys[starts]
    else:
        counts = keys
    xs, ys = np.divmod(keys, n)
    other = ys != xs + lo  # a request is not its own partner
    xs, ys, counts = xs[other], ys[other], counts[other]
    width = hi - lo
    top = np.zeros(width, dtype=np.int64)
    np.maximum.at(top, xs, counts)
    tied = counts == top[xs]
    r, c = xs[tied], ys[tied]  # by row, then partner ascending: the keys were sorted
    bounds = np.searchsorted(r, np.arange(width + 1))
    # Tie rule: the `candidates` lowest numbers, then fewest blocks, then lowest number.
    rank = np.arange(r.size) - bounds[r]
    big = np.iinfo(np.int64).max
    key = np.where(rank < candidates, sizes[c] * (n + 1) + c, big)
    best = np.full(width, big, dtype=np.int64)
    np.minimum.at(best, r, key)
    tops = top.tolist()
    picks = (best % (n + 1)).tolist()
    starts = bounds.tolist()
    for i in range(width):
        x = lo + i
        if hot[x]:
            continue
        if tops[i] == 0:
            out[x] = (0, -1, c[:0])
        else:
            out[x] = (tops[i], picks[i], c[starts[i]:starts[i + 1]])
