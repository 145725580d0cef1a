"""Pack block lists into padded dense int32 matrices for the scoring backends.

Contract of ``PackedLists`` (what every backend reads):
- ``ids``: int32 ``[n, L]``, row ``r`` holds list ``r`` as dense ids ``0..V-1`` in
  order, padded with ``-1`` (``L`` = longest list, at least 0).
- ``weights``: int32 ``[n, L]``, token weight of each position (positive), 0 on padding.
- ``lengths``: int32 ``[n]``, list lengths including duplicate ids.
- ``vocab``: sorted uint64 array mapping dense id -> original 64-bit id, or ``None``
  when the caller passed dense ids directly.
- ``set_ids`` (derived): ``ids`` with every repeated occurrence of an id inside a row
  replaced by ``-1``; columns are unchanged, so a first occurrence keeps its position.
- ``set_sizes`` (derived): number of distinct ids per row.
Treat a PackedLists as immutable: derived arrays and the candidates' inverted index
are cached on it. Queries and candidates must share one id space: pack them in one call
(``pack_lists(q + c)`` then ``.rows(...)``) or use ``pack_pair``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

PAD = -1


@dataclass(frozen=True)
class PackedLists:
    ids: np.ndarray
    weights: np.ndarray
    lengths: np.ndarray
    vocab: np.ndarray | None = None
    _cache: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def n(self) -> int:
        return int(self.ids.shape[0])

    @property
    def width(self) -> int:
        return int(self.ids.shape[1])

    @property
    def vocab_size(self) -> int:
        """One more than the largest dense id used (at least ``len(vocab)``)."""
        top = int(self.ids.max()) + 1 if self.ids.size else 0
        return max(top, 0 if self.vocab is None else int(self.vocab.shape[0]))

    @property
    def set_ids(self) -> np.ndarray:
        if "set_ids" not in self._cache:
            self._cache["set_ids"] = _first_occurrences(self.ids)
        return self._cache["set_ids"]

    @property
    def unit_weights(self) -> bool:
        """Every position weighs 1 (no token weights given): overlap is a plain count."""
        if "unit" not in self._cache:
            self._cache["unit"] = bool((self.weights[self.ids >= 0] == 1).all())
        return self._cache["unit"]

    @property
    def set_sizes(self) -> np.ndarray:
        if "set_sizes" not in self._cache:
            self._cache["set_sizes"] = (self.set_ids >= 0).sum(axis=1).astype(np.int32)
        return self._cache["set_sizes"]

    def rows(self, start: int, stop: int) -> "PackedLists":
        """Rows ``start:stop`` in the same id space (trailing all-pad columns trimmed)."""
        lengths = self.lengths[start:stop]
        width = int(lengths.max()) if lengths.size else 0
        return PackedLists(self.ids[start:stop, :width], self.weights[start:stop, :width], lengths, self.vocab)


def _first_occurrences(ids: np.ndarray) -> np.ndarray:
    """Replace repeated ids inside each row by PAD, keeping the first occurrence."""
    out = ids.copy()
    if ids.shape[1] < 2:
        return out
    order = np.argsort(ids, axis=1, kind="stable")  # stable: first occurrence sorts first
    srt = np.take_along_axis(ids, order, axis=1)
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    rows, cols = np.nonzero(dup)
    out[rows, order[rows, cols + 1]] = PAD
    return out


def _as_uint64(flat: list) -> np.ndarray:
    try:
        return np.fromiter(flat, dtype=np.uint64, count=len(flat))
    except (OverflowError, ValueError):
        # Negative ids: keep their 64-bit two's complement pattern, still injective.
        return np.array(flat, dtype=np.int64).view(np.uint64)


def _weights_matrix(lists: Sequence[Sequence[int]], weights, ids: np.ndarray, vocab: np.ndarray | None,
                    lengths: np.ndarray) -> np.ndarray:
    n, width = ids.shape
    w = np.zeros((n, width), dtype=np.int64)
    valid = ids >= 0
    if weights is None:
        w[valid] = 1
    elif isinstance(weights, np.ndarray) and weights.ndim == 1:
        # Per-block table indexed by the original (small, non-negative) block id.
        orig = ids if vocab is None else vocab.astype(np.int64)[np.maximum(ids, 0)]
        if valid.any() and (orig[valid].min() < 0 or orig[valid].max() >= weights.shape[0]):
            raise ValueError("a weight table indexed by block id must cover every block id")
        w[valid] = _integral(weights[orig[valid]])
    elif isinstance(weights, Mapping):
        # Per-block weights (e.g. token counts keyed by original block id).
        if vocab is None:
            table = np.array([weights.get(i, 1) for i in range(int(ids.max()) + 1 if ids.size else 0)])
        else:
            table = np.array([weights.get(int(v), weights.get(int(v.astype(np.int64)), 1)) for v in vocab])
        w[valid] = _integral(table)[ids[valid]]
    else:
        if len(weights) != n:
            raise ValueError(f"weights: expected {n} rows, got {len(weights)}")
        for r, row in enumerate(weights):
            if len(row) != lengths[r]:
                raise ValueError(f"weights[{r}] has {len(row)} entries for {lengths[r]} blocks")
            w[r, : len(row)] = _integral(row) if len(row) else 0
    if (w[valid] <= 0).any():
        raise ValueError("token weights must be positive integers")
    if w.size and int(w.sum(axis=1).max()) >= 2**31:
        raise ValueError("token weights of one list must sum below 2**31")
    return w.astype(np.int32)


def _integral(values: np.ndarray) -> np.ndarray:
    """Token weights as int64; float weights must hold whole numbers (e.g. 3.0)."""
    values = np.asarray(values)
    if values.dtype.kind == "f":
        if not np.array_equal(values, np.round(values)):
            raise ValueError("token weights must be whole numbers")
        values = values.astype(np.int64)
    return values


def pack_lists(lists, *, weights=None) -> PackedLists:
    """Remap 64-bit block ids to dense int32 ids and pad to ``[n, L]`` with -1.

    ``lists``: sequence of sequences of integer block ids (any 64-bit value), or an
    int ``[n, L]`` array of already-dense ids padded with negative values (kept as is,
    ``vocab=None``). ``weights``: ``None`` (1 per block), a mapping block id -> token
    count, a 1-D array indexed by block id (block ids are then small non-negative
    ints, e.g. a planner's dense ids), or one list of positive ints per list
    (per-position token weights). Float weights must be whole numbers.
    """
    if isinstance(lists, np.ndarray):
        if lists.ndim != 2 or lists.dtype.kind not in "iu":
            raise ValueError("a dense id array must be a 2-D integer array")
        if lists.size and int(lists.max()) >= 2**31 - 2:
            raise ValueError("dense ids must fit int32")
        ids = np.where(lists < 0, PAD, lists).astype(np.int32)
        lengths = (ids >= 0).sum(axis=1).astype(np.int32)
        if (np.diff((ids >= 0).astype(np.int8), axis=1) > 0).any():
            raise ValueError("dense id rows must be left-aligned: padding only after the ids")
        rows = None
        vocab = None
    else:
        rows = [list(r) for r in lists]
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int32, count=len(rows))
        width = int(lengths.max()) if len(rows) else 0
        flat = [b for r in rows for b in r]
        vocab, dense = np.unique(_as_uint64(flat), return_inverse=True)
        ids = np.full((len(rows), width), PAD, dtype=np.int32)
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids[mask] = dense.astype(np.int32)  # row-major fill matches the flat order
    w = _weights_matrix(rows or [], weights, ids, vocab, lengths)
    return PackedLists(ids=ids, weights=w, lengths=lengths, vocab=vocab)


def pack_pair(queries, candidates, *, query_weights=None, candidate_weights=None) -> tuple[PackedLists, PackedLists]:
    """Pack two collections of block lists into one shared dense id space."""
    q = [list(r) for r in queries]
    c = [list(r) for r in candidates]
    given = [w for w in (query_weights, candidate_weights) if w is not None]
    tables = [w for w in given if isinstance(w, np.ndarray) and w.ndim == 1]
    if tables:
        if len(tables) != len(given) or (len(tables) == 2 and not np.array_equal(*tables)):
            raise TypeError("a per-block weight table must be the same on both sides")
        both = pack_lists(q + c, weights=tables[0])
    elif any(isinstance(w, Mapping) for w in given):
        if not all(isinstance(w, Mapping) for w in given):
            raise TypeError("pass weights as mappings on both sides or as lists on both sides")
        # A block's token count is a property of the block: one merged table.
        table = {**(candidate_weights or {}), **(query_weights or {})}
        both = pack_lists(q + c, weights=table)
    elif not given:
        both = pack_lists(q + c)
    else:
        qw = query_weights if query_weights is not None else [[1] * len(r) for r in q]
        cw = candidate_weights if candidate_weights is not None else [[1] * len(r) for r in c]
        both = pack_lists(q + c, weights=list(qw) + list(cw))
    return both.rows(0, len(q)), both.rows(len(q), len(q) + len(c))
