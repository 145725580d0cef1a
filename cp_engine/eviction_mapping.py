"""Engine block hashes → context-block path prefixes to invalidate, engine-neutral.

Contract:
- ``track(hashes, namespace, path, ends)`` remembers, for each prompt block hash at
  position ``j`` (tokens ``[j*B, (j+1)*B)``), the request's context-block path and
  the estimated token end of each context block; the most recent request wins when
  several share a hash (equal chained hashes mean equal tokens, so their paths agree
  up to that block);
- when an engine hash leaves the cache for good, ``gone(h)`` returns
  ``(namespace, path[:i+1])`` for the shallowest context block ``i`` whose end lies
  after ``j*B`` (prefix caches match left to right, so that block and everything
  after it can no longer be reused), or ``None`` when the hash only covers text after
  the blocks, is unknown, or a shallower prefix of the same path was already
  reported since the last ``track`` (bursts of evictions collapse to one message);
- engines that report copies (one hash can sit in several physical blocks) call
  ``stored(h)`` / ``removed(h)``: a hash is gone when its copy count drops to zero;
- memory is bounded: at most ``max_hashes`` hashes, least recently tracked dropped.
"""
from __future__ import annotations

import bisect
import threading
from collections import OrderedDict
from typing import Hashable, Sequence

__all__ = ["EvictionMapper"]

_END = object()  # terminal marker in the reported-prefix trie


class _Record:
    __slots__ = ("namespace", "path", "ends")

    def __init__(self, namespace: str, path: tuple, ends: tuple) -> None:
        self.namespace = namespace
        self.path = path
        self.ends = ends


class EvictionMapper:
    def __init__(self, block_size: int | None = None, max_hashes: int = 1 << 18) -> None:
        if (block_size is not None and block_size <= 0) or max_hashes <= 0:
            raise ValueError("block_size and max_hashes must be positive")
        # Tokens per hashed block; an adapter may learn it only after requests arrive
        # (``gone`` reports nothing until it is set).
        self.block_size = block_size
        self.max_hashes = max_hashes
        self._lock = threading.Lock()
        self._where: OrderedDict[Hashable, tuple[_Record, int]] = OrderedDict()
        self._copies: dict[Hashable, int] = {}
        self._reported: dict[str, dict] = {}  # namespace -> trie of reported prefixes
        self.dropped = 0  # hashes forgotten by the memory bound

    def __len__(self) -> int:
        return len(self._where)

    def track(self, hashes: Sequence[Hashable], namespace: str, path: Sequence, ends: Sequence[int]) -> int:
        """Remember a request's prompt hashes; returns how many map to a context block."""
        if not path or len(path) != len(ends):
            return 0
        ends_t = tuple(int(e) for e in ends)
        last_end = ends_t[-1]
        # Hashes wholly after the last block never break a context block: skip them.
        n = len(hashes) if not self.block_size else min(len(hashes), -(-last_end // self.block_size))
        if n <= 0:
            return 0
        rec = _Record(namespace, tuple(path), ends_t)
        with self._lock:
            self._reported.clear()  # new traffic may re-cache what was reported
            where = self._where
            for j in range(n):
                h = hashes[j]
                if h in where:
                    where.move_to_end(h)
                where[h] = (rec, j)
            while len(where) > self.max_hashes:
                old, _ = where.popitem(last=False)
                self._copies.pop(old, None)
                self.dropped += 1
        return n

    def stored(self, h: Hashable) -> None:
        with self._lock:
            self._copies[h] = self._copies.get(h, 0) + 1

    def removed(self, h: Hashable) -> tuple[str, tuple] | None:
        """One physical copy of ``h`` left the cache; reports when it was the last."""
        with self._lock:
            left = self._copies.get(h, 0) - 1
            if left > 0:
                self._copies[h] = left
                return None
            self._copies.pop(h, None)
        return self.gone(h)

    def gone(self, h: Hashable) -> tuple[str, tuple] | None:
        """``h`` is no longer in the engine's cache: the prefix to invalidate, if any."""
        with self._lock:
            if not self.block_size:
                return None
            hit = self._where.pop(h, None)
            if hit is None:
                return None
            rec, j = hit
            i = bisect.bisect_right(rec.ends, j * self.block_size)
            if i >= len(rec.path):
                return None
            prefix = rec.path[: i + 1]
            if not self._mark_reported(rec.namespace, prefix):
                return None
            return rec.namespace, prefix

    def reset(self) -> None:
        """The engine dropped its whole cache."""
        with self._lock:
            self._where.clear()
            self._copies.clear()
            self._reported.clear()

    def _mark_reported(self, namespace: str, prefix: tuple) -> bool:
        """Record ``prefix``; False when it or a shallower prefix was already reported."""
        node = self._reported.setdefault(namespace, {})
        for part in prefix:
            if _END in node:
                return False
            node = node.setdefault(part, {})
        if _END in node:
            return False
        node.clear()  # deeper reports are subsumed by this one
        node[_END] = True
        return True
