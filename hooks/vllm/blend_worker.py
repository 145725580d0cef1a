"""Worker side of the blend connector: stitch stored block KV into a request's paged
blocks, recompute the selection, store exactly computed blocks, report counts.

Contract (docs/blend-design.md, sections 3 and 6):
- ``register(kv_caches, runner)`` runs once: it takes the model from the model runner
  (``runner.get_model()``; every registered layer name must be one of its modules, else
  ``disabled="model_unreachable"``), builds ``PagedKV`` and ``DecoderRecompute`` (their
  ``reason`` disables blend on an unsupported layout or model), the ``KVLayout`` store
  keys are built under, and the ``BlockKVStore``. A disabled worker never touches the
  cache; the reason reaches the scheduler in the next worker meta;
- ``load_all(orders)`` (before the forward, the step's loads): for each order
  ``store.get`` every reused block, moves K to its new start and writes K/V into the
  claimed slots (``blend_stitch.write_moved``: one write per layer); then one
  ``DecoderRecompute.run_batch`` over every order's selection (measuring the K deviation
  over the check layers when a plan ranks by it). Any failure (a miss after eviction, a
  corrupt entry, an error in the pass) puts the claimed blocks of the orders it touched
  in ``load_errors`` so vLLM recomputes them (``kv_load_failure_policy="recompute"``);
- ``save_all(orders)`` (after the forward, the step's saves): reads every block's K/V
  with one cache read per layer, normalises K to position 0 and ``put``s each block the
  store does not hold already; the entry's depth and lead (``order.depth``, ``order.lead``)
  are reported with it.
  Entries loaded in the step are put back if a save evicted them (pinned for the step);
- ``reset()`` empties the store (the scheduler has forgotten its keys already);
- ``end_step()`` reports the step's store changes as they stand at its end: an entry
  put and evicted within the step is reported dropped, never stored;
- ``take_stats()`` / ``take_meta()`` hand over what happened since the last call.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch

from cp_engine.blend.keys import KVLayout, block_key, model_fingerprint
from cp_engine.blend.rope import shift_k
from cp_engine.blend.store import BlockKVStore

from .. import channel, faults
from .blend_meta import BlendWorkerMeta, LoadOrder, SaveOrder
from .blend_stats import BlendStats

from .blend_layout import PagedKV, UnsupportedLayout
from .blend_recompute import DecoderRecompute, RecomputeJob, UnsupportedModel
from .blend_stitch import write_moved

__all__ = ["BlendWorker"]

logger = logging.getLogger("cp_engine.hooks")


def _refusal(vllm_config: Any) -> str:
    """Why blend cannot run on this engine whatever the model ("" when it can)."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "tensor_parallel_size", 1) > 1 or getattr(parallel, "pipeline_parallel_size", 1) > 1:
        return "parallel"
    if getattr(vllm_config, "speculative_config", None) is not None:
        return "speculative"
    if str(getattr(vllm_config.cache_config, "cache_dtype", "auto")) != "auto":
        return "quantized_kv"
    if getattr(vllm_config.model_config, "get_sliding_window", lambda: None)():
        return "sliding_window"
    if getattr(getattr(vllm_config, "scheduler_config", None), "async_scheduling", False):
        # vLLM's CPU platform always schedules synchronously, so the connector has never
        # been checked with a step scheduled before the last one's results came back.
        return "async_scheduling"
    return ""


def _fingerprint(model: str, revision: str | None) -> str:
    if os.path.isdir(model):
        return model_fingerprint(model)
    return revision or "no-revision"


