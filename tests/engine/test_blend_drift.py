"""Upstream drift for the blend connector design (docs/blend-design.md), on the installed vLLM.

Each test names one vLLM symbol, signature or behaviour the design builds on and fails
loudly when it moves: the KV connector v1 base class and its hooks, the factory that loads
a connector from ``kv_connector_module_path``, the scheduler/worker call sites, the block
hashing the approximate-KV marking relies on, the CPU paged-KV write op and the rotary
embedding. No engine is started; the op probe runs on a scratch tensor.
"""
from __future__ import annotations

import inspect
import sys

import pytest

from vllm_server import vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

BASE_MOD = "vllm.distributed.kv_transfer.kv_connector.v1.base"

# hook -> parameter names (after self) the design implements or calls.
HOOKS = {
    "__init__": ["vllm_config", "role", "kv_cache_config"],
    # worker side
    "register_kv_caches": ["kv_caches"],
    "start_load_kv": ["forward_context", "kwargs"],
    "wait_for_layer_load": ["layer_name"],
    "save_kv_layer": ["layer_name", "kv_layer", "attn_metadata", "kwargs"],
    "wait_for_save": [],
    "get_kv_connector_stats": [],
    "get_block_ids_with_load_errors": [],
    # scheduler side
    "get_num_new_matched_tokens": ["request", "num_computed_tokens"],
    "update_state_after_alloc": ["request", "blocks", "num_external_tokens"],
    "build_connector_meta": ["scheduler_output"],
    "request_finished": ["request", "block_ids"],
    "update_connector_output": ["connector_output"],
    "bind_gpu_block_pool": ["gpu_block_pool"],
}
ABSTRACT = {"start_load_kv", "wait_for_layer_load", "save_kv_layer", "wait_for_save",
            "get_num_new_matched_tokens", "update_state_after_alloc", "build_connector_meta"}


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _source(obj) -> str:
    return inspect.getsource(obj)


def test_connector_base_class_hooks_and_signatures():
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)

    assert {r.name for r in KVConnectorRole} >= {"SCHEDULER", "WORKER"}
    assert inspect.isclass(KVConnectorMetadata)
    moved = {name: (_params(getattr(KVConnectorBase_V1, name, None)) if hasattr(KVConnectorBase_V1, name) else None)
             for name in HOOKS}
    moved = {k: v for k, v in moved.items() if v != HOOKS[k]}
    assert not moved, f"KVConnectorBase_V1 hooks moved: {moved} (expected {HOOKS})"
    # A new abstract hook would make the connector class uninstantiable: fail here first.
    assert set(KVConnectorBase_V1.__abstractmethods__) == ABSTRACT, sorted(KVConnectorBase_V1.__abstractmethods__)


def test_factory_loads_a_connector_from_an_external_module(tmp_path, monkeypatch):
    from vllm.config import KVTransferConfig
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    fields = KVTransferConfig.__dataclass_fields__
    assert {"kv_connector", "kv_connector_module_path", "kv_role", "kv_connector_extra_config"} <= set(fields)
    (tmp_path / "cp_drift_connector.py").write_text(
        f"from {BASE_MOD} import KVConnectorBase_V1\n"
        "class DriftConnector(KVConnectorBase_V1):\n"
        "    def __init__(self, vllm_config, role, kv_cache_config):\n"
        "        super().__init__(vllm_config, role, kv_cache_config)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = KVTransferConfig(kv_connector="DriftConnector", kv_connector_module_path="cp_drift_connector",
                           kv_role="kv_both")
    assert cfg.is_kv_transfer_instance and cfg.is_kv_producer and cfg.is_kv_consumer
    cls = KVConnectorFactory.get_connector_class(cfg)
    assert cls.__name__ == "DriftConnector" and cls.__module__ == "cp_drift_connector"
    # Not SupportsHMA: VllmConfig then switches the hybrid KV cache manager off by itself.
    assert not KVConnectorFactory.supports_hma_config(cfg)
    assert _params(KVConnectorFactory.create_connector) == ["config", "role", "kv_cache_config"]
    with pytest.raises(ValueError):
        KVConnectorFactory.get_connector_class(KVTransferConfig(
            kv_connector="DriftConnector", kv_connector_module_path="", kv_role="kv_both"))
    sys.modules.pop("cp_drift_connector", None)


def test_engine_args_carry_the_config_and_load_plugins_first():
    from vllm.engine.arg_utils import EngineArgs

    # CP_ENGINE_BLEND=1 sets kv_transfer_config from the general plugin, before
    # create_engine_config builds the VllmConfig that EngineCore receives.
    assert "kv_transfer_config" in EngineArgs.__dataclass_fields__
    assert "load_general_plugins()" in _source(EngineArgs.__post_init__)
    assert "kv_transfer_config=self.kv_transfer_config" in _source(EngineArgs.create_engine_config)


