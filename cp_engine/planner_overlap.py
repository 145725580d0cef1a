"""Every request's best clustering partner at once, counted in NumPy.

``first_partners(sets, hot_cap)`` answers, for each request ``x`` whose blocks are all
held by at most ``hot_cap`` requests, the question the clustering asks first: which
other requests share the most blocks with ``x`` (unit weights). It gives the same
answer as counting ``x``'s posting lists one request at a time, for all requests in a
few array passes: the pairs ``(x, y)`` of each block's postings are counted a chunk
of rows at a time so memory stays bounded (about ``chunk_pairs`` pairs or table cells
at once), and no N×N matrix is held. A chunk whose pairs are dense (many per partner
column) is counted into a rows × N table with one ``bincount``, its most popular
blocks as bits (a popcount of two requests' words per cell, where NumPy has one); a
sparse one by sorting its pair keys, so neither the table nor the sort grows past the
pairs' order.
"""
from __future__ import annotations

import math

import numpy as np

from .planner_counts import best_counted, best_summed, whole_and_at_least_one
from .planner_postings import Postings

# Pairs counted at once (int64 keys, 256 KB): small enough that a chunk's arrays
# stay in cache; per-chunk Python costs are small next to that (on the loaded 2-CPU
# machine, knowledge base N=5,000: 0.09 s at 2**15 pairs, 0.22 s at 2**22).
CHUNK_PAIRS = 1 << 15
# Cells of a dense count table at once (int64, 2 MB).
CHUNK_CELLS = 1 << 18
# A chunk is counted in a dense rows × N table when the table has at most this many
# cells per pair: a bincount pass and a row maximum cost far less per cell than a sort
# per key, and popular blocks become bit columns there (measured: synthetic N=1,000,
# 0.4 cells per pair, 4x faster dense; SQuAD dev top-12, ~5 cells per pair, 10.1 ->
# 7.2 ms at N=1,000 and 47 -> 28 ms at 3,000 dense; the knowledge base, ~10 cells
# per pair, sorted and dense alike).
DENSE_CELLS_PER_PAIR = 8
# In a dense count, blocks held by at least this share of the requests are counted as
# bit columns: per request a row of 64-bit words, and per table cell an AND and a
# popcount of two rows. Such a block costs f**2 pair keys but only n**2 / 64 word
# pairs (measured here: synthetic N=1,000 15 -> 6.5 ms, N=2,000 62 -> 23 ms at 1/25;
# 1/10 and 1/50 slower).
BIT_SHARE = 1 / 25
# Cells of a dense chunk's table when bit columns are counted: every cell reads the
# words, so smaller chunks stay in cache (2**15 and 2**16 alike, 2**17 twice as slow).
BIT_CHUNK_CELLS = 1 << 16
_POPCOUNT = getattr(np, "bitwise_count", None)  # NumPy 2.0 and later; else no bit columns


