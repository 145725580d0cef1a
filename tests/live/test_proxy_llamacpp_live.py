"""The rewrite proxy in front of llama.cpp's own OpenAI server (llama_cpp.server, CPU build).

Slow (not in the default CI run): needs ``scripts/setup_llamacpp.sh`` (compiles
llama-cpp-python once, caches the wheel, fetches the SmolLM2-135M GGUF). Every claim is
read from llama.cpp's own numbers for each request: the prompt tokens it evaluated
(``llama_perf_context_print``) and those it reused from the previous prompt
(``prefix-match hit``); its server keeps one context, so the cache is the previous
request. Run: ``bash scripts/setup_llamacpp.sh && .venv/bin/python -m pytest -m slow
tests/live/test_proxy_llamacpp_live.py``.
"""
from __future__ import annotations

import pytest

from benchmarks.proxy.llama_server import LlamaServer, locate

aiohttp = pytest.importorskip("aiohttp")
requests = pytest.importorskip("requests")
from benchmarks.proxy.llamacpp import chat_body, clear_slot, document  # noqa: E402
from cp_engine.proxy.app import PIPELINE, build_app  # noqa: E402
from cp_engine.proxy.background import BackgroundServer  # noqa: E402
from cp_engine.proxy.config import ProxyConfig  # noqa: E402

FOUND = locate()
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(FOUND is None, reason="no llama.cpp venv/model: run scripts/setup_llamacpp.sh")]


@pytest.fixture(scope="module")
def llama():
    python, model = FOUND
    with LlamaServer(python, model, n_ctx=4096) as srv:
        yield srv


@pytest.fixture
def proxy(llama):
    with BackgroundServer(build_app(ProxyConfig(upstream=llama.url, upstream_cache_tokens=2000))) as srv:
        yield srv


def test_reordered_blocks_reuse_llamacpps_prompt_cache_through_the_proxy_and_not_without(llama, proxy):
    # Without the proxy: the same four blocks, the second time in reverse order.
    docs = [document(i) for i in range(4)]
    clear_slot(llama)
    llama.chat(chat_body(llama.model, docs, "Which document names a river?", False, 4))
    _, direct = llama.chat(chat_body(llama.model, docs[::-1], "Which document names a harbor?", False, 4))
    # Through the proxy: the same two requests, blocks marked.
    clear_slot(llama)
    first, _ = llama.chat(chat_body(llama.model, docs, "Which document names a river?", True, 4), url=proxy.url)
    answer, via = llama.chat(chat_body(llama.model, docs[::-1], "Which document names a harbor?", True, 4),
                             url=proxy.url)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["role"] == "assistant"
    assert direct.reused_tokens < 0.2 * direct.prompt_tokens, direct  # the chat template's head only
    assert direct.evaluated_tokens > 0.8 * direct.prompt_tokens, direct
    assert via.reused_tokens > 0.7 * via.prompt_tokens, via  # system turn and all four blocks
    assert via.evaluated_tokens == via.prompt_tokens - via.reused_tokens, via
    assert via.evaluated_tokens * 4 < direct.evaluated_tokens
    assert proxy.app[PIPELINE].index.requests == 2


def test_unmarked_requests_and_other_routes_pass_through(llama, proxy):
    body = chat_body(llama.model, [document(7)], "Name one word of the document.", False, 4)
    clear_slot(llama)
    direct, _ = llama.chat(body)
    clear_slot(llama)
    through, _ = llama.chat(body, url=proxy.url)
    assert through["usage"]["prompt_tokens"] == direct["usage"]["prompt_tokens"]
    assert through["choices"][0]["message"]["content"] == direct["choices"][0]["message"]["content"]
    models = requests.get(proxy.url + "/v1/models", timeout=60)
    assert models.status_code == 200 and models.json()["data"][0]["id"] == llama.model
    assert proxy.app[PIPELINE].index.requests == 0


def test_llamacpp_errors_come_back_unchanged_and_commit_nothing(llama, proxy):
    huge = [document(i, words=3000) for i in range(3)]  # beyond the 4,096-token context
    through = requests.post(proxy.url + "/v1/chat/completions", timeout=300,
                            json=chat_body(llama.model, huge, "q", True, 4))
    direct = requests.post(llama.url + "/v1/chat/completions", timeout=300,
                           json=chat_body(llama.model, huge, "q", False, 4))
    assert through.status_code == direct.status_code >= 400
    assert through.json().keys() == direct.json().keys()
    assert proxy.app[PIPELINE].index.requests == 0
