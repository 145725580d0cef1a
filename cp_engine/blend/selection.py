"""Which claimed tokens blend recomputes instead of taking their stored KV.

``select_recompute(n, spans, ratio, mode, first_tokens, deviation)`` works on the
claimed range ``[0, n)`` (positions relative to its start) and the spans
``[start, end)`` in it that stored blocks cover. It returns a ``Selection``:
- every uncovered token (labels, separators, blocks not in the store) is always chosen;
- of the covered ("reused") tokens, the top ``ceil(ratio * covered)`` by the mode's
  ranking are chosen besides (ratio 0: none, ratio 1: all, so every claimed token is
  recomputed and the result is exact up to float rounding):
  - ``first_tokens``: by offset inside the block, blocks taking turns (offset 0 of every
    block, then offset 1, ...), so each block gets the same number of leading tokens;
  - ``deviation``: by ``deviation`` (largest first; NaN counts as largest), e.g. the
    squared difference between stored and fresh K at the first layer(s);
  - ``both``: each block's first ``first_tokens`` tokens (blocks taking turns), then by
    deviation.
- a *carried* span (``carried[i]`` true: its KV was computed behind the same lead as now,
  ``leads``) is kept whole below ratio 1: it takes no part in the budget or the ranking,
  so the ratio applies to the displaced blocks alone. Ratio 1 recomputes it too.
Ties go to the earlier position. Pure function of its inputs; NumPy only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

__all__ = ["MODES", "Selection", "select_recompute"]

MODES = ("both", "first_tokens", "deviation")


@dataclass(frozen=True)
class Selection:
    """Chosen positions (sorted, relative to the claim's start) and why each was chosen."""

    positions: np.ndarray
    uncovered: int
    first_tokens: int
    deviation: int
    carried: int = 0  # covered tokens kept because their span is carried


def _covered(n: int, spans: Sequence[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Per position: the covering span's index (-1: uncovered) and the offset inside it."""
    block = np.full(n, -1, dtype=np.int64)
    offset = np.zeros(n, dtype=np.int64)
    last_end = 0
    for i, (start, end) in enumerate(spans):
        if not (last_end <= start < end <= n):
            raise ValueError(f"spans must be sorted, non-empty, disjoint and inside [0, {n}): {spans[i]!r}")
        block[start:end] = i
        offset[start:end] = np.arange(end - start)
        last_end = end
    return block, offset


def select_recompute(n: int, spans: Sequence[tuple[int, int]], ratio: float, mode: str = "both",
                     first_tokens: int = 16, deviation: Sequence[float] | None = None,
                     carried: Sequence[bool] | None = None) -> Selection:
    """See module docstring. ``deviation`` (length ``n``) is needed by modes ``both`` and
    ``deviation`` unless the ratio leaves nothing to rank; ``carried`` has one flag per
    span (None: none carried)."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} unknown; one of {', '.join(MODES)}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be within [0, 1], got {ratio!r}")
    if n < 0 or first_tokens < 0:
        raise ValueError("n and first_tokens must be non-negative")
    block, offset = _covered(n, [(int(s), int(e)) for s, e in spans])
    uncovered = np.flatnonzero(block < 0)
    reused = np.flatnonzero(block >= 0)
    kept_whole = 0
    if carried is not None and ratio < 1.0:
        flags = np.asarray(carried, dtype=bool)
        if flags.shape != (len(spans),):
            raise ValueError(f"carried has shape {flags.shape}, expected ({len(spans)},)")
        displaced = ~flags[block[reused]]
        kept_whole = int(np.count_nonzero(~displaced))
        reused = reused[displaced]
    budget = min(len(reused), math.ceil(ratio * len(reused) - 1e-9))
    leading = int(np.count_nonzero(offset[reused] < first_tokens)) if mode == "both" else 0
    dev = None
    if mode != "first_tokens" and leading < budget < len(reused):  # a ranking by deviation matters
        if deviation is None:
            raise ValueError(f"mode {mode!r} ranks by deviation; none given")
        dev = np.asarray(deviation, dtype=np.float64)
        if dev.shape != (n,):
            raise ValueError(f"deviation has shape {dev.shape}, expected ({n},)")
        dev = np.where(np.isnan(dev), np.inf, dev)
    # Sort keys, most urgent first; np.lexsort takes the primary key last.
    group = np.zeros(len(reused), dtype=np.int64)  # 0: first tokens (mode both), 1: the rest
    by_dev = np.zeros(len(reused)) if dev is None else -dev[reused]
    if mode == "first_tokens":
        order = np.lexsort((reused, offset[reused]))
    elif mode == "deviation":
        order = np.lexsort((reused, by_dev))
    else:
        group = (offset[reused] >= first_tokens).astype(np.int64)
        # first tokens by offset (blocks taking turns), the rest by deviation
        within = np.where(group == 0, offset[reused].astype(np.float64), by_dev)
        order = np.lexsort((reused, within, group))
    chosen = order[:budget]
    n_first = int(np.count_nonzero(group[chosen] == 0)) if mode == "both" else (budget if mode == "first_tokens" else 0)
    positions = np.sort(np.concatenate([uncovered, reused[chosen]])).astype(np.int64)
    return Selection(positions, len(uncovered), n_first, budget - n_first, kept_whole)
