"""``topk_overlap`` and ``partner_candidates``: the public scoring calls, which pack
the lists, choose a backend and run it (exported by ``cp_engine.kernels``)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import auto_failed, choose_backend
from .packing import PackedLists, pack_lists, pack_pair
from .reference import topk_numpy

METRICS = ("overlap", "distance")
ALPHA = 0.001

__all__ = ["ALPHA", "METRICS", "TopK", "partner_candidates", "topk_overlap"]


@dataclass(frozen=True)
class TopK:
    """``indices[q, r]``: r-th best candidate of query q (-1: none); ``scores`` alike."""

    indices: np.ndarray  # int64 [nq, k]
    scores: np.ndarray  # int64 (overlap) or float64 (distance) [nq, k]
    metric: str
    backend: str


def _packed(queries, candidates, query_weights, candidate_weights):
    if isinstance(queries, PackedLists):
        cand = queries if candidates is None else candidates
        if not isinstance(cand, PackedLists):
            raise TypeError("pass both queries and candidates packed, or both as lists")
        if queries.vocab is not None and cand.vocab is not None and queries.vocab is not cand.vocab \
                and not np.array_equal(queries.vocab, cand.vocab):
            raise ValueError("queries and candidates were packed with different id maps; use pack_pair")
        return queries, cand
    if candidates is None:
        q = pack_lists(queries, weights=query_weights)
        return q, q
    if isinstance(candidates, PackedLists):
        raise TypeError("pass both queries and candidates packed, or both as lists")
    if isinstance(queries, np.ndarray) and isinstance(candidates, np.ndarray):
        return pack_lists(queries, weights=query_weights), pack_lists(candidates, weights=candidate_weights)
    return pack_pair(queries, candidates, query_weights=query_weights, candidate_weights=candidate_weights)


def topk_overlap(queries, candidates=None, k: int = 8, *, metric: str = "overlap", query_weights=None,
                 candidate_weights=None, exclude_self: bool = False, alpha: float = ALPHA,
                 backend: str | None = None) -> TopK:
    """Best ``k`` candidates for every query, streamed over tiles (no N×M matrix).

    ``queries`` / ``candidates``: lists of block-id lists (any 64-bit ints), dense int
    ``[n, L]`` arrays padded with -1, or ``PackedLists`` from ``pack_pair`` (both sides
    alike).
    ``candidates=None`` scores the queries against themselves (then ``exclude_self``
    skips candidate i for query i). Metrics, for query A and candidate B, with A, B
    taken as sets (an id repeated inside one list counts once, at its first position):
    - ``overlap``: ``Σ_{x∈A∩B} w_A(x)``, ``w_A(x)`` the query's token weight at x's
      first position (``query_weights``: a mapping block id -> tokens, a 1-D array
      indexed by block id, or one list per query; default 1, i.e. ``|A∩B|``; with
      per-block weights, a mapping or a table, the score is symmetric); larger is better.
    - ``distance`` (the peer planner's clustering distance): ``d = 1 − |A∩B| / max(|A|,|B|)
      + alpha · mean_{x∈A∩B} |pos_A(x) − pos_B(x)|``, alpha = 0.001, d = 1 when A∩B
      is empty; smaller is better.
    Only candidates sharing at least one block are ranked; free slots hold index -1 and
    score 0 (overlap) or 1.0 (distance).
    Ties go to the lower candidate index. Integer scores are exact on every backend.
    ``backend``: "auto", "numpy", "triton", or None to read CP_ENGINE_KERNEL_BACKEND
    (default auto = Triton on CUDA for ≥ ``TRITON_MIN_PAIRS`` pairs and k ≤ ``MAX_K``,
    else NumPy; if an automatic Triton run fails, it logs once and NumPy answers from
    then on). A forced backend that cannot run raises ``BackendUnavailable``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if k < 0:
        raise ValueError("k must be >= 0")
    q, c = _packed(queries, candidates, query_weights, candidate_weights)
    if exclude_self and candidates is not None and q.n != c.n:
        raise ValueError("exclude_self needs queries and candidates indexed alike")
    chosen, forced = choose_backend(backend, q.n * c.n, k)
    if chosen == "triton" and q.n and c.n and k:
        try:
            from . import triton_overlap  # lazy: imports torch and triton

            idx, scores = triton_overlap.launch(q, c, k, metric, exclude_self=exclude_self, alpha=alpha)
            return TopK(indices=idx, scores=scores, metric=metric, backend="triton")
        except Exception as exc:
            if forced:
                raise
            auto_failed(f"{type(exc).__name__}: {exc}")  # automatic choice: fall back silently
            chosen = "numpy"
    idx, scores = topk_numpy(q, c, k, metric, exclude_self=exclude_self, alpha=alpha)
    return TopK(indices=idx, scores=scores, metric=metric, backend=chosen)


def partner_candidates(block_lists, k: int, weights=None, backend: str | None = "auto"):
    """For every list, the ``k`` *other* lists sharing the most (token-weighted) blocks.

    Returns ``(idx, score)``, int64 arrays ``[N, k]``: ``idx[i, r]`` is the r-th best
    partner of list ``i`` (never ``i`` itself; -1 once fewer than ``k`` lists share a
    block with it), ``score[i, r] = Σ_{x ∈ set(i) ∩ set(idx[i, r])} w(x)`` (0 on
    empty slots); best first, ties to the lower index. An id repeated inside one list
    counts once. ``weights``: ``None`` (1 per block: the overlap count), a mapping
    block id -> token count, or a 1-D array indexed by block id (whole, positive
    numbers). Streamed over query tiles on both backends: memory is bounded by the
    tile and the postings, never N×N. ``backend``: as in ``topk_overlap``.
    """
    if weights is not None and not isinstance(weights, (dict, np.ndarray)) and not hasattr(weights, "get"):
        weights = np.asarray(weights)
        if weights.ndim != 1:
            raise ValueError("weights: a mapping or a 1-D table indexed by block id")
    r = topk_overlap(block_lists, None, k, metric="overlap", query_weights=weights, exclude_self=True,
                     backend=backend)
    return r.indices, r.scores
