"""Bounded host-memory store of context blocks' KV, evicted by value.

Entry layout: one array (NumPy) or tensor (torch, CPU) per block, shape
``[num_layers, 2, tokens, num_kv_heads, head_dim]``: index 0 of axis 1 is K rotated to
positions ``[0, tokens)`` (``rope.shift_k(k, -start)``), index 1 is V (position-free).
Its dtype is ``key.layout.dtype``. One array per block keeps a hit to one lookup and
lets the loader slice a layer (``kv[layer]``) or K/V (``kv[:, 0]``) without copies.

Contract:
- ``put(key, kv)`` stores ``kv`` (no copy; NumPy arrays are made read-only, torch
  tensors must not be mutated afterwards) and returns whether it did: an entry whose
  shape, dtype or device does not fit ``key.layout``, or larger than the whole bound,
  is refused (``blend_store_refused``) and nothing is lost;
- ``get(key)`` returns the entry or ``None``; before returning it checks the exact token
  ids, the shape and the dtype again, so a collision or corrupt entry is a miss
  (``blend_rejects``, entry dropped), never wrong KV and never an exception;
- ``contains(key)`` answers the same question without counting or touching recency
  (for the scheduler's claim; the loader's ``get`` may still miss after an eviction);
- host bytes stay ``<= capacity_bytes``; eviction drops the entry of least value
  ``(1 + hits) * tokens * 2 ** (-age / half_life)``, ``age`` = store operations (puts and
  hits) since the entry was last put or hit; ties go to the least recently used;
- thread-safe (one lock); ``stats()`` names are the ``cp_engine_<name>`` metric names.
"""
from __future__ import annotations

import heapq
import itertools
import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from .keys import BlockKey

__all__ = ["BlockKVStore", "STATS_HELP", "kv_shape", "dtype_name"]

# name -> (kind, help); kind "gauge" (a current value) or "counter" (monotonic).
STATS_HELP: dict[str, tuple[str, str]] = {
    "blend_store_bytes": ("gauge", "Host bytes held by the blend block store."),
    "blend_store_entries": ("gauge", "Blocks held by the blend block store."),
    "blend_store_tokens": ("gauge", "Tokens whose KV the blend block store holds."),
    "blend_hits": ("counter", "Blend store lookups that returned a verified block."),
    "blend_misses": ("counter", "Blend store lookups that found no usable block (rejects included)."),
    "blend_rejects": ("counter", "Blend store entries dropped on lookup: token ids, shape or dtype did not match."),
    "blend_evictions": ("counter", "Blocks evicted from the blend store to stay within its byte bound."),
    "blend_store_refused": ("counter", "Blocks not stored: wrong shape, dtype or device, or larger than the bound."),
    "blend_stored_tokens": ("counter", "Tokens of blocks put into the blend store."),
    "blend_reused_tokens": ("counter", "Tokens of blocks returned by blend store hits."),
}


def kv_shape(key: BlockKey) -> tuple[int, ...]:
    """The shape an entry for ``key`` must have."""
    lay = key.layout
    return (lay.num_layers, 2, len(key.token_ids), lay.num_kv_heads, lay.head_dim)


def dtype_name(kv: Any) -> str:
    """``float32``/``bfloat16``/... for NumPy arrays and torch tensors alike."""
    return str(kv.dtype).removeprefix("torch.")


def _nbytes(kv: Any) -> int:
    if isinstance(kv, np.ndarray):
        return int(kv.nbytes)
    return int(kv.numel()) * int(kv.element_size())


def _fits(key: BlockKey, kv: Any) -> str | None:
    """Why ``kv`` cannot be ``key``'s entry, or None."""
    if key.layout is None:
        return "key has no layout"
    if not isinstance(kv, np.ndarray) and not (hasattr(kv, "element_size") and hasattr(kv, "device")):
        return f"not an array or tensor: {type(kv).__name__}"
    if tuple(kv.shape) != kv_shape(key):
        return f"shape {tuple(kv.shape)} != {kv_shape(key)}"
    if dtype_name(kv) != key.layout.dtype:
        return f"dtype {dtype_name(kv)} != {key.layout.dtype}"
    if not isinstance(kv, np.ndarray) and str(kv.device) != "cpu":
        return f"device {kv.device} is not host memory"
    return None


@dataclass
class _Entry:
    key: BlockKey
    kv: Any
    nbytes: int
    hits: int
    last_use: int
    version: int


