"""Soak and load. CI: 16 clients x 30 s per side on the shared
servers (plugin on, then plain vLLM with the same engine settings); the full run
(64 clients x 600 s per side, fresh servers, results in ``benchmarks/results``) is
``python -m benchmarks.reliability.soak`` and the ``slow`` test below."""
from __future__ import annotations

import pytest

from cp_engine.devtools.reliability import soak
from cp_engine.devtools.reliability.servers import INDEX_MAX_NODES, plain_server_kwargs, plugin_server_kwargs, started

pytestmark = pytest.mark.vllm


def test_checks_flag_growth_and_errors():
    """The checks themselves can fail: growth, errors and an index over its bound."""
    samples = [{"t": t, "procs": 3, "fds": 100 + (40 if t > 20 else 0), "threads": 50, "rss_mb": 1.0,
                "nodes": 10 * t, "refs_negative": 0, "unowned": 0} for t in range(0, 40, 5)]
    side = {"errors": 1, "duration_s": 40, "samples": samples, "plugin": True}
    c = soak.checks(side, index_limit=100)
    assert not c["no_errors"] and not c["no_fd_growth"] and c["no_thread_growth"]
    assert not c["index_bounded"] and not c["index_flat"] and not c["ok"]


def test_short_soak_plugin_on_vs_off(plugin_server, plain_server):
    on = soak.run_side(plugin_server.url, plugin_server.model, plugin_server.proc.pid, clients=16, duration=30,
                       plugin=True, sample_every=3)
    off = soak.run_side(plain_server.url, plain_server.model, plain_server.proc.pid, clients=16, duration=30,
                        plugin=False, sample_every=3)
    c_on, c_off = soak.checks(on, INDEX_MAX_NODES), soak.checks(off, None)
    assert on["errors"] == 0 and off["errors"] == 0, (on["error_examples"], off["error_examples"])
    assert on["requests"] > 50 and off["requests"] > 50
    assert c_on["index_bounded"] and c_on["index_invariants"], c_on
    assert c_on["no_fd_growth"] and c_on["no_thread_growth"], c_on
    assert c_off["no_fd_growth"] and c_off["no_thread_growth"], c_off
    o = soak.overhead(on, off)
    # Loose: 2 shared CPU cores make latencies noisy; a pathological slowdown still fails.
    assert on["latency_s"]["p50"] <= 3 * off["latency_s"]["p50"] + 1.0, o


@pytest.mark.slow
def test_full_soak():
    """The full soak's load and checks on fresh servers (the recorded run is the
    benchmark's command line), with the benchmark's index bound, which the index
    reaches early so the run shows it stays flat."""
    bound = 200
    for plugin in (True, False):
        kwargs = (plugin_server_kwargs(CP_ENGINE_INDEX_MAX_NODES=str(bound)) if plugin
                  else plain_server_kwargs(index_view=True))
        with started(kwargs) as srv:
            side = soak.run_side(srv.url, srv.model, srv.proc.pid, clients=64, duration=600, plugin=plugin)
        c = soak.checks(side, bound if plugin else None)
        assert c["ok"], c
