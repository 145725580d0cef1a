"""``BlendConnector``: the KV connector vLLM loads for blend (``kv_connector_module_path``).

vLLM builds one instance per role: the scheduler-side one in EngineCore routes to
``blend_scheduler.BlendScheduler``, the worker-side one in each worker to
``blend_worker.BlendWorker``. The API server imports this module too (vLLM resolves the
class while building its config), so it imports only vLLM's connector base here; each
side's module is imported when its instance is built.

Every load is synchronous (inside the step, before the forward) and nothing is held
after a request finishes, so the async hooks keep the base class's no-op answers.
"""
from __future__ import annotations

import inspect
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole

__all__ = ["BlendConnector"]


def _config() -> Any:
    from .. import runtime

    return runtime.config()


class BlendConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self.scheduler = self.worker = None
        if role == KVConnectorRole.SCHEDULER:
            from .blend_scheduler import BlendScheduler

            self.scheduler = BlendScheduler(vllm_config, _config(), kv_cache_config)
        else:
            from .blend_worker import BlendWorker

            self.worker = BlendWorker(vllm_config, _config())

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        from .blend_stats import BlendStats

        return BlendStats(data=dict(data or {}))

    # -- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        # No connector API hands over the model: the caller is the model runner's
        # initialize_kv_cache, whose ``self`` is the runner.
        frame = inspect.currentframe()
        caller = frame.f_back if frame is not None else None
        runner = caller.f_locals.get("self") if caller is not None else None
        del frame, caller
        self.worker.register(kv_caches, runner)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if meta.reset:
            self.worker.reset()
        if meta.loads:
            self.worker.load_all(list(meta.loads))

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # blocks are saved whole in wait_for_save, once every layer ran

    def wait_for_save(self) -> None:
        self.worker.save_all(list(self._get_connector_metadata().saves))
        self.worker.end_step()

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def get_kv_connector_stats(self):
        return self.worker.take_stats() if self.worker is not None else None

    def build_connector_worker_meta(self):
        return self.worker.take_meta()

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any):
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: Any) -> None:
        self.scheduler.on_worker_output(connector_output)

    def reset_cache(self) -> bool:
        return self.scheduler.reset() if self.scheduler is not None else False

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self.scheduler.finished(request)
        return False, None
