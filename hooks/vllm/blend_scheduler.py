"""EngineCore side of the blend connector: what to claim for a request, and what to store.

Contract (docs/blend-design.md, sections 4 and 6):
- ``matched_tokens(request, hit)`` claims nothing unless blend is usable on this engine
  (the worker has reported its KV layout and no reason to stop), the request has valid
  ``cp_spans`` (``request_hints.read_spans``; pairs, or the flat ``[s0, e0, s1, e1, ...]``
  a client can send through vLLM's HTTP schema) and no ``prompt_embeds`` or multimodal
  inputs. Otherwise it plans with ``cp_engine.blend.plan`` against the mirror index
  of stored keys (fed by the worker, one step late), scoped by ``cp_scope`` and
  ``cache_salt``, and claims ``plan.claimed`` tokens as a synchronous load; the recompute
  ratio and mode are the request's own ``cp_blend_ratio`` / ``cp_blend_mode`` where valid
  (``cp_engine.blend.settings``), else the flags';
- before returning a claim it re-keys the request's block hashes from the block holding
  the first stitched token onward, so vLLM never serves stitched KV (or anything that
  attended to it) as an exact prefix hit; a hinted request (``cp_path``) also gets
  ``evict_path`` on ``hooks.channel`` for its rendered path from that block on;
- claims per step are capped (``MAX_CLAIMED_PER_STEP`` tokens and
  ``MAX_RECOMPUTED_PER_STEP`` full-depth tokens): a request that would pass the cap
  waits for the next step (``None``), or claims nothing when the step is still empty;
- ``build_meta`` orders this step's loads and the saves of context blocks the step
  finishes computing (not already stored, not reused): blocks entirely before the
  request's first stitched token are exact (depth 0); a block after it attends to
  stitched KV and gets depth 1 + the deepest entry the request reused, and is saved only
  while that is within the request's store depth (``CP_ENGINE_BLEND_STORE_DEPTH``,
  lowered by ``cp_blend_store_depth``), so approximation compounds a bounded number of
  times; each save carries the block's lead digest, and a plan keeps a block whose
  entry was stored behind the same lead whole (``cp_engine.blend.leads``;
  ``CP_ENGINE_BLEND_CARRY``, ``cp_blend_carry``);
- ``reset()`` (vLLM's ``reset_prefix_cache`` with the connector) forgets every stored
  key at once and orders the worker to empty its store before the next step's loads;
- ``finished`` forgets the request. Nothing here raises into vLLM's scheduler: a
  failure counts ``hook_failures`` and the request runs as a plain one.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from cp_engine.blend.keys import Scope, block_key
from cp_engine.blend.leads import lead_digests
from cp_engine.blend.plan import ReusePlan, blocks_to_store, plan_reuse
from cp_engine.blend.settings import BlendSettings, read_settings
from cp_engine.request_hints import SPANS, read_scope, read_spans

from .. import channel, faults, metrics
from . import hints as _hints
from .blend_meta import BlendMetadata, BlendWorkerMeta, LoadOrder, SaveOrder

__all__ = ["BlendScheduler", "MirrorIndex", "MAX_CLAIMED_PER_STEP", "MAX_RECOMPUTED_PER_STEP", "MARK"]

logger = logging.getLogger("cp_engine.hooks")

# The claimed tokens are loaded and recomputed inside one step, outside vLLM's token
# budget; these bound how much longer a step can get.
MAX_CLAIMED_PER_STEP = 16384
MAX_RECOMPUTED_PER_STEP = 4096
MARK = "cp_engine_blend"  # prefix of a re-keyed block hash: no exact request hashes it


def _paired(extra: Any) -> Any:
    """``extra_args`` with a flat ``cp_spans`` ``[s0, e0, s1, e1, ...]`` turned into pairs.

    vLLM's HTTP schema for ``vllm_xargs`` admits lists of scalars only, so a client on
    ``/v1/completions`` sends the flat form; the API server's own hints are pairs.
    """
    raw = extra.get(SPANS) if isinstance(extra, dict) else None
    if isinstance(raw, list) and raw and len(raw) % 2 == 0 and all(type(v) is int for v in raw):
        return {**extra, SPANS: [raw[i:i + 2] for i in range(0, len(raw), 2)]}
    return extra


class MirrorIndex:
    """The worker's stored keys as the scheduler knows them: ``BlockKey.lookup`` pair ->
    the entry's depth (stitching generations behind it) and lead digest."""

    def __init__(self) -> None:
        self._keys: dict[tuple[str, str], tuple[int, str | None]] = {}

    def apply(self, stored, dropped) -> None:
        """``stored``: ``(lookup, depth, lead)`` triples; ``dropped``: lookups."""
        for lookup in dropped:
            self._keys.pop(tuple(lookup), None)
        for lookup, depth, lead in stored:
            self._keys[tuple(lookup)] = (int(depth), lead)

    def contains(self, key: Any) -> bool:
        return key.lookup in self._keys

    def depth(self, key: Any) -> int:
        """The entry's depth; 0 for a key not held (it is about to be reused or stored)."""
        return self._keys.get(key.lookup, (0, None))[0]

    def lead(self, key: Any) -> str | None:
        """The lead digest the entry was stored behind; None when unknown or not held."""
        return self._keys.get(key.lookup, (0, None))[1]

    def __len__(self) -> int:
        return len(self._keys)


