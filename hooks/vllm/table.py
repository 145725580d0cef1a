"""Every change cp_engine makes to a vLLM process: the vLLM patch table.

Plain data (imports no vLLM module): ``hooks.installer`` applies the rows, the docs'
table (docs/vllm-plugin.md) is generated from it and the drift test walks it.
Versions: only releases run by ``scripts/vllm_matrix.sh`` or CI (docs/vllm-version-matrix.md).
"""
from __future__ import annotations

from ..ledger import Row, Table, Versions

__all__ = ["TABLE", "VERSIONS"]

VERSIONS = Versions("0.27.0", "0.32")

_CHAT = "vllm.entrypoints.openai.chat_completion.serving"
_COMPLETION = "vllm.entrypoints.openai.completion.serving"
# Queue and block pool rows wait for the scheduler module: request_queue and
# block_pool are imported half-way through it, so their own hooks would fire while
# the scheduler is still half-initialised.
_SCHED = "vllm.v1.core.sched.scheduler"
_HOOKS = "cp_engine.hooks.vllm"
_SERVER_HOOK = "vLLM exposes a request pre-processing plugin hook for the OpenAI server"
_QUEUE_WHY = ("serve waiting requests that share a prompt prefix consecutively (depth-first, with aging); "
              "FCFS policy only, and with CP_ENGINE_SCHEDULE=0 it keeps FCFS order (eviction tracking sees requests there)")
_QUEUE_GONE = "vLLM offers a pluggable waiting-queue policy (or an equivalent cache-aware one)"
_EVICT_GONE = "vLLM exposes always-on eviction callbacks (KV events without a publisher)"

TABLE = Table("vllm", VERSIONS, (
    Row("chat_rewrite", f"{_CHAT}:OpenAIServingChat.create_chat_completion", "method",
        f"{_HOOKS}.chat_rewrite:wrapper",
        "render marked context blocks (reordered, de-duplicated, annotated) into the chat prompt before "
        "templating; hints for EngineCore in request.vllm_xargs",
        _SERVER_HOOK, signature=("self", "request", "raw_request")),
    Row("completion_rewrite", f"{_COMPLETION}:OpenAIServingCompletion.create_completion", "method",
        f"{_HOOKS}.completion_rewrite:wrapper",
        "render marked context blocks in front of a text completion prompt",
        _SERVER_HOOK, signature=("self", "request", "raw_request")),
    Row("receiver", f"{_CHAT}:OpenAIServingChat", "service", f"{_HOOKS}.receiver:start",
        "API server end of the local eviction channel: EngineCore's evictions reach this process's index",
        _EVICT_GONE, feature="eviction_sync"),
    Row("metrics_registry", "prometheus_client:REGISTRY", "registry", "cp_engine.hooks.metrics:register_on",
        "cp_engine counters on vLLM's /metrics (served from prometheus_client's default registry)",
        "never: the counters belong on the engine's own endpoint", trigger="vllm", optional=True),
    Row("queue_factory", "vllm.v1.core.sched.request_queue:create_request_queue", "factory",
        f"{_HOOKS}.queue:factory_wrapper", _QUEUE_WHY, _QUEUE_GONE,
        feature="schedule|eviction_sync", signature=("policy",), trigger=_SCHED),
    Row("queue_factory_in_scheduler", f"{_SCHED}:create_request_queue", "factory",
        f"{_HOOKS}.queue:factory_wrapper", "the scheduler module's own copy of the factory name (imported by name)",
        _QUEUE_GONE, feature="schedule|eviction_sync", signature=("policy",)),
    Row("block_evicted", "vllm.v1.core.block_pool:BlockPool._maybe_evict_cached_block", "method",
        f"{_HOOKS}.eviction:evict_wrapper",
        "learn which cached prompt blocks the prefix cache drops (get_new_blocks, evict_blocks), so the "
        "index stops aligning to them", _EVICT_GONE,
        feature="eviction_sync", signature=("self", "block"), trigger=_SCHED),
    Row("eviction_batch", f"{_SCHED}:Scheduler.schedule", "method", f"{_HOOKS}.eviction:schedule_wrapper",
        "send the prefix-cache evictions of one scheduling step as one channel message, not one per "
        "evicted block (fewer messages to encode, send, parse and apply)", _EVICT_GONE,
        feature="eviction_sync", signature=("self",)),
    Row("blend_config", "vllm.engine.arg_utils:EngineArgs.create_engine_config", "method",
        f"{_HOOKS}.blend_config:create_engine_config_wrapper",
        "CP_ENGINE_BLEND=1 installs the blend KV connector (kv_transfer_config) when the user configured "
        "none; a user's own connector is kept", "vLLM loads KV connectors from a plugin entry point",
        feature="blend", signature=("self",)),
    Row("prefix_cache_reset", "vllm.v1.core.block_pool:BlockPool.reset_prefix_cache", "method",
        f"{_HOOKS}.eviction:reset_wrapper", "a prefix-cache reset must empty the context index too",
        _EVICT_GONE, feature="eviction_sync", signature=("self",), trigger=_SCHED),
    Row("blend_tokenize", "vllm.renderers.base:BaseRenderer._tokenize_singleton_prompt_async", "method",
        f"{_HOOKS}.blend_spans:tokenize_wrapper",
        "blend: tokenize a rewritten prompt cut at its context blocks, so each block keeps its standalone ids "
        "wherever it sits (exact spans for EngineCore)", "vLLM tokenizes marked segments of a prompt apart",
        feature="blend", signature=("self", "prompt", "params"), optional=True),
    Row("request_gate", "vllm.v1.engine.input_processor:InputProcessor.process_inputs", "method",
        f"{_HOOKS}.blend_spans:process_inputs_wrapper",
        "every request to EngineCore: drop a client's server-only hint keys (cp_scope); a rewritten request's "
        "exact block spans and tenant scope (blend); with blend on, an out-of-bounds cp_blend_ratio or "
        "cp_blend_mode is refused (HTTP 400)", "never while hints ride in client-writable extra_args",
        signature=("self", "request_id", "prompt", "params"), optional=True),
))