def test_scheduler_call_sites():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler

    src = _source(Scheduler)
    for call in ("connector.get_num_new_matched_tokens(", "connector.update_state_after_alloc(",
                 "connector.request_finished(", "build_connector_meta(scheduler_output)"):
        assert call in src, f"Scheduler no longer contains {call!r}"
    # A request that skips reading the prefix cache is asked for no hit (the scheduler or,
    # before 0.31, the KV cache manager checks the flag).
    assert "skip_reading_prefix_cache" in src + _source(KVCacheManager)
    # Synchronously loaded tokens are committed to the prefix cache inside allocate_slots
    # (before update_state_after_alloc) unless delay_cache_blocks: the marking must precede it.
    assert "delay_cache_blocks" in _params(KVCacheManager.allocate_slots)
    assert "num_external_computed_tokens" in _params(KVCacheManager.allocate_slots)
    # 0.29+: the step says it has synchronous loads (the worker then loads before the
    # forward); 0.27-0.28 load before every forward (test_worker_call_sites_...).
    if "has_sync_kv_loads" in SchedulerOutput.__dataclass_fields__:
        assert "has_sync_kv_loads = True" in src


def test_block_hash_chain_the_marking_relies_on():
    from vllm.v1.core import kv_cache_utils
    from vllm.v1.request import Request

    assert _params(kv_cache_utils.hash_block_tokens) == [
        "hash_function", "parent_block_hash", "curr_block_token_ids", "extra_keys"]
    hasher_src = _source(kv_cache_utils.get_request_block_hasher)
    # New blocks chain from the request's last stored hash, so re-keyed hashes propagate.
    assert "request.block_hashes[-1]" in hasher_src
    init_src = _source(Request.__init__)
    assert "self.block_hashes" in init_src and "self._block_hasher" in init_src
    assert "self.block_hashes.extend(" in _source(Request.update_block_hashes)


def test_worker_call_sites_reach_the_cpu_runner():
    from vllm.model_executor.layers.attention import kv_transfer_utils
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    assert issubclass(CPUModelRunner, GPUModelRunner)
    assert issubclass(CPUModelRunner, KVConnectorModelRunnerMixin)
    mixin = _source(KVConnectorModelRunnerMixin._get_kv_connector_output)
    # The connector's loads must land before this step's forward (inside the yield).
    start = "kv_connector.start_load_kv(get_forward_context())"
    assert start in mixin
    if "start_after_forward" in mixin:  # 0.29+: before the forward when the step has sync loads
        assert "start_after_forward = not scheduler_output.has_sync_kv_loads" in mixin
        assert "if not start_after_forward:\n" in mixin.split("yield output")[0]
    else:  # 0.27-0.28: always before the forward
        assert mixin.index(start) < mixin.index("yield output")
    layer = _source(kv_transfer_utils.maybe_transfer_kv_layer)
    assert "connector.wait_for_layer_load(layer_name)" in layer
    assert "connector.save_kv_layer(layer_name, kv_cache, attn_metadata)" in layer
    # The connector finds the model runner (and its model) as the caller of register_kv_caches.
    assert "kv_transfer_group.register_kv_caches(kv_caches)" in _source(GPUModelRunner.initialize_kv_cache)
    assert callable(getattr(CPUModelRunner, "get_model", None))


def test_cpu_paged_kv_write_op_is_a_learnable_permutation():
    import torch
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackendImpl, _get_attn_isa

    assert _params(ops.cpu_attn_reshape_and_cache)[:6] == [
        "key", "value", "key_cache", "value_cache", "slot_mapping", "isa"]
    assert "do_kv_cache_update" in CPUAttentionBackendImpl.__dict__
    bs, d = 32, 64
    isa = _get_attn_isa(torch.float32, bs, d)
    kv = torch.full((1, 1, bs, 2 * d), -1.0)  # [blocks, kv_heads, block_size, 2*head_size]
    key_cache, value_cache = kv.view(1, 1, 2 * bs, d).chunk(2, dim=2)
    k = torch.arange(bs * d, dtype=torch.float32).view(bs, 1, d)
    ops.cpu_attn_reshape_and_cache(k, k + bs * d, key_cache, value_cache, torch.arange(bs), isa)
    # Every K and V element lands exactly once in the block's slab: the layout is a
    # permutation the connector learns by this same probe, whatever the ISA.
    assert torch.equal(kv.flatten().sort().values, torch.arange(2 * bs * d, dtype=torch.float32))