class BlendWorker:
    def __init__(self, vllm_config: Any, config: Any) -> None:
        self.vllm_config = vllm_config
        self.config = config
        self.block_size = int(vllm_config.cache_config.block_size)
        self.disabled = ""
        self.paged = self.recompute = self.layout = self.store = None
        self.stats = BlendStats()
        self.meta = BlendWorkerMeta()
        self.load_errors: set[int] = set()
        # lookup -> (key, (depth, lead)), as reported; a pinned entry keeps its (depth, lead) too
        self._stored: dict[tuple[str, str], tuple[Any, tuple[int, str | None]]] = {}
        self._pinned: dict[tuple[str, str], tuple[Any, Any, tuple[int, str | None]]] = {}
        self._store_changed = False

    # -- setup ---------------------------------------------------------------------------
    def _disable(self, reason: str) -> None:
        if not self.disabled:
            self.disabled = self.meta.disabled = reason
            logger.warning("cp_engine: blend disabled on this worker (%s); prefix caching only", reason)

    def register(self, kv_caches: dict, runner: Any) -> None:
        try:
            self._setup(kv_caches, runner)
        except (UnsupportedLayout, UnsupportedModel) as exc:
            self._disable(getattr(exc, "reason", "unsupported"))
        except Exception as exc:
            faults.record_failure("vllm_blend_worker", exc)
            self._disable("setup_error")

    def _setup(self, kv_caches: dict, runner: Any) -> None:
        reason = _refusal(self.vllm_config)
        if reason:
            return self._disable(reason)
        model = runner.get_model() if hasattr(runner, "get_model") else None
        modules = dict(model.named_modules()) if isinstance(model, torch.nn.Module) else {}
        if not kv_caches or not set(kv_caches) <= set(modules):
            return self._disable("model_unreachable")
        attention = {name: mod for name, mod in modules.items() if name in kv_caches}  # model order
        blocks = getattr(self.vllm_config.cache_config, "num_gpu_blocks", None)
        self.paged = PagedKV(kv_caches, attention, self.block_size, int(blocks) if blocks else None)
        self.recompute = DecoderRecompute.from_model(model, self.paged)
        mc = self.vllm_config.model_config
        self.layout = KVLayout.make(
            model=str(mc.model), fingerprint=_fingerprint(str(mc.model), getattr(mc, "revision", None)),
            dtype=str(self.paged.dtype).removeprefix("torch."), num_layers=len(self.paged.layer_names),
            num_kv_heads=int(self.paged.num_kv_heads), head_dim=int(self.paged.head_dim),
            block_size=self.block_size, rope=self.recompute.rope.identity(),
            extra={"tp_rank": 0, "kv_cache_dtype": str(self.vllm_config.cache_config.cache_dtype)})
        self.store = BlockKVStore.from_config(self.config)
        self.meta.layout = self.layout
        logger.info("cp_engine: blend worker ready (%d layers, store %d MiB)", self.layout.num_layers,
                    self.config.blend_store_mb)

    @property
    def ready(self) -> bool:
        return self.store is not None and not self.disabled

    # -- load ----------------------------------------------------------------------------
    def _claimed_blocks(self, order: LoadOrder) -> set[int]:
        plan, bs = order.plan, self.block_size
        return set(order.block_ids[plan.claim_start // bs:-(-plan.claim_end // bs)])

    def load_all(self, orders: list[LoadOrder]) -> None:
        """Stitch every order's stored blocks, then recompute all their selections in one
        pass. An order whose stitching fails is reported alone; a failing pass fails every
        order in it (vLLM recomputes their claimed blocks)."""
        if not self.ready:
            for order in orders:
                self.load_errors |= self._claimed_blocks(order)
            return
        stitched = []
        for order in orders:
            try:
                stitched.append((order, *self._stitch(order)))
            except Exception as exc:
                self._failed(order, exc)
        if not stitched:
            return
        try:
            reports = self.recompute.run_batch([job for _, job, _ in stitched])
        except Exception as exc:
            for order, _, _ in stitched:
                self._failed(order, exc)
            return
        for (order, _, entries), report in zip(stitched, reports):
            self._loaded(order, report, entries)

    def _failed(self, order: LoadOrder, exc: Exception) -> None:
        self.load_errors |= self._claimed_blocks(order)
        self.stats.add("load_failures")
        self.stats.fallback("store_miss" if isinstance(exc, KeyError) else "load_error")
        self._store_changed = True
        if not isinstance(exc, KeyError):
            faults.record_failure("vllm_blend_worker", exc)

    def _stitch(self, order: LoadOrder) -> tuple[RecomputeJob, list]:
        """Write the order's stored blocks, moved to their new positions, into its slots;
        returns the recompute job for its selection and the store entries used."""
        plan, paged, rope = order.plan, self.paged, self.recompute.rope
        entries = []
        for block in plan.blocks:
            kv = self.store.get(block.key)
            if kv is None:
                raise KeyError("store miss")
            entries.append((block, kv))
        slots = paged.slots(order.block_ids, 0, plan.claim_end)
        write_moved(paged, rope, slots, [(kv, block.offset, block.start, block.end - block.start)
                                         for block, kv in entries])
        # Fault point "blend_load": a load that dies with the stored KV written and the
        # recompute not run, the worst state a failed load leaves the claimed slots in.
        faults.check_fault("blend_load")
        if plan.needs_deviation:
            # Carried blocks are never ranked, so they skip the check pass too.
            checked = plan.checked_positions()
            select = torch.as_tensor(checked, dtype=torch.long)
            check = min(int(self.config.blend_check_layers), self.recompute.num_layers)

            def narrow(deviation: np.ndarray) -> np.ndarray:
                full = np.zeros(plan.claimed)
                full[checked - plan.claim_start] = deviation
                return np.searchsorted(checked, np.asarray(plan.selection(full).positions))
        else:
            select = torch.as_tensor(np.asarray(plan.selection(None).positions), dtype=torch.long)
            check, narrow = 0, None
        return RecomputeJob(order.token_ids, slots, select, check, narrow), entries

    def _loaded(self, order: LoadOrder, report, entries: list) -> None:
        plan = order.plan
        recomputed, kept = report.full_depth_tokens(), int(report.kept.numel())
        self.stats.add("loads")
        self.stats.add("claimed_tokens", plan.claimed)
        self.stats.add("recomputed_tokens", float(recomputed))
        self.stats.add("reused_tokens", plan.claimed - kept)
        for block, kv in entries:
            info = self._stored.get(block.key.lookup, (None, (0, None)))[1]
            self._pinned[block.key.lookup] = (block.key, kv, info)
        self._store_changed = True

    # -- save ----------------------------------------------------------------------------
    def save_all(self, orders: list[SaveOrder]) -> None:
        """Store every order's block the store does not hold yet: one cache read per layer
        for all of them (on a GPU each read is a kernel launch, and a step saves tens of
        blocks), then each block's K normalised to position 0 and ``put``."""
        if not self.ready or not orders:
            return
        with faults.guarded("vllm_blend_worker"):
            todo, seen = [], set()
            for order in orders:
                key = block_key(self.layout, order.scope, order.token_ids)
                if key.lookup in seen or self.store.contains(key):
                    continue
                seen.add(key.lookup)
                todo.append((order, key, self.paged.slots(order.block_ids, order.start, order.end)))
            if not todo:
                return
            read = [self.paged.read(name, torch.cat([slots for _, _, slots in todo]))
                    for name in self.paged.layer_names]
            k_all, v_all = torch.stack([k for k, _ in read]), torch.stack([v for _, v in read])
            del read
            at = 0
            for order, key, slots in todo:
                n = slots.numel()
                k = shift_k(k_all[:, at:at + n], -order.start, self.recompute.rope)
                self._put(order, key, torch.stack([k, v_all[:, at:at + n]], dim=1))
                at += n
            self._store_changed = True

    def _put(self, order: SaveOrder, key: Any, kv: torch.Tensor) -> None:
        if kv.device.type == "cuda":  # straight into pinned host memory: a load from there runs about twice as fast
            kv = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True).copy_(kv)
        else:
            kv = kv.cpu().contiguous()
        if self.store.put(key, kv):
            self._stored[key.lookup] = (key, (order.depth, order.lead))
            self.meta.stored.append((key.lookup, order.depth, order.lead))

    def reset(self) -> None:
        if not self.ready:
            return
        with faults.guarded("vllm_blend_worker"):
            self.store.clear()
            self._pinned.clear()
            self._store_changed = True

    def end_step(self) -> None:
        """After this step's saves: put back pinned entries, report what left the store."""
        if not self.ready:
            return
        with faults.guarded("vllm_blend_worker"):
            for lookup, (key, kv, info) in self._pinned.items():
                if not self.store.contains(key) and self.store.put(key, kv):
                    self._stored[lookup] = (key, info)
                    self.meta.stored.append((lookup, *info))
            self._pinned.clear()
            if self._store_changed:
                gone = [lookup for lookup, (key, _) in self._stored.items() if not self.store.contains(key)]
                for lookup in gone:
                    del self._stored[lookup]
                self.meta.dropped.extend(gone)
                # the scheduler applies drops before puts: a put evicted later in the
                # same step must not reach it as stored
                self.meta.stored = [entry for entry in self.meta.stored if entry[0] in self._stored]
                self.stats.data["store"] = self.store.stats()
                self._store_changed = False
        # The worker may be a process of its own: its hook failures reach /metrics only
        # through its own forwarder (a clock check per step, a message at most once a second).
        channel.forward_metrics()

    # -- hand-over -----------------------------------------------------------------------
    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    def take_stats(self) -> BlendStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, BlendStats()
        return stats

    def take_meta(self) -> BlendWorkerMeta | None:
        if not self.meta:
            return None
        meta, self.meta = self.meta, BlendWorkerMeta()
        return meta
