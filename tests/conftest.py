"""Suite-wide test settings (``cp_engine.devtools.hypothesis_profile``) and the
shared live servers."""
import pytest

from cp_engine.devtools import hypothesis_profile
import early_runs
import warm_bytecode
from cp_engine.devtools.reliability.servers import plain_server_kwargs, plugin_server_kwargs
from server_pool import CONFIGS, POOL, server_fixture
from vllm_server import PLUGIN_TEST_ENV, vllm_available

hypothesis_profile.load()


# -- live servers -----------------------------------------------------------------
# Every live test without a configuration of its own shares these two; tests on them
# assert on deltas of counters, never on a fresh server's zeros. They and the special
# configurations (``server_fixture`` in the test modules) come from ``server_pool``,
# which starts them ahead of the tests that need them.
# Plain vLLM (``CP_ENGINE_DISABLE=1``), 40-block KV cache: the plugin-off reference.
plain_server = server_fixture("plain_server", plain_server_kwargs())
# Plugin on with every default feature, 40-block KV cache (evictions), bounded index,
# ``/cp_engine/index`` view, block cap ``PLUGIN_MAX_BLOCKS``, dev endpoints.
plugin_server = server_fixture("plugin_server", plugin_server_kwargs(**PLUGIN_TEST_ENV))


def pytest_collection_modifyitems(session, config, items):
    early_runs.readers_last(items)  # tests reading a background run go last


def pytest_collection_finish(session):
    if not session.config.option.collectonly:
        ahead = set(CONFIGS) | (set(early_runs.RUNS) if early_runs.BACKGROUND else set())
        if vllm_available() and any(name in ahead for item in session.items
                                    for name in getattr(item, "fixturenames", ())):
            warm_bytecode.start()  # background; server starts and runs wait for it
        POOL.plan(session.items)
        early_runs.start_selected(session.items)  # fresh-interpreter runs, in the background


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    POOL.done(item.nodeid)


def pytest_sessionfinish(session, exitstatus):
    POOL.stop_all()
    early_runs.stop_all()
