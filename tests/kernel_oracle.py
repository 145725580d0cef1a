"""Plain-Python oracle for cp_engine.kernels.topk_overlap (pairwise loops, no numpy).

Shared by tests/unit/test_kernels.py and tests/unit/test_kernels_triton.py. Written from the
formulas in the topk_overlap docstring, independently of the NumPy reference.
"""
from __future__ import annotations


def first_positions(blocks):
    pos = {}
    for i, b in enumerate(blocks):
        pos.setdefault(b, i)
    return pos


def pair_score(metric, a, b, wa=None, alpha=0.001):
    """Score of candidate b for query a, or None when b is not eligible."""
    pa, pb = first_positions(a), first_positions(b)
    shared = set(pa) & set(pb)
    if not shared:
        return None
    if metric == "overlap":  # token-weighted by the query's weight at each first position
        return sum(wa[pa[x]] for x in shared) if wa is not None else len(shared)
    c = len(shared)
    spread = sum(abs(pa[x] - pb[x]) for x in shared)
    return (1.0 - c / max(len(pa), len(pb))) + (alpha * spread) / c


def oracle_topk(queries, candidates, k, metric, exclude_self=False, weights=None):
    """Per query: list of (candidate index, score), best first, ties to lower index."""
    out = []
    for qi, a in enumerate(queries):
        ranked = []
        for ci, b in enumerate(candidates):
            if exclude_self and qi == ci:
                continue
            s = pair_score(metric, a, b, None if weights is None else weights[qi])
            if s is None:
                continue
            ranked.append(((s if metric == "distance" else -s), ci, s))
        ranked.sort()
        out.append([(ci, s) for _, ci, s in ranked[:k]])
    return out


def as_pairs(result):
    """TopK -> same shape as oracle_topk (drops empty slots)."""
    return [
        [(int(i), s.item()) for i, s in zip(row_i, row_s) if i >= 0]
        for row_i, row_s in zip(result.indices, result.scores)
    ]


def oracle_partners(lists, k, weight=None):
    """partner_candidates by pairwise loops: per list, [(other index, Σ weight of
    shared distinct blocks)], best first, ties to the lower index; ``weight``: block -> int."""
    out = []
    for i, a in enumerate(lists):
        ranked = []
        for j, b in enumerate(lists):
            shared = set(a) & set(b)
            if j == i or not shared:
                continue
            s = sum(weight(x) for x in shared) if weight is not None else len(shared)
            ranked.append((-s, j))
        ranked.sort()
        out.append([(j, -s) for s, j in ranked[:k]])
    return out


def pairs_of(idx, score):
    """(idx, score) arrays -> same shape as oracle_partners (drops empty slots)."""
    return [[(int(i), int(s)) for i, s in zip(ri, rs) if i >= 0] for ri, rs in zip(idx, score)]
