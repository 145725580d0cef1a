"""NumPy reference backend: CPU fallback, test oracle for the Triton kernel, benchmark baseline.

Work is proportional to the shared postings, never to N×M: an inverted index
block -> (candidate, position) over the candidates' distinct ids; each query tile
expands its blocks' postings into (query, candidate, pos_q, pos_c) pairs and reduces
them per (query, candidate). Query tiles are cut so a tile's pairs stay under ``pair_budget``; the per-(query,
candidate) reduction is a dense ``np.bincount`` over ``T × M`` when the tile is dense
in pairs, else a sort of the pairs, so memory stays bounded by the tile.
Ranking and output conventions are those of ``cp_engine.kernels.topk_overlap``.
"""
from __future__ import annotations

import numpy as np

from .packing import PackedLists

PAIR_BUDGET = 1 << 20  # pairs expanded per query tile (~30 MB of temporaries; measured flat 2^18..2^22)
DENSE_LIMIT = 1 << 21  # largest T×M tile reduced with a dense bincount (~80 MB peak)


def _postings(ids: np.ndarray, nvocab: int):
    """Inverted index of a padded id matrix: per id, (row, column) sorted by row."""
    rows, cols = np.nonzero(ids >= 0)  # row-major: rows ascending
    vals = ids[rows, cols]
    order = np.argsort(vals, kind="stable")  # stable keeps rows ascending per id
    deg = np.bincount(vals, minlength=nvocab).astype(np.int64)
    offs = np.concatenate(([0], np.cumsum(deg)[:-1])) if nvocab else np.zeros(0, np.int64)
    return rows[order].astype(np.int64), cols[order].astype(np.int64), deg, offs


def _cached_postings(c: PackedLists):
    """Postings of the candidates' distinct ids, built once per PackedLists."""
    hit = c._cache.get("postings")
    if hit is None:
        hit = c._cache["postings"] = _postings(c.set_ids, max(c.vocab_size, 1))
    return hit


def _expand(q_ids: np.ndarray, deg, offs, post_row, post_col, with_pos: bool, q_w: np.ndarray | None = None):
    """All pairs of equal ids: (query row, candidate row, |query col − candidate col|,
    query token weight at that column).

    The third array is None unless ``with_pos``, the fourth None unless ``q_w`` (the
    query tile's weights) is given. One np.repeat per output instead of gathering
    through a repeat index: fewer passes over the pairs."""
    qi, qp = np.nonzero(q_ids >= 0)
    x = q_ids[qi, qp]
    d = deg[x]
    total = int(d.sum())
    if total == 0:
        e = np.zeros(0, np.int64)
        return e, e, (e if with_pos else None), (e if q_w is not None else None)
    # position inside the postings of x: global running index minus the start of its run
    run_start = np.cumsum(d) - d
    pidx = np.arange(total, dtype=np.int64)
    pidx += np.repeat(offs[x] - run_start, d)
    rows = np.repeat(qi, d)
    cands = post_row[pidx]
    dpos = None
    if with_pos:
        dpos = np.repeat(qp, d) - post_col[pidx]
        np.abs(dpos, out=dpos)
    wrep = None if q_w is None else np.repeat(q_w[qi, qp].astype(np.int64), d)
    return rows, cands, dpos, wrep


def _tiles(cost: np.ndarray, budget: int):
    """Cut rows into consecutive tiles whose summed cost stays under budget (>= 1 row)."""
    n = cost.size
    start = 0
    csum = np.cumsum(cost)
    while start < n:
        base = csum[start - 1] if start else 0
        stop = int(np.searchsorted(csum, base + budget, side="right"))
        stop = max(stop, start + 1)
        yield start, min(stop, n)
        start = stop


def _select_dense(primary: np.ndarray, k: int):
    """Per row, the k smallest ``primary`` (ties: lower column) -> (cols, vals), sorted."""
    t, m = primary.shape
    kk = min(k, m)
    kth = np.partition(primary, kk - 1, axis=1)[:, kk - 1]
    lt = primary < kth[:, None]
    eq = primary == kth[:, None]
    need = kk - lt.sum(axis=1)
    sel = lt | (eq & (np.cumsum(eq, axis=1) <= need[:, None]))
    _, cols = np.nonzero(sel)  # row-major: kk columns per row, ascending
    cols = cols.reshape(t, kk)
    vals = np.take_along_axis(primary, cols, axis=1)
    order = np.argsort(vals, axis=1, kind="stable")  # stable keeps lower column first on ties
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _select_sparse(rows: np.ndarray, cols: np.ndarray, primary: np.ndarray, nrows: int, k: int):
    """Per row, the k smallest ``primary`` among (row, col) entries sorted by (row, col)."""
    out_c = np.full((nrows, k), -1, np.int64)
    out_v = np.full((nrows, k), np.inf)
    if rows.size == 0:
        return out_c, out_v
    order = np.lexsort((primary, rows))  # stable: equal keys keep the lower col first
    r, c, v = rows[order], cols[order], primary[order]
    idx = np.arange(r.size)
    first = np.concatenate(([True], r[1:] != r[:-1]))
    rank = idx - np.maximum.accumulate(np.where(first, idx, 0))
    keep = rank < k
    out_c[r[keep], rank[keep]] = c[keep]
    out_v[r[keep], rank[keep]] = v[keep]
    return out_c, out_v