@pytest.mark.parametrize("module, impl", [
    ("vllm.v1.attention.backends.flash_attn", "FlashAttentionImpl"),
    ("vllm.v1.attention.backends.triton_attn", "TritonAttentionImpl"),
    ("vllm.v1.attention.backends.flashinfer", "FlashInferImpl"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl"),
])
def test_backends_write_the_cache_in_a_separate_method(module, impl):
    """On a GPU, PagedKV writes through ``impl.do_kv_cache_update(layer, key, value,
    kv_cache, slot_mapping)`` and trusts it to be the whole write only when the backend
    class says its forward does not write the cache (``forward_includes_kv_cache_update``)."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:  # a GPU backend the CPU wheel cannot even import
        pytest.skip(f"{module}: {exc}")
    cls = getattr(mod, impl)
    assert "do_kv_cache_update" in cls.__dict__, f"{impl} no longer has its own cache write"
    assert _params(cls.do_kv_cache_update) == ["layer", "key", "value", "kv_cache", "slot_mapping"]
    backends = [b for b in vars(mod).values() if isinstance(b, type) and b.__module__ == module
                and "forward_includes_kv_cache_update" in b.__dict__]
    assert backends and all(b.forward_includes_kv_cache_update is False for b in backends)
    from vllm.model_executor.layers.attention.attention import Attention

    assert "self.attn_backend" in _source(Attention.__init__)  # where PagedKV finds the backend class


def test_rotary_embedding_surface():
    from vllm.model_executor.layers.rotary_embedding import get_rope
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    params = _params(RotaryEmbedding.__init__)
    for name in ("head_size", "rotary_dim", "max_position_embeddings", "base", "is_neox_style", "dtype"):
        assert name in params, params
    assert _params(RotaryEmbedding.forward_native)[:3] == ["positions", "query", "key"]
    assert "rope_parameters" in _params(get_rope)


def test_prompt_token_sources_for_counting():
    from vllm.v1.metrics.stats import PromptTokenStats

    # computed prompt tokens = vllm:prompt_tokens_by_source{source="local_compute"}
    #                        + cp_engine_blend_recomputed_tokens_total
    assert {"local_compute", "external_kv_transfer"} <= set(PromptTokenStats.ALL_SOURCES)


def test_worker_to_scheduler_channels_the_connector_uses():
    """Worker meta and stats ride in KVConnectorOutput; the scheduler hands it to the
    connector and its stats to the logger, which rebuilds them by class method."""
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorWorkerMetadata
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorLogging, KVConnectorStats
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.worker.kv_connector_model_runner_mixin import KVConnectorModelRunnerMixin

    assert "aggregate" in KVConnectorWorkerMetadata.__abstractmethods__
    assert {"kv_connector_stats", "kv_connector_worker_meta", "invalid_block_ids"} <= set(
        KVConnectorOutput.__dataclass_fields__)
    assert "data" in KVConnectorStats.__dataclass_fields__
    for name in ("aggregate", "reduce", "is_empty", "reset"):
        assert callable(getattr(KVConnectorStats, name))
    assert _params(KVConnectorBase_V1.build_kv_connector_stats) == ["data"]
    assert "build_kv_connector_stats(" in _source(KVConnectorLogging.observe)
    mixin = _source(KVConnectorModelRunnerMixin)
    for call in ("kv_connector.get_block_ids_with_load_errors()", "kv_connector.get_kv_connector_stats()",
                 "kv_connector.build_connector_worker_meta()"):
        assert call in mixin, call
    assert "self.connector.update_connector_output(kv_connector_output)" in _source(Scheduler)


def test_scheduler_data_the_connector_reads():
    from vllm.config import CacheConfig, KVTransferConfig
    from vllm.utils.hashing import get_hash_fn_by_name
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.kv_cache_utils import BlockHash  # noqa: F401
    from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.request import Request

    assert "recompute" in str(KVTransferConfig.__dataclass_fields__["kv_load_failure_policy"].type)
    assert {"block_size", "prefix_caching_hash_algo"} <= set(CacheConfig.__dataclass_fields__)
    # The re-keying's hash unit comes from vLLM's own resolver (hash_block_size_of).
    from vllm.v1.core.kv_cache_utils import resolve_kv_cache_block_sizes

    assert _params(resolve_kv_cache_block_sizes) == ["kv_cache_config", "vllm_config"]
    assert callable(get_hash_fn_by_name)
    assert callable(KVCacheBlocks.get_block_ids)
    assert {"req_id", "prompt_token_ids", "num_computed_tokens", "block_ids"} <= set(
        NewRequestData.__dataclass_fields__)
    assert {"req_ids", "resumed_req_ids", "new_block_ids", "num_computed_tokens"} <= set(
        CachedRequestData.__dataclass_fields__)
    out = SchedulerOutput.make_empty()
    assert out.scheduled_new_reqs == [] and out.num_scheduled_tokens == {}
    init = _source(Request.__init__)
    for attr in ("self.prompt_embeds", "self.mm_features", "self.cache_salt", "self.block_hashes"):
        assert attr in init, attr
    src = _source(Scheduler)
    # a None answer skips the request this step; the claim is asked with a block-aligned hit
    assert "if ext_tokens is None:" in src
    assert "self.kv_cache_manager.get_blocks(request_id)" in src


def test_engine_args_create_engine_config_binds_self_first():
    from vllm.engine.arg_utils import EngineArgs

    assert _params(EngineArgs.create_engine_config)[:2] == ["usage_context", "headless"]
