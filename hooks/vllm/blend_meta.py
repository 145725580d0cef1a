"""What the blend connector's two sides tell each other each step (plain picklable data).

Scheduler → worker (``BlendMetadata``, one per step):
- ``LoadOrder``: write the stored blocks of ``plan`` into the request's paged blocks
  and recompute ``plan``'s selection; ``token_ids`` are the prompt ids ``[0, claim_end)``,
  ``block_ids`` the request's KV blocks (first KV cache group);
- ``reset``: empty the store before this step's loads (vLLM's cache reset reached
  the scheduler);
- ``SaveOrder``: after this step's forward, read ``[start, end)`` of the request's KV
  and put it in the store under the block's key (built by the worker, which knows the
  layout before the scheduler does); ``depth`` is how many stitching generations the
  KV sits behind (0: computed exactly); ``lead`` the block's lead digest in that prompt
  (``cp_engine.blend.leads``; None: none).

Worker → scheduler (``BlendWorkerMeta``, aggregated by vLLM across workers):
- ``layout``: the KV layout store keys are built under (sent until the scheduler has it);
- ``stored``: ``(BlockKey.lookup, depth, lead)`` of entries put into the store and still in
  it at the end of the step; ``dropped``: lookups gone from it; both feed the scheduler's mirror index (one step late);
- ``disabled``: why blend cannot run on this engine ("" while it can).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata

__all__ = ["LoadOrder", "SaveOrder", "BlendMetadata", "BlendWorkerMeta"]


@dataclass(frozen=True)
class LoadOrder:
    req_id: str
    block_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    plan: Any  # cp_engine.blend.plan.ReusePlan whose block keys are store BlockKeys


@dataclass(frozen=True)
class SaveOrder:
    req_id: str
    scope: Any  # cp_engine.blend.keys.Scope; the worker builds the key under its layout
    start: int
    end: int
    token_ids: tuple[int, ...]  # the prompt's ids in [start, end)
    block_ids: tuple[int, ...]
    depth: int = 0
    lead: str | None = None


@dataclass
class BlendMetadata(KVConnectorMetadata):
    loads: list[LoadOrder] = field(default_factory=list)
    saves: list[SaveOrder] = field(default_factory=list)
    reset: bool = False


@dataclass
class BlendWorkerMeta(KVConnectorWorkerMetadata):
    layout: Any = None  # cp_engine.blend.keys.KVLayout
    stored: list[tuple[tuple[str, str], int, str | None]] = field(default_factory=list)
    dropped: list[tuple[str, str]] = field(default_factory=list)
    disabled: str = ""

    def aggregate(self, other: "BlendWorkerMeta") -> "BlendWorkerMeta":
        return BlendWorkerMeta(self.layout or other.layout, self.stored + other.stored,
                               self.dropped + other.dropped, self.disabled or other.disabled)

    def __bool__(self) -> bool:
        return bool(self.layout or self.stored or self.dropped or self.disabled)