def _reduce_sorted(key: np.ndarray, dpos: np.ndarray | None):
    """(distinct keys ascending, count, Σ dpos) by one plain sort of key·W + dpos
    (cheaper than a stable argsort plus a gather; keys < 2**63 / W by construction)."""
    if dpos is None:
        srt = np.sort(key)
        pos = srt
    else:
        w = int(dpos.max()) + 1 if dpos.size else 1
        srt = np.sort(key * w + dpos)
        pos = srt // w
    starts = np.flatnonzero(np.concatenate(([True], pos[1:] != pos[:-1]))) if srt.size else np.zeros(0, np.int64)
    uk = pos[starts]
    cnt = np.diff(np.append(starts, srt.size))
    if dpos is None:
        return uk, cnt, None
    dsum = np.add.reduceat(srt % w, starts).astype(np.float64) if starts.size else np.zeros(0)
    return uk, cnt, dsum


def _weighted_sums(key: np.ndarray, wrep: np.ndarray):
    """(distinct keys ascending, Σ weight per key) for the weighted overlap."""
    if key.size == 0:
        e = np.zeros(0, np.int64)
        return e, e
    order = np.argsort(key, kind="stable")
    srt = key[order]
    starts = np.flatnonzero(np.concatenate(([True], srt[1:] != srt[:-1])))
    return srt[starts], np.add.reduceat(wrep[order], starts)


def _primary(metric, cnt, dsum, qsize, csize, alpha):
    """Sort key, smaller is better: -overlap (``cnt`` holds the weighted count) or the
    distance; +inf where nothing is shared."""
    if metric == "overlap":
        return np.where(cnt > 0, -cnt.astype(np.float64), np.inf)
    big = np.maximum(np.maximum(qsize, csize), 1).astype(np.float64)  # 0 only where cnt == 0
    c = np.maximum(cnt, 1).astype(np.float64)
    # Same operation order as the Triton kernel so both round identically.
    d = (1.0 - cnt / big) + (alpha * dsum) / c
    return np.where(cnt > 0, d, np.inf)


def topk_numpy(q: PackedLists, c: PackedLists, k: int, metric: str, *, exclude_self: bool = False,
               alpha: float = 0.001, pair_budget: int | None = None):
    """Top-k candidates per query; returns (indices int64 [nq, k], scores [nq, k]).

    ``pair_budget``: pairs expanded per query tile (default ``PAIR_BUDGET``)."""
    pair_budget = pair_budget or PAIR_BUDGET
    nq, m = q.n, c.n
    empty = 1.0 if metric == "distance" else 0
    out_i = np.full((nq, k), -1, np.int64)
    out_s = np.full((nq, k), empty, np.float64 if metric == "distance" else np.int64)
    if nq == 0 or m == 0 or k == 0:
        return out_i, out_s
    q_ids = q.set_ids
    post_row, post_col, deg, offs = _cached_postings(c)
    # Query ids the candidates never use match nothing: mask them for the expansion
    # only; positions and set sizes are unchanged.
    q_ids = np.where(q_ids < deg.size, q_ids, -1)
    cost = np.where(q_ids >= 0, deg[np.maximum(q_ids, 0)], 0).sum(axis=1)
    qsize, csize = q.set_sizes, c.set_sizes
    # overlap is token-weighted by the query's weights; unit weights take the plain count.
    weighted = metric == "overlap" and not q.unit_weights
    for s, e in _tiles(cost, pair_budget):
        t = e - s
        qi, ci, dpos, wrep = _expand(q_ids[s:e], deg, offs, post_row, post_col, metric == "distance",
                                     q.weights[s:e] if weighted else None)
        if t * m <= DENSE_LIMIT and t * m <= 8 * max(qi.size, 1):
            key = qi * m
            key += ci
            cnt = np.bincount(key, weights=wrep, minlength=t * m).reshape(t, m)
            dsum = None if dpos is None else np.bincount(key, weights=dpos, minlength=t * m).reshape(t, m)
            if exclude_self:  # drop the diagonal after the reduction, not pair by pair
                r = np.arange(t)
                r = r[s + r < m]
                cnt[r, s + r] = 0
            primary = _primary(metric, cnt, dsum, qsize[s:e, None], csize[None, :], alpha)
            cols, vals = _select_dense(primary, k)
        else:
            if exclude_self:
                keep = ci != qi + s
                qi, ci = qi[keep], ci[keep]
                dpos = None if dpos is None else dpos[keep]
                wrep = None if wrep is None else wrep[keep]
            if weighted:
                uk, cnt = _weighted_sums(qi * m + ci, wrep)
                dsum = None
            else:
                uk, cnt, dsum = _reduce_sorted(qi * m + ci, dpos)
            tr, cc = uk // m, uk % m
            primary = _primary(metric, cnt, dsum, qsize[s + tr], csize[cc], alpha)
            cols, vals = _select_sparse(tr, cc, primary, t, k)
        _write(out_i, out_s, s, cols, vals, metric)
    return out_i, out_s


def _write(out_i, out_s, s, cols, vals, metric):
    """Store selected columns; scores are recovered exactly from the sort key."""
    kk = cols.shape[1]
    ok = np.isfinite(vals) & (cols >= 0)
    rows = slice(s, s + cols.shape[0])
    out_i[rows, :kk] = np.where(ok, cols, -1)
    if metric == "distance":
        out_s[rows, :kk] = np.where(ok, vals, 1.0)
    else:  # integer scores below 2**53 survive the float64 key exactly
        out_s[rows, :kk] = np.where(ok, -np.where(ok, vals, 0.0), 0).astype(np.int64)

