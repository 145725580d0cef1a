"""Every change cp_engine makes to an SGLang process: the SGLang patch table.

Plain data (imports no SGLang module): ``hooks.installer`` applies the rows, the docs'
table (docs/sglang-plugin.md) is generated from it and the drift test walks it.
Versions: only releases CI has run (``scripts/setup_sglang_env.sh`` builds 0.5.23).
"""
from __future__ import annotations

from ..ledger import Row, Table, Versions

__all__ = ["TABLE", "VERSIONS"]

VERSIONS = Versions("0.5.23", "0.5.23")

_H = "cp_engine.hooks.sglang"
_CACHE = "sglang.srt.mem_cache"
_OPENAI = "sglang.srt.entrypoints.openai"
_PLUGIN = "SGLang offers this as a plugin interface (its HookRegistry cannot be undone or ordered)"
_EVICTIONS = "eviction_sync"
_REWRITE = "reorder|dedup|annotate"

TABLE = Table("sglang", VERSIONS, (
    Row("calc_priority", "sglang.srt.managers.schedule_policy:SchedulePolicy.calc_priority", "method",
        f"{_H}.queue:around_calc_priority",
        "cache-aware depth-first waiting order with aging, no 128-request cut-off; also where requests "
        "are registered for eviction tracking", _PLUGIN,
        feature="schedule|eviction_sync", signature=("self", "waiting_queue")),
    Row("radix_cache_init", f"{_CACHE}.radix_cache:RadixCache.__init__", "method",
        f"{_H}.eviction:around_cache_init",
        "switch the KV-event recorder on so evictions are visible without --kv-events-config", _PLUGIN,
        feature=_EVICTIONS, signature=("self", "params")),
    Row("take_events", f"{_CACHE}.base_prefix_cache:BasePrefixCache.take_events", "method",
        f"{_H}.eviction:after_take_events",
        "see every KV-event batch (BlockStored/BlockRemoved/AllBlocksCleared), unchanged; RadixCache "
        "inherits it", _PLUGIN, feature=_EVICTIONS, signature=("self",)),
    Row("unified_cache_init", f"{_CACHE}.unified_radix_cache:UnifiedRadixCache.__init__", "method",
        f"{_H}.eviction:around_cache_init",
        "same as RadixCache: the default cache, Python or Rust tree core", _PLUGIN,
        feature=_EVICTIONS, signature=("self", "params"), optional=True),
    Row("unified_take_events", f"{_CACHE}.unified_radix_cache:UnifiedRadixCache.take_events", "method",
        f"{_H}.eviction:after_take_events", "same as RadixCache.take_events", _PLUGIN,
        feature=_EVICTIONS, signature=("self",), optional=True),
    Row("publish_kv_events",
        "sglang.srt.managers.scheduler_components.kv_events_publisher:SchedulerKvEventsPublisher.publish_kv_events",
        "method", f"{_H}.eviction:around_publish",
        "drain the recorder when the user's publisher is off", _PLUGIN,
        feature=_EVICTIONS, signature=("self",), optional=True),
    Row("chat_init", f"{_OPENAI}.serving_chat:OpenAIServingChat.__init__", "method", f"{_H}.chat_rewrite:after_init",
        "this process is the API server: apply the rows below that belong there", _PLUGIN,
        signature=("self",)),
    Row("handle_request", f"{_OPENAI}.serving_base:OpenAIServingBase.handle_request", "method",
        f"{_H}.chat_rewrite:around_handle_request",
        "chat requests only: read context_blocks / conversation_id from the raw body (the request model "
        "drops them); 400 on bad input. Defined on the base class only", _PLUGIN,
        feature=_REWRITE, signature=("self", "request", "raw_request")),
    Row("convert_request", f"{_OPENAI}.serving_chat:OpenAIServingChat._convert_to_internal_request", "method",
        f"{_H}.chat_rewrite:around_convert",
        "render the blocks into the last user turn and attach scheduler hints (thread-safe)", _PLUGIN,
        feature=_REWRITE, signature=("self", "request", "raw_request")),
    Row("receiver", f"{_OPENAI}.serving_chat:OpenAIServingChat", "service", f"{_H}.receiver:start",
        "API server end of the local eviction channel: the scheduler's evictions reach this process's index",
        "never: the index lives in the API server, evictions happen in the scheduler", on_demand=True),
    Row("metrics_registry", "prometheus_client:REGISTRY", "registry", "cp_engine.hooks.metrics:register_on",
        "cp_engine counters on prometheus_client's default registry (read by the /metrics route below)",
        "never: the counters belong on the engine's own endpoint", on_demand=True, optional=True),
    Row("metrics_route", "sglang.srt.entrypoints.http_server:app", "route", f"{_H}.promexport:swap_metrics_route",
        "SGLang's /metrics serves a private registry: swap its app for one that adds cp_engine's families "
        "(only with --enable-metrics)", "SGLang's /metrics serves the default registry or takes collectors",
        on_demand=True),
))