def first_partners(sets: list[list[int]], hot_cap: int, candidates: int,
                   chunk_pairs: int = CHUNK_PAIRS,
                   dense_cells_per_pair: float = DENSE_CELLS_PER_PAIR,
                   postings: Postings | None = None,
                   answer_hot: bool = False,
                   bit_share: float | None = BIT_SHARE,
                   ranked: list | None = None) -> list[tuple[int, int, list[int]] | None]:
    """Per request: ``(top, y, ties)`` or None where a block of it is hot.

    ``sets``: distinct dense block ids per request. ``top``: most blocks ``x`` shares
    with any other request (0: none, then ``y`` is -1). ``ties``: every other request
    sharing ``top`` blocks, ascending. ``y``: among the ``candidates`` lowest-numbered
    ties, the one with the fewest blocks (then the lowest number), the tie rule of
    the one-at-a-time search. None: some block of ``x`` is held by more than
    ``hot_cap`` requests, so the caller searches for ``x`` its own way.
    ``dense_cells_per_pair``: how sparse a chunk's table may be and still be counted
    densely (0: always sort); the answer is the same either way. ``postings``: the
    batch's postings of ``sets``, when the caller has them already. ``answer_hot``:
    answer the rows with a hot block too, instead of None (their pairs are counted
    either way, hot blocks included); ``hot_rows`` tells which they are.
    ``bit_share``: in a dense count, blocks held by at least this share of the
    requests (and by two) are counted as bit columns (None: none are); the answer is
    the same either way. ``ranked``: where the count is dense and some block is hot,
    extended with one entry per request: for a request with a hot block, the
    clustering's ranked first pick (see ``_HotPicks``), else None; left empty otherwise
    (the caller then searches those requests, if any, itself).
    """
    n = len(sets)
    if n == 0:
        return []
    if postings is None:
        postings = Postings(sets)
    sizes, indptr, blocks, owner = postings.sizes, postings.indptr, postings.blocks, postings.owner
    freq, holders, post_start = postings.freq, postings.holders, postings.starts
    hot = np.zeros(n, dtype=bool) if answer_hot else hot_rows(postings, hot_cap)
    # Rows per chunk: cut where the running pair count passes chunk_pairs.
    pairs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, weights=freq[blocks], minlength=n), out=pairs[1:])
    # Dense when the whole batch's table is within the cells-per-pair bound; then
    # chunks are cut by table cells as well (CHUNK_CELLS, or chunk_pairs if larger).
    dense = n * n <= dense_cells_per_pair * max(int(pairs[-1]), 1)
    cells = max(chunk_pairs, CHUNK_CELLS)
    bits = None  # popular blocks' bit columns, word by word (words × n)
    if dense and bit_share is not None and _POPCOUNT is not None:
        split = _bit_columns(postings, max(2, math.ceil(bit_share * n)))
        if split is not None:
            # The other blocks are counted by pair keys, as before.
            bits, rest = split
            blocks, owner = blocks[rest], owner[rest]
            indptr = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(np.bincount(owner, minlength=n), out=indptr[1:])
            np.cumsum(np.bincount(owner, weights=freq[blocks], minlength=n), out=pairs[1:])
            cells = BIT_CHUNK_CELLS
    if n * n < 1 << 31 and blocks.size < 1 << 31:
        # Every pair key and position fits 32 bits: half the bytes for each pass.
        owner, freq, holders, post_start = (a.astype(np.int32) for a in (owner, freq, holders, post_start))

    # Shared counts are at most a request's size: below 255 the dense tables are bytes
    # (every pass over them moves an eighth of the memory; 255 marks "no top").
    narrow = int(sizes.max()) < 255
    out: list[tuple[int, int, list[int]] | None] = [None] * n
    picks = (_HotPicks.for_batch(postings, hot_cap, candidates)
             if ranked is not None and dense and _POPCOUNT is not None
             and int(postings.freq.max(initial=0)) > hot_cap else None)
    lo = 0
    while lo < n:
        hi = max(lo + 1, int(np.searchsorted(pairs, pairs[lo] + chunk_pairs, side="right")) - 1)
        if dense:
            hi = min(hi, lo + max(1, cells // n))
        hi = min(n, hi)
        keys = _pair_keys(lo, hi, n, indptr, blocks, owner, freq, holders, post_start)
        if dense:
            top, r, c, table = _ties_dense(keys, lo, hi, n, bits, narrow)
            if picks is not None:
                picks.rank(table, lo, hi)
        else:
            top, r, c = _ties_sorted(keys, lo, hi, n, sizes)
        _pick(top, r, c, lo, hi, n, sizes, hot, candidates, out)
        lo = hi
    if picks is not None:
        ranked.extend(picks.out)
    return out


class _HotPicks:
    """The clustering's ranked search for each request holding a hot block, answered
    from the dense count before any merge (every request its own cluster).

    That search leaves hot blocks out: it takes the requests sharing the most of the
    request's other blocks, those within its hot-block count of the best (and sharing
    at least one), keeps the ``candidates`` best by (count, number) and picks the one
    sharing the most blocks in all, then the one with the fewest blocks, then the
    lowest number. ``out[x]``: ``(shared blocks, blocks of both, partner)``, or None
    (no hot block, or nothing shared outside them). The table row of a request counts
    every block; its hot blocks' share comes off as a popcount of their bit columns.
    """

    def __init__(self, postings: Postings, hot_cap: int, candidates: int) -> None:
        self.hot = hot_rows(postings, hot_cap)
        hot_blocks = postings.freq[postings.blocks] > hot_cap
        self.left_out = np.bincount(postings.owner, weights=hot_blocks, minlength=self.hot.size).astype(np.int64)
        split = _bit_columns(postings, hot_cap + 1)
        self.words = split[0] if split is not None else np.zeros((0, self.hot.size), dtype=np.uint64)
        self.sizes = postings.sizes
        self.candidates = candidates
        self.out: list[tuple[int, int, int] | None] = [None] * self.hot.size
        # The pick's key: shared blocks, then blocks (fewer first), then number, as bit
        # fields of one int64 (shared and blocks are at most a request's size).
        self.id_bits = int(self.hot.size).bit_length()
        self.shift = int(self.sizes.max(initial=0)).bit_length() + self.id_bits

    @classmethod
    def for_batch(cls, postings: Postings, hot_cap: int, candidates: int) -> "_HotPicks | None":
        """None where the keys would not fit (the pick's 63 bits, the candidates' 31)."""
        size_bits = int(postings.sizes.max(initial=0)).bit_length()
        n = int(postings.sizes.size)
        if 2 * size_bits + n.bit_length() > 62 or (int(postings.sizes.max(initial=0)) + 1) * n >= 1 << 31:
            return None
        return cls(postings, hot_cap, candidates)

    def rank(self, table: np.ndarray, lo: int, hi: int) -> None:
        """Answer the hot requests among ``lo..hi-1`` from their chunk's ``table``
        (``_ties_dense``'s: every block counted, a request's own cell 0), all rows at
        once: each rule is an integer key whose largest values are the rule's order."""
        rows = np.flatnonzero(self.hot[lo:hi])
        if not rows.size:
            return
        n = table.shape[1]
        xs = rows + lo
        full = table[rows]
        part = full.astype(np.int32)  # without the hot blocks (32 bits: see for_batch)
        for word in self.words:
            part -= _POPCOUNT(word[xs, None] & word[None, :])
        part[np.arange(rows.size), xs] = 0
        floor = np.maximum(part.max(axis=1) - self.left_out[xs], 1).astype(np.int32)
        # Candidates: at or above the floor, the best by count, then the lower number:
        # the smallest keys -(count * n + n - 1 - number), counts below the floor set
        # to 0 (a multiply: a masked write costs 8x as much here), so their keys are
        # above -n.
        part *= part >= floor[:, None]
        key = part * np.int32(-n)
        key -= np.arange(n - 1, -1, -1, dtype=np.int32)
        k = min(self.candidates, n)
        best = np.argpartition(key, k - 1, axis=1)[:, :k]
        ok = np.take_along_axis(key, best, axis=1) <= -n
        # Of those: most shared in all, then fewest blocks, then the lowest number.
        shared = np.take_along_axis(full, best, axis=1).astype(np.int64)  # (the table may be bytes)
        size = self.sizes[best]
        pick = np.where(ok, (shared << self.shift) - (size << self.id_bits) - best, -1)
        j = pick.argmax(axis=1)
        at = np.flatnonzero(pick[np.arange(rows.size), j] >= 0)
        y = best[at, j[at]]
        for x, sh, sp, z in zip(xs[at].tolist(), shared[at, j[at]].tolist(),
                                (self.sizes[xs[at]] + self.sizes[y]).tolist(), y.tolist()):
            self.out[x] = (sh, sp, z)


def hot_rows(postings: Postings, hot_cap: int) -> np.ndarray:
    """Per request of ``postings``: whether it holds a block more than ``hot_cap`` requests hold."""
    return np.bincount(postings.owner, weights=(postings.freq[postings.blocks] > hot_cap),
                       minlength=postings.sizes.size) > 0


def _bit_columns(postings: Postings, least: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The blocks held by at least ``least`` requests as bits: ``(words, rest)``, where
    ``words[j, r]`` holds bits ``64 j ..`` of request ``r`` (bit ``i``: the ``i``-th such
    block) and ``rest`` marks the postings entries of the other blocks; None when no
    block is held that often."""
    freq = postings.freq
    popular = np.flatnonzero(freq >= least)
    if not popular.size:
        return None
    bit = np.full(freq.size, -1, dtype=np.int64)
    bit[popular] = np.arange(popular.size)
    at = bit[postings.blocks]
    rest = at < 0
    mine = at[~rest]
    words = np.zeros(((popular.size + 63) // 64, postings.sizes.size), dtype=np.uint64)
    np.bitwise_or.at(words, (mine >> 6, postings.owner[~rest]),
                     np.left_shift(np.uint64(1), (mine & 63).astype(np.uint64)))
    return words, rest


def _pair_keys(lo, hi, n, indptr, blocks, owner, freq, holders, post_start) -> np.ndarray:
    """``(x - lo) * n + y`` for every block x in rows lo..hi-1 shares with request y
    (y = x included), one key per shared block."""
    e0, e1 = int(indptr[lo]), int(indptr[hi])
    b = blocks[e0:e1]
    f = freq[b]
    total = int(f.sum())
    # Entry e expands to its block's postings: positions post_start[b]..+f, flattened
    # (in the arrays' own integer type).
    first = np.cumsum(f, dtype=f.dtype) - f
    pos = np.arange(total, dtype=f.dtype) + np.repeat(post_start[b] - first, f)
    return np.repeat((owner[e0:e1] - lo) * n, f) + holders[pos]


def _ties_dense(keys, lo, hi, n, bits=None, narrow=False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(top, rows, partners, table): per row (x - lo) the most blocks it shares with
    another request, and every such partner, by row then partner; counted in the
    (hi - lo) × n ``table``, from the pair keys and, where given, ``_bit_columns``'
    words (a request's own cell set to 0). ``narrow``: every count is below 255, so
    the table is uint8 (else int64)."""
    width = hi - lo
    table = np.bincount(keys, minlength=width * n)
    if narrow:
        table = table.astype(np.uint8)
    table = table.reshape(width, n)
    if bits is not None:
        for word in bits:
            # (uint8 popcounts: an add into int64 converts them one by one, ~4x as slow)
            table += _POPCOUNT(word[lo:hi, None] & word[None, :])
    rows = np.arange(width)
    table[rows, rows + lo] = 0  # a request is not its own partner
    top = table.max(axis=1)
    # Rows sharing nothing have top 0: no partner there, as in the sorted count (a
    # value no cell holds matches none). The ties by one flat search: a 2-D nonzero
    # costs twice as much.
    at = np.flatnonzero(table == np.where(top > 0, top, 255 if narrow else -1).astype(table.dtype)[:, None])
    r = at // n
    return top, r, at - r * n, table


def _ties_sorted(keys, lo, hi, n, sizes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``_ties_dense``'s answer from the sorted pair keys (no table)."""
    # Sorting the pair keys counts them (runs of equal keys) without a dense table;
    # 32-bit keys sort twice as fast where they fit.
    width = hi - lo
    if width * n < 1 << 31:
        keys = keys.astype(np.int32, copy=False)
    keys.sort()
    top = np.zeros(width, dtype=np.int64)
    if not keys.size:
        return top, top[:0], top[:0]
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    counts = np.diff(np.append(starts, keys.size))
    keys = keys[starts]
    # Every request with blocks has its own key (row * n + itself), first of none in
    # particular: found by search, its count zeroed (a request is not its own partner).
    rows = np.flatnonzero(sizes[lo:hi])
    counts[np.searchsorted(keys, (rows * (n + 1) + lo).astype(keys.dtype))] = 0
    # Rows are contiguous runs of keys, found by search too: each row's maximum in
    # one reduceat (a row without blocks has no keys and keeps top 0).
    bounds = np.searchsorted(keys, (rows * n).astype(keys.dtype))
    top[rows] = np.maximum.reduceat(counts, bounds)
    ends = np.append(bounds[1:], keys.size)
    tied = np.flatnonzero((counts == np.repeat(top[rows], ends - bounds)) & (counts > 0))
    tk = keys[tied].astype(np.int64)
    xs = tk // n
    return top, xs, tk - xs * n  # by row, then partner ascending: the keys were sorted


def _pick(top, r, c, lo, hi, n, sizes, hot, candidates, out) -> None:
    """Fill ``out[lo:hi]`` from each row's ``top`` and its ties ``(r, c)``
    (row - lo, partner; by row, then partner)."""
    width = hi - lo
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
    partners = c.tolist()
    hots = hot[lo:hi].tolist()
    for i in range(width):
        if hots[i]:
            continue
        if tops[i] == 0:
            out[lo + i] = (0, -1, [])
        else:
            out[lo + i] = (tops[i], picks[i], partners[starts[i]:starts[i + 1]])


# The weighted first pass runs where the batch's dense table has at most this many
# cells per pair (a search per request costs ~17 µs in Python on the knowledge base,
# ~10 cells per pair; a dense cell a few ns).
WEIGHTED_CELLS_PER_PAIR = 16


def weighted_first_partners(postings: Postings, w: list[float], hot_cap: int,
                            candidates: int) -> list[list[int]] | None:
    """Per request, the partners the token-weighted clustering's first search returns
    (``planner_merge._posting_partners`` with every request its own cluster), for all
    requests in a few array passes; None where this pass does not apply (weights not
    whole numbers of at least 1, or sharing too sparse for a dense table).

    The search sums, for each other request, the weight of the blocks it shares with
    x, hot blocks (held by more than ``hot_cap``) left out; keeps those within x's
    hot weight of the best and sharing something; and, where more than ``candidates``
    remain, the ``candidates`` with the most, then the lower number. With whole
    weights the sums are exact in any order, so a dense table of them gives the same
    sets; each list is ascending (the caller's choice does not depend on the order).
    """
    sizes, blocks, owner = postings.sizes, postings.blocks, postings.owner
    freq, holders, starts = postings.freq, postings.holders, postings.starts
    n = int(sizes.size)
    # Sparse sharing (pooled retrieval) stops at the first test: hot blocks left out
    # only lower the pair count.
    if n == 0 or n * n > WEIGHTED_CELLS_PER_PAIR * max(int(np.dot(freq, freq)), 1):
        return None
    wv = np.asarray(w, dtype=np.float64)
    if wv.size < freq.size or not whole_and_at_least_one(wv, np.flatnonzero(freq)):
        return None
    cool = freq[blocks] <= hot_cap
    skipped = np.bincount(owner, weights=np.where(cool, 0.0, wv[blocks]), minlength=n)
    blocks, owner = blocks[cool], owner[cool]
    f = freq[blocks]
    pairs = int(f.sum())
    if n * n > WEIGHTED_CELLS_PER_PAIR * max(pairs, 1):
        return None
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(owner, minlength=n), out=indptr[1:])
    out: list[list[int]] = [[] for _ in range(n)]
    step = max(1, CHUNK_CELLS // n)
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        width = hi - lo
        keys = _pair_keys(lo, hi, n, indptr, blocks, owner, freq, holders, starts)
        e0, e1 = int(indptr[lo]), int(indptr[hi])
        pair_weights = np.repeat(wv[blocks[e0:e1]], f[e0:e1])  # (in _pair_keys' order)
        table = np.bincount(keys, weights=pair_weights, minlength=width * n).reshape(width, n)
        rows = np.arange(width)
        table[rows, rows + lo] = 0.0  # a request is not its own partner
        # Within the slack of the best and sharing something: every weight is at least
        # 1, so a sum that is not 0 is at least 1. The cells by one flat search (a 2-D
        # nonzero costs twice as much).
        least = np.maximum(table.max(axis=1) - skipped[lo:hi], 1.0)
        at = np.flatnonzero(table >= least[:, None])
        r = at // n
        c = at - r * n
        bounds = np.searchsorted(r, np.arange(width + 1)).tolist()
        partners = c.tolist()
        for i in range(width):
            a, z = bounds[i], bounds[i + 1]
            if z - a <= candidates:
                out[lo + i] = partners[a:z]
            else:
                sel = c[a:z]
                out[lo + i] = sorted(best_summed(sel, table[i, sel], candidates).tolist())
    return out