class BlockKVStore:
    """Context blocks' KV in host memory (see module contract)."""

    def __init__(self, capacity_bytes: int, half_life: float = 4096.0):
        if capacity_bytes < 0 or half_life <= 0:
            raise ValueError("capacity_bytes must be >= 0 and half_life > 0")
        self.capacity_bytes = int(capacity_bytes)
        self.half_life = float(half_life)
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], _Entry] = {}
        self._heap: list[tuple[float, int, int, tuple[str, str]]] = []
        self._clock = 0
        self._versions = itertools.count()
        self._bytes = 0
        self._tokens = 0
        self._counts = {name: 0 for name, (kind, _) in STATS_HELP.items() if kind == "counter"}

    @classmethod
    def from_config(cls, config: Any) -> "BlockKVStore":
        """Sized by ``CP_ENGINE_BLEND_STORE_MB`` (``Config.blend_store_mb``)."""
        return cls(int(config.blend_store_mb) << 20)

    # -- value and eviction ------------------------------------------------------------
    def _priority(self, entry: _Entry) -> float:
        # log2 of the value plus the entry's last use in half-lives: the common decay
        # term (-now / half_life) shifts every entry alike, so heap order never goes stale.
        return math.log2((1 + entry.hits) * len(entry.key.token_ids)) + entry.last_use / self.half_life

    def _touch(self, lookup: tuple[str, str], entry: _Entry) -> None:
        self._clock += 1
        entry.last_use = self._clock
        entry.version = next(self._versions)
        heapq.heappush(self._heap, (self._priority(entry), entry.last_use, entry.version, lookup))
        if len(self._heap) > 4 * len(self._entries) + 64:
            self._heap = [(self._priority(e), e.last_use, e.version, k) for k, e in self._entries.items()]
            heapq.heapify(self._heap)

    def _drop(self, lookup: tuple[str, str]) -> None:
        entry = self._entries.pop(lookup)
        self._bytes -= entry.nbytes
        self._tokens -= len(entry.key.token_ids)

    def _evict_until(self, free_bytes: int, keep: tuple[str, str]) -> None:
        while self._bytes + free_bytes > self.capacity_bytes and self._heap:
            _, _, version, lookup = heapq.heappop(self._heap)
            entry = self._entries.get(lookup)
            if entry is None or entry.version != version or lookup == keep:
                continue  # stale heap item
            self._drop(lookup)
            self._counts["blend_evictions"] += 1

    # -- public interface ----------------------------------------------------------------
    def put(self, key: BlockKey, kv: Any) -> bool:
        reason = _fits(key, kv)
        nbytes = _nbytes(kv) if reason is None else 0
        with self._lock:
            if reason is not None or nbytes > self.capacity_bytes:
                self._counts["blend_store_refused"] += 1
                return False
            if isinstance(kv, np.ndarray):
                kv.flags.writeable = False
            lookup = key.lookup
            old = self._entries.get(lookup)
            hits = old.hits if old is not None and old.key.token_ids == key.token_ids else 0
            if old is not None:
                self._drop(lookup)
            self._evict_until(nbytes, keep=lookup)
            entry = _Entry(key, kv, nbytes, hits, 0, 0)
            self._entries[lookup] = entry
            self._bytes += nbytes
            self._tokens += len(key.token_ids)
            self._counts["blend_stored_tokens"] += len(key.token_ids)
            self._touch(lookup, entry)
            return True

    def _verified(self, key: BlockKey) -> _Entry | None:
        """The entry under ``key`` if it passes every check; a failing one is dropped."""
        lookup = key.lookup
        entry = self._entries.get(lookup)
        if entry is None:
            return None
        try:
            ok = entry.key.token_ids == key.token_ids and _fits(key, entry.kv) is None
        except Exception:  # a corrupt entry is a miss, never an error
            ok = False
        if not ok:
            self._drop(lookup)
            self._counts["blend_rejects"] += 1
            return None
        return entry

    def get(self, key: BlockKey) -> Any | None:
        """The block's KV (see module docstring for its layout) or None."""
        with self._lock:
            entry = self._verified(key)
            if entry is None:
                self._counts["blend_misses"] += 1
                return None
            entry.hits += 1
            self._counts["blend_hits"] += 1
            self._counts["blend_reused_tokens"] += len(key.token_ids)
            self._touch(key.lookup, entry)
            return entry.kv

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            return self._verified(key) is not None

    def remove(self, key: BlockKey) -> bool:
        with self._lock:
            if key.lookup not in self._entries:
                return False
            self._drop(key.lookup)
            return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._heap.clear()
            self._bytes = self._tokens = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def stats(self) -> dict[str, int]:
        """Gauges and counters by metric name (``STATS_HELP``)."""
        with self._lock:
            out = dict(self._counts)
            out.update(blend_store_bytes=self._bytes, blend_store_entries=len(self._entries),
                       blend_store_tokens=self._tokens)
            return out
