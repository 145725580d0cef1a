"""Eviction storm, short CI variant: 150 overlapping requests against
a 40-block KV cache; after every request the index's claim is checked against the
engine's own ``cached_tokens`` and the index invariants (no negative reference
count, no unowned or leaked node) against ``/cp_engine/index``. The checks and the
staleness bound are documented in ``cp_engine/devtools/reliability/storm.py``; the full run
(``--n 1000``) is ``python -m benchmarks.reliability.storm``.
"""
from __future__ import annotations

import pytest

from cp_engine.devtools.reliability.storm import STALE_BOUND, claimed, run_storm

pytestmark = pytest.mark.vllm


def test_claim_is_the_longest_indexed_rendered_prefix():
    paths = [["a", "b", "c"], ["a", "d"]]
    assert claimed(paths, ["a", "b", "x"]) == 2
    assert claimed(paths, ["a", "d", "b"]) == 2
    assert claimed(paths, ["b", "a"]) == 0
    assert claimed([], ["a"]) == 0


def test_index_never_claims_what_the_engine_evicted(plugin_server):
    s = run_storm(plugin_server.url, plugin_server.model, n=150, seed=3)
    assert s["errors"] == 0, s
    assert s["invariant_violation_count"] == 0, s["invariant_violations"]
    assert s["min_refs_seen"] >= 0
    # The storm really storms: evictions reach the index, and claims are exercised.
    assert s["evictions_applied"] >= 20 and s["evicted_nodes"] > 0, s
    assert s["claims"] >= 30, s
    assert s["max_deficit_tokens"] <= STALE_BOUND, s["over_bound"]
    assert s["max_nodes_seen"] <= 2000


@pytest.mark.slow
def test_full_storm(plugin_server):
    s = run_storm(plugin_server.url, plugin_server.model, n=1000, seed=5)
    assert s["ok"], {k: v for k, v in s.items() if k != "over_bound"}


def test_debug_view_is_loopback_only_get_only_and_read_only():
    from fastapi import FastAPI  # what vLLM's API server is built on
    from fastapi.responses import PlainTextResponse
    from fastapi.testclient import TestClient

    from argparse import Namespace

    from vllm.entrypoints.serve.middleware.register import init_entrypoints_middleware

    from cp_engine.hooks import runtime
    from cp_engine.hooks.debugview import PATH, IndexView

    app = FastAPI()
    app.get("/other")(lambda: PlainTextResponse("other"))
    # vLLM's own --middleware handling, with the name the docs give.
    args = Namespace(allowed_origins=["*"], allow_credentials=False, allowed_methods=["*"], allowed_headers=["*"],
                     api_key=None, enable_request_id_headers=False,
                     middleware=["cp_engine.hooks.debugview.index_view"])
    init_entrypoints_middleware(args, app, ())
    # A class goes in as plain ASGI middleware, not through BaseHTTPMiddleware.
    assert IndexView in [m.cls for m in app.user_middleware]
    pipe = runtime.pipeline()
    pipe.commit("dbg-1", pipe.prepare(["debug view a", "debug view b"], namespace="completion"))
    before = len(pipe.unwrapped.index)
    remote = TestClient(app)  # its client host is "testclient": not loopback
    assert remote.get(PATH).status_code == 404
    assert remote.get("/other").text == "other"  # everything else passes through
    local = TestClient(app, client=("127.0.0.1", 5000))
    assert local.post(PATH).status_code == 404
    body = local.get(PATH).json()
    assert body["nodes"] == before and body["refs_negative"] == 0 and body["unowned"] == 0
    assert [len(p) for p in body["paths"]["completion"]] == [2]
    assert "paths" not in local.get(PATH + "?paths=0").json()
    assert len(pipe.unwrapped.index) == before
    runtime.reset_for_tests()
