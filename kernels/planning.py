"""The batch planner's kNN partner search on the overlap kernel.

``PARTNER_SEARCH`` is a ``cp_engine.planner.PartnerSearch``: ``find`` ranks every
request's partners with ``partner_candidates`` (Triton on a GPU, else NumPy);
``use_for`` lets ``partners="auto"`` take it only where the kernel runs on a GPU
(on 2 CPU cores the NumPy kernel alone costs as much as the whole greedy planner,
benchmarks/results/planner_partners.table.md). ``cp_engine.plan_batch`` plugs it in.
"""
from __future__ import annotations

from cp_engine.planner import KNN_PARTNERS, PartnerSearch

from .backend import choose_backend, gpu_device_present


def find_partners(sets: list[list[int]], k: int, weights: list[float]):
    """Each request's ``k`` best partners by shared block weight (an int64 [N, k] array)."""
    from .overlap import partner_candidates  # numpy; torch only for the Triton backend

    whole = [max(1, round(x)) for x in weights]  # the kernel scores whole token counts
    idx, _score = partner_candidates(sets, k, weights=whole)
    return idx


def runs_on_gpu(n: int) -> bool:
    """Whether the automatic backend would score ``n`` requests on a GPU."""
    if not gpu_device_present():
        return False
    try:
        return choose_backend(None, pairs=n * n, k=KNN_PARTNERS)[0] == "triton"
    except Exception:
        return False  # a broken optional GPU stack never stops planning


PARTNER_SEARCH = PartnerSearch(find=find_partners, use_for=runs_on_gpu)
