"""The rewrite proxy in front of a live vLLM without the plugin (tiny offline model).

Server: the shared plain vLLM of ``tests/conftest.py`` (``CP_ENGINE_DISABLE=1``, a KV
cache of 40 blocks of 128 tokens); the proxy runs in this process on 127.0.0.1. Every
claim is read from vLLM's own numbers: ``prompt_tokens_details.cached_tokens`` in each
answer and the Prometheus prefix-cache counters on ``/metrics``. Greedy decoding.
"""
from __future__ import annotations

import json
import random

import pytest

from cp_engine.marking import fallback_messages, find_marks
from vllm_server import VllmServer, cached_tokens, vllm_available

aiohttp = pytest.importorskip("aiohttp")
requests = pytest.importorskip("requests")
from cp_engine.proxy.app import PIPELINE, build_app  # noqa: E402
from cp_engine.proxy.background import BackgroundServer  # noqa: E402
from cp_engine.proxy.config import ProxyConfig  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

SYSTEM = "You are a careful assistant. Answer only from the documents."
BLOCK_SIZE = 128  # vLLM CPU KV block size (tokens): prefix-cache hits come in these units
KV_TOKENS = 40 * BLOCK_SIZE  # the plain server's whole KV cache
HITS = "vllm:prefix_cache_hits_total"
_WORDS = ("river mountain library engine market garden signal window harbor planet "
          "theory lantern castle orbit meadow copper violin desert thunder crystal").split()


def doc(seed: int, words: int = 80) -> str:  # ~220 tiny-model tokens
    rng = random.Random(seed)
    return f"Document {seed}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) + "."


def messages(q: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]


def body(srv: VllmServer, msgs: list, **extra) -> dict:
    return {"model": srv.model, "messages": msgs, "max_tokens": 2, "temperature": 0.0, **extra}


@pytest.fixture
def proxy(plain_server):
    cfg = ProxyConfig(upstream=plain_server.url, upstream_cache_tokens=KV_TOKENS)
    with BackgroundServer(build_app(cfg)) as srv:
        yield srv


def via(proxy: BackgroundServer, payload: dict, **kwargs) -> requests.Response:
    return requests.post(proxy.url + "/v1/chat/completions", json=payload, timeout=300, **kwargs)


def test_reordered_blocks_reuse_the_prefix_cache_through_the_proxy_and_not_without(plain_server, proxy):
    srv = plain_server
    perm = [2, 0, 3, 1]
    # Without the proxy: what a client sends on its own (blocks in its given order).
    plain_docs = [doc(9100 + i) for i in range(4)]
    srv.chat(fallback_messages(find_marks({"context_blocks": plain_docs}, messages("Q one?"))), max_tokens=2)
    h0 = srv.metric(HITS)
    plain = srv.chat(fallback_messages(find_marks({"context_blocks": [plain_docs[i] for i in perm]},
                                                  messages("Q two?"))), max_tokens=2)
    plain_hits = srv.metric(HITS) - h0
    # Through the proxy: the same two requests with their blocks marked (fresh texts).
    docs = [doc(9200 + i) for i in range(4)]
    first = via(proxy, body(srv, messages("Q one?"), context_blocks=docs))
    assert first.status_code == 200, first.text[:500]
    h1 = srv.metric(HITS)
    second = via(proxy, body(srv, messages("Q two?"), context_blocks=[docs[i] for i in perm]))
    assert second.status_code == 200, second.text[:500]
    proxy_hits = srv.metric(HITS) - h1
    assert cached_tokens(plain) < BLOCK_SIZE, plain["usage"]  # only the template before the first block
    assert cached_tokens(second.json()) >= 3 * BLOCK_SIZE, second.json()["usage"]
    assert proxy_hits == cached_tokens(second.json())
    assert proxy_hits > 3 * max(plain_hits, 1)
    assert proxy.app[PIPELINE].index.requests == 2


def test_unmarked_request_gets_the_same_answer_as_directly(plain_server, proxy):
    payload = body(plain_server, messages("What is the capital of France?"), return_token_ids=True)
    direct = plain_server.post("/v1/chat/completions", payload).json()
    through = via(proxy, payload).json()
    for key in ("prompt_token_ids",):
        assert through[key] == direct[key]
    assert through["choices"][0]["message"] == direct["choices"][0]["message"]
    assert through["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]


def test_other_routes_pass_through(plain_server, proxy):
    models = requests.get(proxy.url + "/v1/models", timeout=60)
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == plain_server.model
    metrics = requests.get(proxy.url + "/metrics", timeout=60)
    assert metrics.status_code == 200 and HITS in metrics.text


def test_stream_through_the_proxy_commits_at_its_first_event(plain_server, proxy):
    docs = [doc(9300 + i) for i in range(3)]
    r = via(proxy, body(plain_server, messages("Stream it."), context_blocks=docs, stream=True, max_tokens=4),
            stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
    events = [line for line in r.iter_lines() if line]
    assert events[-1] == b"data: [DONE]"
    assert all("choices" in json.loads(e[6:]) for e in events[:-1])
    assert proxy.app[PIPELINE].index.requests == 1


def test_vllm_errors_come_back_unchanged_and_commit_nothing(plain_server, proxy):
    docs = [doc(9400 + i) for i in range(2)]
    too_long = body(plain_server, messages("q"), context_blocks=docs, max_tokens=10_000)
    through = via(proxy, too_long)
    marks = find_marks(too_long, too_long["messages"])
    plain_body = {k: v for k, v in too_long.items() if k != "context_blocks"}
    direct = plain_server.post("/v1/chat/completions", {**plain_body, "messages": fallback_messages(marks)})
    assert through.status_code == direct.status_code == 400
    assert through.json()["error"]["type"] == direct.json()["error"]["type"]
    assert "max_tokens" in through.text or "maximum context length" in through.text
    assert proxy.app[PIPELINE].index.requests == 0


def test_malformed_marks_are_a_400_before_vllm(plain_server, proxy):
    r = via(proxy, body(plain_server, messages("q"), context_blocks=["fine", "  "]))
    assert r.status_code == 400
    assert r.json()["error"] == {"message": "cp_engine: context_blocks[1] is empty (whitespace only)",
                                 "type": "BadRequestError", "param": None, "code": 400}
