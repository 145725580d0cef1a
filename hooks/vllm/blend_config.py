"""Row ``blend_config``: ``CP_ENGINE_BLEND=1`` installs the blend KV connector with no
new ``vllm serve`` flags.

The ``VllmConfig`` is built once, in the API server (or the offline ``LLM``), by
``EngineArgs.create_engine_config``; EngineCore and the workers receive it built. The
wrapper sets ``kv_transfer_config`` to ``BLEND_TRANSFER_CONFIG`` when the user gave none,
then calls through. A user's own ``--kv-transfer-config`` is kept: one log line and
``blend_disabled{reason="user_connector"}``. With the blend connector set, an
``async_scheduling`` the user left unset becomes False (vLLM would turn it on by default
on GPUs; the connector is checked with synchronous scheduling only); one the user set to
True is kept, and the worker then switches blend off (``reason="async_scheduling"``).
The row is gated by ``CP_ENGINE_BLEND``, so with the flag off nothing is wrapped and no
connector is installed.

The same connector by hand (the explicit form; ``CP_ENGINE_BLEND`` must still be 1 for
the blend flags to be read, and the row then finds the config set and leaves it alone)::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "BlendConnector",
      "kv_connector_module_path": "cp_engine.hooks.vllm.blend_connector",
      "kv_role": "kv_both", "kv_load_failure_policy": "recompute"}'
"""
from __future__ import annotations

import logging
from typing import Any

from .. import faults, metrics

__all__ = ["BLEND_TRANSFER_CONFIG", "create_engine_config_wrapper", "is_blend_config"]

logger = logging.getLogger("cp_engine.hooks")

BLEND_TRANSFER_CONFIG = {
    "kv_connector": "BlendConnector",
    "kv_connector_module_path": "cp_engine.hooks.vllm.blend_connector",
    "kv_role": "kv_both",
    # A claimed block that cannot be loaded is recomputed by vLLM, never failed.
    "kv_load_failure_policy": "recompute",
}


def is_blend_config(kv_transfer_config: Any) -> bool:
    """Whether ``kv_transfer_config`` installs the blend connector."""
    return (getattr(kv_transfer_config, "kv_connector", None) == BLEND_TRANSFER_CONFIG["kv_connector"]
            and getattr(kv_transfer_config, "kv_connector_module_path", None)
            == BLEND_TRANSFER_CONFIG["kv_connector_module_path"])


def _install(engine_args: Any) -> None:
    current = getattr(engine_args, "kv_transfer_config", None)
    if current is None:
        from vllm.config import KVTransferConfig

        engine_args.kv_transfer_config = KVTransferConfig(**BLEND_TRANSFER_CONFIG)
        logger.info("cp_engine: blend on, KV connector %s installed", BLEND_TRANSFER_CONFIG["kv_connector"])
    elif not is_blend_config(current):
        metrics.inc("blend_disabled", reason="user_connector")
        logger.warning("cp_engine: CP_ENGINE_BLEND=1 but a KV connector is configured (%s); it is kept and "
                       "blend stays off", getattr(current, "kv_connector", None))
        return
    if getattr(engine_args, "async_scheduling", True) is None:
        # vLLM turns asynchronous scheduling on by default on GPUs; the connector is
        # checked with synchronous scheduling only (the worker refuses the other).
        engine_args.async_scheduling = False
        logger.info("cp_engine: blend on, asynchronous scheduling left off")


def create_engine_config_wrapper(wrapped, instance, args, kwargs):
    """Row ``blend_config``: set the blend connector on ``instance`` (an ``EngineArgs``)."""
    with faults.guarded("vllm_blend_config"):
        _install(instance)
    return wrapped(*args, **kwargs)