@dataclass
class _Request:
    prompt: tuple[int, ...]
    scope: Scope
    spans: tuple[tuple[int, int], ...]
    exact_end: int  # tokens before this were computed exactly (first stitched token)
    settings: BlendSettings
    after_depth: int = 0  # depth of blocks after exact_end: 1 + deepest reused entry
    block_ids: list[int] = field(default_factory=list)
    pending: list[tuple[int, int]] = field(default_factory=list)  # spans not yet saved
    plan: ReusePlan | None = None  # claimed, not yet ordered to load
    loaded: bool = False
    marked: bool = False
    _leads: list[str | None] | None = None

    @property
    def leads(self) -> list[str | None]:
        """Each span's lead digest in this prompt (computed once per request)."""
        if self._leads is None:
            self._leads = lead_digests(self.prompt, self.spans)
        return self._leads

    def lead(self, span: tuple[int, int]) -> str | None:
        """The lead digest of ``span``, one of ``spans``."""
        return self.leads[self.spans.index(span)]


def hash_block_size_of(vllm_config: Any, kv_cache_config: Any = None) -> int:
    """Tokens per entry of ``Request.block_hashes``, as vLLM's scheduler resolves it.

    Asked of vLLM's own ``resolve_kv_cache_block_sizes`` (0.27-0.32) when the KV cache
    config is known; otherwise the block size. The fallback errs coarse, the safe side:
    re-keying then starts at an earlier block, never after a stitched one (the hash unit
    always divides the block size).
    """
    if kv_cache_config is not None:
        try:
            from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

            return int(resolve_kv_cache_block_sizes(kv_cache_config, vllm_config)[1])
        except Exception:  # moved, or a config it cannot read: the coarse unit below
            logger.debug("hash block size: vLLM's resolver unavailable; using the block size", exc_info=True)
    return int(vllm_config.cache_config.block_size)


