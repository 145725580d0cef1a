"""One simulated engine with blend: a vLLM-like prefix cache and a bounded block store,
serving rendered prompts one at a time; no engine, no tensors.

``PrefixCache`` is the engine's prefix cache (hash-chained KV blocks, LRU). ``BlendEngine``
puts blend in front of it: per request, the engine's prefix hit, then ``plan.plan_reuse``
against a ``BlockKVStore`` (entries are broadcast views: sized from the layout, never
allocated, so the store's own value policy and byte bound apply as in a server), then
``plan.blocks_to_store``. A request blend claimed commits only its blocks before the
claim to the prefix cache unless ``commit_stitched``.

Store depth (``store_depth``): a stored entry's depth is 0 when the request computed it
exactly (it ends at or before the first stitched token), else 1 + the deepest entry the
request reused; only entries within ``store_depth`` are stored (None: any depth). Depth 0
stores exactly what ``blocks_to_store`` gives without ``after_stitched``.

Carried blocks (``carry``, the default as in the connector): each stored entry keeps the
lead digest it was computed behind (``cp_engine.blend.leads``) and the plan keeps a block
stored behind the same lead whole.

``BlendEngine(ratio=None)`` is prefix caching alone (no store, no plan): the baseline
with the same cache. ``serve`` returns the request's counts; ``totals`` sums them
(``computed_tokens`` = engine-computed + blend-recomputed + the check-layer pass, in
whole-model tokens). Both the blend simulation and the scale-out simulation run these,
so one model of blend serves both.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np

from cp_engine.blend.keys import KVLayout, Scope, block_key
from cp_engine.blend.leads import lead_digests
from cp_engine.blend.plan import blocks_to_store, plan_reuse
from cp_engine.blend.spans import Rendered
from cp_engine.blend.store import BlockKVStore, kv_shape

COUNTS = ("prompt_tokens", "engine_cached_tokens", "claimed_tokens", "reused_tokens", "recomputed_tokens",
          "check_layer_tokens", "engine_computed_tokens", "requests_blended", "carried_tokens")
STORE_STATS = ("blend_store_entries", "blend_store_tokens", "blend_stored_tokens", "blend_hits",
               "blend_evictions", "blend_store_refused")


class PrefixCache:
    """vLLM-like prefix cache of ``capacity`` KV blocks (None: unbounded).

    ``lookup`` returns the tokens served (whole blocks, hash-chained, never the last
    prompt token) and refreshes them; ``commit(ids, upto)`` remembers the full blocks of
    ``ids[:upto]``, the first block most recently used (vLLM frees a request's blocks
    tail first), and evicts the least recently used beyond the capacity.
    """

    def __init__(self, block_size: int, capacity: int | None):
        self.block_size, self.capacity = block_size, capacity
        self._lru: OrderedDict[int, None] = OrderedDict()

    def _chain(self, ids: Sequence[int], blocks: int) -> list[int]:
        out, h, b = [], 0, self.block_size
        for j in range(blocks):
            h = hash((h, tuple(ids[j * b:(j + 1) * b])))
            out.append(h)
        return out

    def lookup(self, ids: Sequence[int]) -> int:
        served = 0
        for h in self._chain(ids, (len(ids) - 1) // self.block_size):
            if h not in self._lru:
                break
            self._lru.move_to_end(h)
            served += self.block_size
        return served

    def commit(self, ids: Sequence[int], upto: int | None = None) -> None:
        upto = len(ids) if upto is None else upto
        for h in reversed(self._chain(ids, upto // self.block_size)):
            self._lru[h] = None
            self._lru.move_to_end(h)
        while self.capacity is not None and len(self._lru) > self.capacity:
            self._lru.popitem(last=False)


class BlendEngine:
    """Prefix cache + (``ratio`` not None) blend against a bounded block store."""

    def __init__(self, ratio: float | None, block_size: int, capacity: int | None, store_bytes: int,
                 layout: KVLayout, commit_stitched: bool = False, mode: str = "both", first_tokens: int = 16,
                 check_layers: int = 1, store_depth: int | None = 0, carry: bool = True):
        if store_depth is not None and store_depth < 0:
            raise ValueError("store_depth must be >= 0 or None")
        self.ratio, self.block_size, self.layout = ratio, block_size, layout
        self.commit_stitched, self.mode, self.first_tokens = commit_stitched, mode, first_tokens
        self.check_layers, self.store_depth, self.carry = check_layers, store_depth, carry
        self.cache = PrefixCache(block_size, capacity)
        self.store = BlockKVStore(store_bytes)
        self.counts = {k: 0 for k in COUNTS}
        self.counts["check_layer_tokens"] = 0.0
        self._scope = Scope()
        self._zero = np.zeros((), dtype=np.float32)  # entries are broadcast views of it
        self._depth: dict = {}  # store key -> depth when it was put (stale after eviction: harmless)
        self._lead: dict = {}  # store key -> lead digest when it was put (likewise)

    def _key(self, ids):
        return block_key(self.layout, self._scope, ids)

    def serve(self, r: Rendered) -> dict:
        """Run one prompt; its counts (the ``COUNTS`` names, computed_tokens too)."""
        ids, n = r.ids, len(r.ids)
        hit = self.cache.lookup(ids)
        if self.ratio is None:
            self.cache.commit(ids)
            c = dict.fromkeys(COUNTS, 0)
            c.update(prompt_tokens=n, engine_cached_tokens=hit, engine_computed_tokens=n - hit,
                     check_layer_tokens=0.0)
            return self._add(c)
        store = self.store
        leads = lead_digests(ids, r.spans)
        plan = plan_reuse(ids, r.spans, hit, self.block_size, store.contains, ratio=self.ratio, mode=self.mode,
                          first_tokens=self.first_tokens, key_of=self._key,
                          lead_of=self._lead.get if self.carry else None, leads=leads)
        for b in plan.blocks:
            store.get(b.key)  # the loader's read: counts the hit, refreshes the entry
        c = {"prompt_tokens": n, "engine_cached_tokens": hit, "claimed_tokens": plan.claimed,
             "reused_tokens": plan.reused, "recomputed_tokens": plan.recomputed,
             "check_layer_tokens": plan.full_depth_tokens(self.layout.num_layers, self.check_layers)
             - plan.recomputed, "engine_computed_tokens": n - hit - plan.claimed,
             "requests_blended": int(not plan.empty), "carried_tokens": plan.carried_tokens}
        self.cache.commit(ids, None if plan.empty or self.commit_stitched else plan.claim_start)
        lead_at = dict(zip((tuple(s) if s is not None else None for s in r.spans), leads))
        for key, depth, span in self._to_store(ids, r.spans, plan):
            store.put(key, np.broadcast_to(self._zero, kv_shape(key)))
            self._depth[key] = depth
            self._lead[key] = lead_at.get(tuple(span))
        return self._add(c)

    def _to_store(self, ids, spans, plan) -> list[tuple]:
        """(key, depth, span) of the request's blocks to store, in prompt order."""
        store = self.store
        if self.store_depth == 0:
            return [(k, 0, s) for k, s in blocks_to_store(ids, spans, store.contains, plan, self._key, False)]
        first = plan.first_stitched
        behind = 1 + max((self._depth.get(b.key, 0) for b in plan.blocks), default=0)
        out = []
        for key, (start, end) in blocks_to_store(ids, spans, store.contains, plan, self._key, True):
            depth = 0 if first is None or end <= first else behind
            if self.store_depth is None or depth <= self.store_depth:
                out.append((key, depth, (start, end)))
        return out

    def _add(self, c: dict) -> dict:
        c["computed_tokens"] = c["engine_computed_tokens"] + c["recomputed_tokens"] + c["check_layer_tokens"]
        for k in COUNTS:
            self.counts[k] += c[k]
        return c

    def totals(self) -> dict:
        """Summed counts (check-layer tokens rounded), computed_tokens and the store's stats."""
        c = dict(self.counts)
        c["check_layer_tokens"] = round(c["check_layer_tokens"])
        c["computed_tokens"] = c["engine_computed_tokens"] + c["recomputed_tokens"] + c["check_layer_tokens"]
        st = self.store.stats()
        c["store"] = {k: st[k] for k in STORE_STATS}
        return c