class BlendScheduler:
    """See module contract. ``config`` is ``cp_engine.config.Config``."""

    def __init__(self, vllm_config: Any, config: Any, kv_cache_config: Any = None) -> None:
        cache = vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.hash_block_size = hash_block_size_of(vllm_config, kv_cache_config)
        self.hash_algo = cache.prefix_caching_hash_algo
        self.config = config
        self.mirror = MirrorIndex()
        self.layout = None
        self.disabled = ""
        self.requests: dict[str, _Request] = {}
        self._step_claimed = 0
        self._step_recomputed = 0.0
        self._hash_fn = None
        self._store_snapshot: dict[str, Any] = {}
        self._reset_pending = False

    # -- helpers -----------------------------------------------------------------------
    def _key_of(self, scope: Scope):
        layout = self.layout
        return lambda ids: block_key(layout, scope, ids)

    def _recompute_cost(self, plan: ReusePlan) -> float:
        layers = self.layout.num_layers
        # the check layers run in full, and the layer after them up to its K (counted in full)
        return plan.full_depth_tokens(layers, min(self.config.blend_check_layers + 1, layers))

    def _track(self, request: Any) -> _Request | None:
        """The request's blend state, created on first sight; None when it has none."""
        rid = request.request_id
        st = self.requests.get(rid)
        if st is not None:
            return st
        if getattr(request, "prompt_embeds", None) is not None or getattr(request, "mm_features", None):
            return None  # the prompt's ids are not what the model saw
        params = getattr(request, "sampling_params", None)
        extra = getattr(params, "extra_args", None) if params is not None else None
        prompt = tuple(request.prompt_token_ids or ())
        spans = read_spans(_paired(extra), len(prompt))
        if not spans:
            return None
        scope = Scope(read_scope(extra), request.cache_salt or "")
        settings = read_settings(extra, self.config.blend_ratio, self.config.blend_mode,
                                 self.config.blend_store_depth, self.config.blend_carry)
        st = self.requests[rid] = _Request(prompt, scope, spans, exact_end=len(prompt), settings=settings,
                                           pending=list(spans))
        return st

    def _plan(self, st: _Request, hit: int) -> ReusePlan:
        key_of = self._key_of(st.scope)
        ratio = st.settings.ratio

        def plan(r: float) -> ReusePlan:
            return plan_reuse(st.prompt, st.spans, hit, self.block_size, self.mirror.contains, ratio=r,
                              mode=st.settings.mode, first_tokens=self.config.blend_first_tokens, key_of=key_of,
                              recompute_cost=self.config.blend_recompute_cost,
                              lead_of=self.mirror.lead if st.settings.carry else None,
                              leads=st.leads if st.settings.carry else None)

        out = plan(ratio)
        if out.empty and ratio >= 1.0:
            # Ratio 1 recomputes every claimed token, so plan_reuse finds nothing saved and
            # claims nothing; it is the exactness setting (tests, the quality sweep's end
            # point), so claim what ratio 0 would and recompute all of it.
            base = plan(0.0)
            if not base.empty:
                out = dataclasses.replace(base, ratio=1.0, recomputed=base.claimed, needs_deviation=False)
        return out

    def _rekey(self, request: Any, first_token: int) -> bool:
        """Mark the block hashes from the block holding ``first_token`` on (design §4)."""
        hashes = request.block_hashes
        if not hashes:
            return False  # no full block yet: the first one would get an exact hash later
        if self._hash_fn is None:
            from vllm.utils.hashing import get_hash_fn_by_name

            self._hash_fn = get_hash_fn_by_name(self.hash_algo)
        from vllm.v1.core.kv_cache_utils import BlockHash

        # A stitched token in the last, partial block: mark the last full one, since the
        # partial block's hash will chain from it once it fills up.
        first = min(first_token // self.hash_block_size, len(hashes) - 1)
        for j in range(first, len(hashes)):
            hashes[j] = BlockHash(self._hash_fn((MARK, hashes[j])))
        return True

    @staticmethod
    def _depth(st: _Request, span: tuple[int, int]) -> int | None:
        """The depth a block at ``span`` would be stored with; None: it may not be stored."""
        if span[1] <= st.exact_end:
            return 0
        return st.after_depth if st.after_depth <= st.settings.store_depth else None

    def _evict_index_path(self, request: Any, first_token: int) -> None:
        hints = _hints.of_request(request)
        if hints is None or not hints.path:
            return
        depth = next((i for i, end in enumerate(hints.ends) if end > first_token), 0)
        channel.engine_sender().send({"op": "evict_path", "ns": hints.namespace,
                                      "path": channel.hex_ids(hints.path[:depth + 1])})
        metrics.inc("evictions_sent", 1)

    # -- vLLM hooks ----------------------------------------------------------------------
    def matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        if self.disabled:
            return 0, False
        with faults.guarded("vllm_blend_scheduler"):
            return self._claim(request, int(num_computed_tokens))
        return 0, False

    def _claim(self, request: Any, hit: int) -> tuple[int | None, bool]:
        st = self._track(request)
        if st is None:
            return 0, False
        st.plan = None
        if self.layout is None:
            return 0, False  # nothing stored yet; the request's blocks are still saved
        plan = self._plan(st, hit)
        if plan.empty:
            return 0, False
        cost = self._recompute_cost(plan)
        if (self._step_claimed + plan.claimed > MAX_CLAIMED_PER_STEP
                or self._step_recomputed + cost > MAX_RECOMPUTED_PER_STEP):
            if self._step_claimed:
                return None, False  # ask again next step
            metrics.inc("blend_fallbacks", reason="step_cap")
            return 0, False
        first = plan.first_stitched
        if not st.marked:
            if not self._rekey(request, first):
                metrics.inc("blend_fallbacks", reason="no_full_block")
                return 0, False
            st.marked = True
            self._evict_index_path(request, first)
        st.exact_end = min(st.exact_end, first)
        st.after_depth = max(st.after_depth, 1 + max(self.mirror.depth(b.key) for b in plan.blocks))
        st.pending = [s for s in st.pending if self._depth(st, s) is not None]
        st.plan = plan
        self._step_claimed += plan.claimed
        self._step_recomputed += cost
        return plan.claimed, False

    def after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        st = self.requests.get(request.request_id)
        if st is None:
            return
        with faults.guarded("vllm_blend_scheduler"):
            st.block_ids = list(blocks.get_block_ids()[0])
            if st.plan is not None and num_external_tokens != st.plan.claimed:
                st.plan = None  # vLLM kept its own hit instead of the claim

    def reset(self) -> bool:
        """Forget every stored key now; the worker empties its store next step."""
        self.mirror = MirrorIndex()
        self._reset_pending = True
        return True

    def build_meta(self, scheduler_output: Any) -> BlendMetadata:
        meta = BlendMetadata(reset=self._reset_pending)
        self._reset_pending = False
        self._step_claimed, self._step_recomputed = 0, 0.0
        if not self.requests:
            return meta
        with faults.guarded("vllm_blend_scheduler"):
            self._collect(scheduler_output, meta)
        return meta

    def _collect(self, out: Any, meta: BlendMetadata) -> None:
        progress: dict[str, int] = {}
        for req in out.scheduled_new_reqs:
            if req.req_id in self.requests:
                progress[req.req_id] = req.num_computed_tokens
        cached = out.scheduled_cached_reqs
        resumed = getattr(cached, "resumed_req_ids", set())
        for i, rid in enumerate(cached.req_ids):
            st = self.requests.get(rid)
            if st is None:
                continue
            progress[rid] = cached.num_computed_tokens[i]
            new = cached.new_block_ids[i]
            if new is not None and rid not in resumed:
                st.block_ids.extend(new[0])
            elif new is not None:
                st.block_ids = list(new[0])
        for rid, computed in progress.items():
            st = self.requests[rid]
            if st.plan is not None:
                plan, st.plan = st.plan, None
                meta.loads.append(LoadOrder(rid, tuple(st.block_ids), st.prompt[:plan.claim_end], plan))
                st.loaded = True
            done = computed + out.num_scheduled_tokens.get(rid, 0)
            ready = [s for s in st.pending if s[1] <= done]
            if not ready:
                continue
            st.pending = [s for s in st.pending if s not in ready]
            ready = [s for s in ready if self._depth(st, s) is not None]
            if self.layout is not None:  # drop blocks the store already holds
                ready = [s for _, s in blocks_to_store(st.prompt, ready, self.mirror.contains, None,
                                                        self._key_of(st.scope))]
            for start, end in ready:
                meta.saves.append(SaveOrder(rid, st.scope, start, end, st.prompt[start:end], tuple(st.block_ids),
                                            depth=self._depth(st, (start, end)), lead=st.lead((start, end))))

    def on_worker_output(self, connector_output: Any) -> None:
        with faults.guarded("vllm_blend_scheduler"):
            wm = getattr(connector_output, "kv_connector_worker_meta", None)
            if isinstance(wm, BlendWorkerMeta):
                if wm.layout is not None and self.layout is None:
                    self.layout = wm.layout
                if wm.disabled and not self.disabled:
                    self.disabled = wm.disabled
                    metrics.inc("blend_disabled", reason=wm.disabled)
                    logger.warning("cp_engine: blend off on this engine (%s); prefix caching only", wm.disabled)
                self.mirror.apply(wm.stored, wm.dropped)
            stats = getattr(connector_output, "kv_connector_stats", None)
            if stats is not None and getattr(stats, "data", None):
                from .blend_stats import feed_metrics

                self._store_snapshot = feed_metrics(stats, self._store_snapshot)
            channel.forward_metrics()

    def finished(self, request: Any) -> None:
        self.requests.pop(request.request_id, None)
