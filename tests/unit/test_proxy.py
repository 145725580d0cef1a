"""The rewrite proxy over real HTTP: a hand-written OpenAI-style upstream (aiohttp, in
this process) behind ``cp_engine.proxy`` on 127.0.0.1, driven with ``requests``.

The upstream records what it receives and answers what each test tells it to; the
rewritten bodies are compared with what ``ContextPipeline.rewrite_messages`` renders
on a pipeline of the same settings (the plugin's own rewrite).
"""
from __future__ import annotations

import asyncio
import gzip
import json
import threading

import pytest

aiohttp = pytest.importorskip("aiohttp")
requests = pytest.importorskip("requests")
from aiohttp import web  # noqa: E402

from cp_engine.config import load_config  # noqa: E402
from cp_engine.index import ContextIndex  # noqa: E402
from cp_engine.marking import InvalidBlocks, fallback_messages, find_marks  # noqa: E402
from cp_engine.pipeline import ContextPipeline  # noqa: E402
from cp_engine.proxy.app import build_app  # noqa: E402
from cp_engine.proxy.background import BackgroundServer  # noqa: E402
from cp_engine.proxy.config import ProxyConfig  # noqa: E402

CHAT = "/v1/chat/completions"
SYSTEM = {"role": "system", "content": "Answer from the documents."}
DOCS = [f"Document {i}: " + " ".join(f"word{i}x{j}" for j in range(40)) for i in range(5)]
WAIT_S = 30  # a bound on every client read, so a proxy bug fails instead of hanging the run


def question(q: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": q}]


class FakeUpstream:
    """An OpenAI-style server: records each request, answers with ``self.answer``."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.answer = self.ok
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.server = BackgroundServer(app)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.received.append({"method": request.method, "path": request.raw_path,
                              "headers": dict(request.headers), "body": body})
        return await self.answer(request, body)

    @staticmethod
    async def ok(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.json_response({"id": "cmpl-1", "object": "chat.completion", "path": request.path,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}]})

    def body(self, i: int = -1) -> dict:
        return json.loads(self.received[i]["body"])

    def set_event(self, event: asyncio.Event) -> None:
        self.server.loop.call_soon_threadsafe(event.set)


@pytest.fixture
def upstream():
    up = FakeUpstream()
    with up.server:
        yield up


def _pipeline() -> ContextPipeline:
    cfg = load_config({})
    return ContextPipeline(cfg, index=ContextIndex(max_nodes=cfg.index_max_nodes, max_tokens=100_000))


@pytest.fixture
def make_proxy(upstream):
    started: list[BackgroundServer] = []

    def make(**overrides) -> BackgroundServer:
        cfg = ProxyConfig(upstream=overrides.pop("upstream", upstream.server.url), **overrides)
        srv = BackgroundServer(build_app(cfg, pipeline=_pipeline())).start()
        started.append(srv)
        return srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture
def proxy(make_proxy):
    return make_proxy()


def pipeline_of(srv: BackgroundServer) -> ContextPipeline:
    from cp_engine.proxy.app import PIPELINE

    return srv.app[PIPELINE]


def post(srv: BackgroundServer, path: str, body, **kwargs) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return requests.post(srv.url + path, data=data, headers=headers, timeout=WAIT_S, **kwargs)


def chat_body(messages: list, **extra) -> dict:
    return {"model": "m", "messages": messages, "max_tokens": 2, **extra}


# -- pass-through ------------------------------------------------------------------------

def test_unmarked_chat_is_forwarded_byte_identical_and_answered_unchanged(upstream, proxy):
    raw = b'{"model":"m",  "messages":[{"role":"user","content":"caf\\u00e9 \xc3\xa9"}],"max_tokens":2}'
    direct = post(upstream.server, CHAT, raw)
    via = post(proxy, CHAT, raw)
    assert upstream.received[0]["body"] == upstream.received[1]["body"] == raw
    assert via.status_code == direct.status_code == 200
    assert via.content == direct.content
    assert via.headers["Content-Type"] == direct.headers["Content-Type"]


@pytest.mark.parametrize("method, path, body", [
    ("GET", "/v1/models", b""),
    ("GET", "/metrics?name=a%20b&x=1", b""),
    ("POST", "/tokenize", b'{"prompt": "hi", "context_blocks": ["not rewritten here"]}'),
    ("PUT", "/v1/anything/else", b"\x00\x01binary\xff"),
    ("DELETE", "/v1/files/abc", b""),
    ("HEAD", "/health", b""),
])
def test_other_routes_pass_through_byte_identical(upstream, proxy, method, path, body):
    r = requests.request(method, proxy.url + path, data=body or None, timeout=WAIT_S,
                         headers={"X-Custom": "kept", "Authorization": "Bearer k"})
    assert r.status_code == 200
    got = upstream.received[-1]
    assert (got["method"], got["path"], got["body"]) == (method, path, body)
    assert got["headers"]["X-Custom"] == "kept" and got["headers"]["Authorization"] == "Bearer k"
    if method != "HEAD":
        assert r.json()["path"] == path.split("?")[0]


def test_compressed_answer_is_relayed_as_the_same_bytes(upstream, proxy):
    payload = gzip.compress(b'{"object": "list", "data": []}')

    async def gz(request, body):
        return web.Response(body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json",
                                                   "X-Upstream": "yes"})

    upstream.answer = gz
    r = requests.get(proxy.url + "/v1/models", timeout=WAIT_S, stream=True)
    assert r.headers["Content-Encoding"] == "gzip" and r.headers["X-Upstream"] == "yes"
    assert r.raw.read(decode_content=False) == payload


@pytest.mark.parametrize("status", [400, 404, 422, 500, 503])
def test_upstream_errors_come_back_unchanged(upstream, proxy, status):
    async def fail(request, body):
        return web.Response(status=status, body=b'{"error": {"message": "from upstream"}}',
                            content_type="application/json", headers={"X-Why": "upstream"})

    upstream.answer = fail
    for body in (chat_body(question("q")), chat_body(question("q"), context_blocks=DOCS[:2])):
        r = post(proxy, CHAT, body)
        assert r.status_code == status
        assert r.content == b'{"error": {"message": "from upstream"}}'
        assert r.headers["X-Why"] == "upstream"


# -- the rewrite ---------------------------------------------------------------------------

def test_marked_chat_is_rewritten_as_the_plugin_renders_it(upstream, proxy):
    body = chat_body(question("Which document?"), context_blocks=DOCS[:3], conversation_id="c-1",
                     temperature=0.5, user="u")
    r = post(proxy, CHAT, body)
    assert r.status_code == 200
    sent = upstream.body()
    assert "context_blocks" not in sent and "conversation_id" not in sent
    assert {k: v for k, v in sent.items() if k != "messages"} == {
        "model": "m", "max_tokens": 2, "temperature": 0.5, "user": "u"}
    from cp_engine.hooks.tenant import tenant_key

    expected, _ = _pipeline().rewrite_messages(body["messages"], DOCS[:3], conversation_id="c-1",
                                               tenant=tenant_key(None, None, "u"))
    assert sent["messages"] == expected
    assert all(doc in sent["messages"][-1]["content"] for doc in DOCS[:3])


@pytest.mark.parametrize("others", [{}, {"enable_thinking": False}])
def test_marks_in_chat_template_kwargs_are_rewritten_and_taken_out_of_them(upstream, proxy, others):
    kwargs = {"cp_context_blocks": DOCS[:2], "cp_conversation_id": "c-2", **others}
    body = chat_body(question("Which one?"), chat_template_kwargs=kwargs)
    assert post(proxy, CHAT, body).status_code == 200
    sent = upstream.body()
    expected, _ = _pipeline().rewrite_messages(body["messages"], DOCS[:2], conversation_id="c-2")
    assert sent["messages"] == expected
    assert sent.get("chat_template_kwargs") == (others or None)  # the rest kept, ours gone


def test_content_parts_marked_cp_block_are_rewritten_too(upstream, proxy):
    parts = [{"type": "text", "text": d, "cp_block": True} for d in DOCS[:2]] + [{"type": "text", "text": "Q?"}]
    messages = [SYSTEM, {"role": "user", "content": parts}]
    assert post(proxy, CHAT, chat_body(messages)).status_code == 200
    marks = find_marks({}, messages)
    expected, _ = _pipeline().rewrite_messages(marks.messages, marks.blocks)
    assert upstream.body()["messages"] == expected
    assert "cp_block" not in json.dumps(upstream.body())


def test_completion_prompt_gets_the_blocks_before_it(upstream, proxy):
    r = post(proxy, "/v1/completions", {"model": "m", "prompt": "Answer:", "context_blocks": DOCS[:2]})
    assert r.status_code == 200
    prep = _pipeline().prepare(DOCS[:2], namespace="completion")
    assert upstream.body() == {"model": "m", "prompt": f"{prep.context_text}\n\nAnswer:"}


def test_completion_with_a_list_of_prompts_passes_through(upstream, proxy):
    raw = json.dumps({"model": "m", "prompt": ["a", "b"], "context_blocks": DOCS[:2]}).encode()
    assert post(proxy, "/v1/completions", raw).status_code == 200
    assert upstream.received[-1]["body"] == raw


def test_same_blocks_in_another_order_go_out_in_the_first_order(upstream, proxy):
    post(proxy, CHAT, chat_body(question("one?"), context_blocks=DOCS[:4]))
    post(proxy, CHAT, chat_body(question("two?"), context_blocks=[DOCS[i] for i in (2, 0, 3, 1)]))
    first, second = (upstream.body(i)["messages"][-1]["content"] for i in (0, 1))
    positions = [[text.index(d) for d in DOCS[:4]] for text in (first, second)]
    assert sorted(range(4), key=positions[0].__getitem__) == sorted(range(4), key=positions[1].__getitem__)
    assert first.split("\n\none?")[0].split("\n\n")[:4] == second.split("\n\ntwo?")[0].split("\n\n")[:4]


def test_not_json_or_not_an_object_passes_through(upstream, proxy):
    for raw in (b"not json", b"[1, 2]", b'{"messages": "x", "context_blocks"'):
        assert post(proxy, CHAT, raw).status_code == 200
        assert upstream.received[-1]["body"] == raw


def test_a_failing_rewrite_sends_the_blocks_plainly_and_commits_nothing(upstream, proxy, monkeypatch):
    monkeypatch.setenv("CP_ENGINE_FAULT", "proxy_rewrite")
    body = chat_body(question("q"), context_blocks=DOCS[:3], conversation_id="c")
    assert post(proxy, CHAT, body).status_code == 200
    assert upstream.body()["messages"] == fallback_messages(find_marks(body, body["messages"]))
    assert "context_blocks" not in upstream.body()
    assert pipeline_of(proxy).index.requests == 0


@pytest.mark.parametrize("path", ["/reset_prefix_cache", "/flush_cache"])
def test_a_successful_cache_reset_upstream_resets_the_index(upstream, proxy, path):
    post(proxy, CHAT, chat_body(question("q"), context_blocks=DOCS[:2]))
    index = pipeline_of(proxy).index

    async def refuse(request, body):
        return web.json_response({"error": "not in dev mode"}, status=404)

    upstream.answer = refuse
    assert requests.post(proxy.url + path, timeout=WAIT_S).status_code == 404
    assert index.requests == 1  # the upstream kept its cache
    upstream.answer = FakeUpstream.ok
    assert requests.post(proxy.url + path, timeout=WAIT_S).status_code == 200
    assert upstream.received[-1]["path"] == path
    assert pipeline_of(proxy).index.requests == 0 and pipeline_of(proxy).index.tokens == 0


# -- malformed marks: the plugin's 400 -------------------------------------------------------

@pytest.mark.parametrize("extra, messages", [
    ({"context_blocks": "not a list"}, question("q")),
    ({"context_blocks": ["ok", "  "]}, question("q")),
    ({"context_blocks": ["ok", 3]}, question("q")),
    ({"context_blocks": ["ok"], "conversation_id": 42}, question("q")),
    ({"conversation_id": ""}, question("q")),
    ({"context_blocks": ["ok"]}, [SYSTEM]),
])
def test_malformed_marks_get_the_plugins_400_and_reach_no_upstream(upstream, proxy, extra, messages):
    r = post(proxy, CHAT, chat_body(messages, **extra))
    assert r.status_code == 400
    try:
        marks = find_marks(extra, messages)
        _pipeline().rewrite_messages(marks.messages, marks.blocks)
        raise AssertionError("expected InvalidBlocks")
    except InvalidBlocks as exc:
        message = f"cp_engine: {exc}"
    assert r.json() == {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}
    assert upstream.received == []


def test_empty_conversation_header_is_a_400_naming_the_header(upstream, proxy):
    r = post(proxy, CHAT, chat_body(question("q"), context_blocks=DOCS[:1]),
             headers={"X-CP-Conversation-Id": ""})
    assert r.status_code == 400 and "X-CP-Conversation-Id" in r.json()["error"]["message"]
    assert upstream.received == []


# -- commit only when the upstream accepts ---------------------------------------------------

def _turns(proxy, conv: str) -> list[str]:
    """Two turns of one conversation sharing DOCS[1]; the second turn's sent user text."""
    post(proxy, CHAT, chat_body(question("first?"), context_blocks=DOCS[:2], conversation_id=conv))
    second = question("first?") + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "next?"}]
    return post(proxy, CHAT, chat_body(second, context_blocks=DOCS[1:3], conversation_id=conv))


def test_accepted_request_is_indexed_and_its_blocks_deduplicated_next_turn(upstream, proxy):
    r = _turns(proxy, "conv-a")
    assert r.status_code == 200
    assert pipeline_of(proxy).index.requests == 2
    assert DOCS[1] not in upstream.body()["messages"][-1]["content"]  # sent as a reference


def test_rejected_request_leaves_no_index_path_and_no_dedup_history(upstream, proxy):
    async def reject(request, body):
        return web.json_response({"error": {"message": "prompt too long"}}, status=400)

    upstream.answer = reject
    assert post(proxy, CHAT, chat_body(question("first?"), context_blocks=DOCS[:2],
                                       conversation_id="conv-b")).status_code == 400
    assert pipeline_of(proxy).index.requests == 0
    upstream.answer = FakeUpstream.ok
    second = question("first?") + [{"role": "assistant", "content": "a"}, {"role": "user", "content": "next?"}]
    post(proxy, CHAT, chat_body(second, context_blocks=DOCS[1:3], conversation_id="conv-b"))
    assert DOCS[1] in upstream.body()["messages"][-1]["content"]  # sent in full again


def test_unreachable_upstream_is_a_502_and_commits_nothing(make_proxy):
    with socket_closed() as port:
        srv = make_proxy(upstream=f"http://127.0.0.1:{port}")
        r = post(srv, CHAT, chat_body(question("q"), context_blocks=DOCS[:2]))
    assert r.status_code == 502
    assert r.json()["error"]["type"] == "BadGatewayError"
    assert f"127.0.0.1:{port}" in r.json()["error"]["message"] and "unreachable" in r.json()["error"]["message"]
    assert pipeline_of(srv).index.requests == 0


def test_silent_upstream_is_a_504_not_a_hung_client(upstream, make_proxy):
    release = asyncio.Event()

    async def silent(request, body):
        await release.wait()
        return web.json_response({})

    upstream.answer = silent
    srv = make_proxy(read_timeout_s=0.3)
    try:
        r = post(srv, CHAT, chat_body(question("q"), context_blocks=DOCS[:2]))
    finally:
        upstream.set_event(release)
    assert r.status_code == 504
    assert "sent no answer within 0.3 s" in r.json()["error"]["message"]
    assert pipeline_of(srv).index.requests == 0


# -- streaming -----------------------------------------------------------------------------

def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def test_stream_passes_chunk_by_chunk_and_commits_at_the_first_event(upstream, proxy):
    go_on = asyncio.Event()

    async def stream(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"delta": {"content": "one"}}]}))
        await go_on.wait()  # released only once the client has read the first event
        await resp.write(_sse({"choices": [{"delta": {"content": "two"}}]}))
        await resp.write(b"data: [DONE]\n\n")
        return resp

    upstream.answer = stream
    r = post(proxy, CHAT, chat_body(question("q"), context_blocks=DOCS[:2], stream=True), stream=True)
    assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
    chunks = r.iter_content(chunk_size=None)
    got = next(chunks)
    assert got == _sse({"choices": [{"delta": {"content": "one"}}]})
    assert pipeline_of(proxy).index.requests == 1
    upstream.set_event(go_on)
    rest = b"".join(chunks)
    assert rest == _sse({"choices": [{"delta": {"content": "two"}}]}) + b"data: [DONE]\n\n"


def test_stream_whose_first_event_is_an_error_is_rejected(upstream, proxy):
    async def stream(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        first = _sse({"error": {"message": "too long", "code": 400}})
        await resp.write(first[:10])  # split inside the event: judged once it is whole
        await resp.write(first[10:] + b"data: [DONE]\n\n")
        return resp

    upstream.answer = stream
    r = post(proxy, CHAT, chat_body(question("q"), context_blocks=DOCS[:2], stream=True))
    assert r.content == _sse({"error": {"message": "too long", "code": 400}}) + b"data: [DONE]\n\n"
    assert pipeline_of(proxy).index.requests == 0


def test_stream_that_breaks_off_ends_with_an_error_event(upstream, make_proxy):
    async def stream(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"delta": {"content": "one"}}]}))
        request.transport.close()  # the upstream dies mid-answer
        return resp

    upstream.answer = stream
    srv = make_proxy()
    r = post(srv, CHAT, chat_body(question("q"), stream=True))
    events = [e for e in r.content.split(b"\n\n") if e]
    assert events[0] == _sse({"choices": [{"delta": {"content": "one"}}]}).strip()
    assert json.loads(events[-1][6:])["error"]["code"] == 502


def test_a_client_leaving_mid_stream_stops_the_upstream(upstream, proxy):
    never, stopped = asyncio.Event(), threading.Event()

    async def stream(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"delta": {"content": "one"}}]}))
        try:
            await never.wait()  # generating until someone stops it
        finally:
            stopped.set()
        return resp

    upstream.answer = stream
    r = post(proxy, CHAT, chat_body(question("q"), context_blocks=DOCS[:2], stream=True), stream=True)
    assert next(r.iter_content(chunk_size=None)).startswith(b"data: ")
    r.close()  # the client goes away
    assert stopped.wait(WAIT_S)  # the proxy closed its upstream request
    assert pipeline_of(proxy).index.requests == 1  # accepted at the first event, as in the plugin


def test_a_client_leaving_after_the_last_chunk_is_a_complete_answer(upstream, proxy, monkeypatch, caplog):
    # A stream client closes at `data: [DONE]`; if the proxy sees that before it ends its
    # own answer, aiohttp refuses the final write as below. The answer was complete.
    ended, real_write_eof = threading.Event(), web.StreamResponse.write_eof

    async def closed_transport(self, data=b""):
        if asyncio.get_running_loop() is not proxy.loop:  # the upstream's own answer
            return await real_write_eof(self, data)
        ended.set()
        raise aiohttp.ClientConnectionResetError("Cannot write to closing transport")

    async def stream(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"delta": {"content": "one"}}]}) + b"data: [DONE]\n\n")
        return resp

    upstream.answer = stream
    with monkeypatch.context() as patch:
        patch.setattr(web.StreamResponse, "write_eof", closed_transport)
        r = post(proxy, CHAT, chat_body(question("q"), context_blocks=DOCS[:2], stream=True), stream=True)
        lines = []
        for line in r.iter_lines():  # up to [DONE], as a stream client reads
            lines += [line] if line else []
            if line == b"data: [DONE]":
                break
        assert lines[0].startswith(b"data: {") and lines[-1] == b"data: [DONE]"
        # The patched final write fails as a closed transport does. The client closes only
        # after it: a real close before the proxy reaches that write would cancel the
        # handler (handler_cancellation) instead of exercising it.
        assert ended.wait(WAIT_S)
        r.close()
        proxy.run(asyncio.sleep(0))  # the handler has returned (or raised) by this loop turn
    assert [rec.getMessage() for rec in caplog.records if rec.levelno >= 40] == []
    assert pipeline_of(proxy).index.requests == 1


# -- bounds --------------------------------------------------------------------------------

def test_oversized_body_is_a_413_and_reaches_no_upstream(upstream, make_proxy):
    srv = make_proxy(max_body_bytes=1000)
    r = post(srv, CHAT, chat_body(question("x" * 2000)))
    assert r.status_code == 413 and r.json()["error"]["code"] == 413
    assert upstream.received == []
    assert post(srv, CHAT, chat_body(question("small"))).status_code == 200


def hold(upstream: FakeUpstream) -> tuple[asyncio.Event, threading.Event]:
    """Make the upstream hold each request until ``release`` is set; ``arrived`` tells one came."""
    release, arrived = asyncio.Event(), threading.Event()

    async def held(request, body):
        arrived.set()
        await release.wait()
        return web.json_response({"done": True})

    upstream.answer = held
    return release, arrived


def test_requests_beyond_the_concurrency_bound_get_503(upstream, make_proxy):
    release, arrived = hold(upstream)
    srv = make_proxy(max_concurrency=1)
    first: list = []
    t = threading.Thread(target=lambda: first.append(post(srv, CHAT, chat_body(question("a")))))
    t.start()
    try:
        assert arrived.wait(WAIT_S)
        r = post(srv, CHAT, chat_body(question("b")))
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    finally:
        upstream.set_event(release)
        t.join(WAIT_S)
    assert first[0].status_code == 200
    assert post(srv, CHAT, chat_body(question("c"))).status_code == 200


def test_index_stays_within_the_upstream_cache_tokens(upstream, make_proxy):
    srv = make_proxy()
    index = pipeline_of(srv).index
    post(srv, CHAT, chat_body(question("q0"), context_blocks=DOCS[:2]))
    index.max_tokens = index.tokens + 10  # room for one request's path, not two
    for i in range(1, 5):
        post(srv, CHAT, chat_body(question(f"q{i}"), context_blocks=[DOCS[i], DOCS[(i + 1) % 5]]))
        assert 0 < index.tokens <= index.max_tokens
    assert index.requests == 1  # the older paths were forgotten, oldest first


class socket_closed:
    """A local port with nothing listening on it (bound, then closed)."""

    def __enter__(self) -> int:
        import socket

        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        return port

    def __exit__(self, *exc) -> None:
        pass


def test_the_command_serves_the_proxy(upstream):
    """``python -m cp_engine.proxy`` as a user starts it: rewrites, forwards, stops on SIGTERM."""
    import socket
    import subprocess
    import sys
    import time

    with socket_closed() as port:
        pass
    proc = subprocess.Popen([sys.executable, "-m", "cp_engine.proxy", "--upstream", upstream.server.url,
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120  # interpreter start on a busy machine
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
                time.sleep(0.2)
        r = requests.post(f"http://127.0.0.1:{port}{CHAT}", timeout=WAIT_S,
                          json=chat_body(question("q"), context_blocks=DOCS[:2]))
        assert r.status_code == 200
        assert "context_blocks" not in upstream.body() and DOCS[0] in upstream.body()["messages"][-1]["content"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=60)
    assert f"cp_engine proxy on http://127.0.0.1:{port} -> {upstream.server.url}" in out


# -- the proxy's own counters ------------------------------------------------------------

def scrape(srv: BackgroundServer) -> dict[tuple[str, str], float]:
    """``GET /cp_engine/metrics`` parsed by prometheus_client: (sample, status label) -> value."""
    parser = pytest.importorskip("prometheus_client.parser")
    r = requests.get(srv.url + "/cp_engine/metrics", timeout=WAIT_S)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return {(s.name, s.labels.get("status", "")): s.value
            for fam in parser.text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_route_counts_each_outcome_and_is_never_forwarded(upstream, make_proxy):
    srv = make_proxy(max_body_bytes=4000)
    before = scrape(srv)
    assert before[("cp_engine_proxy_requests_rewritten_total", "")] == 0
    assert before[("cp_engine_proxy_index_requests", "")] == 0
    assert post(srv, CHAT, chat_body(question("a"), context_blocks=DOCS[:2])).status_code == 200
    assert post(srv, CHAT, chat_body(question("b"))).status_code == 200  # unmarked
    assert requests.get(srv.url + "/v1/models", timeout=WAIT_S).status_code == 200
    assert post(srv, CHAT, chat_body(question("c"), context_blocks=["x", " "])).status_code == 400
    assert post(srv, CHAT, chat_body(question("x" * 5000))).status_code == 413

    async def refuse(request, body):
        return web.json_response({"error": {"message": "no"}}, status=400)

    upstream.answer = refuse
    assert post(srv, CHAT, chat_body(question("d"), context_blocks=DOCS[2:4])).status_code == 400
    got = scrape(srv)
    assert got[("cp_engine_proxy_requests_rewritten_total", "")] == 2
    assert got[("cp_engine_proxy_requests_passed_through_total", "")] == 2
    assert got[("cp_engine_proxy_requests_rejected_total", "400")] == 1
    assert got[("cp_engine_proxy_requests_rejected_total", "413")] == 1
    assert got[("cp_engine_proxy_rewrites_rolled_back_total", "")] == 1
    assert got[("cp_engine_proxy_requests_rewrite_failed_total", "")] == 0
    index = pipeline_of(srv).index
    assert got[("cp_engine_proxy_index_requests", "")] == index.requests == 1
    assert got[("cp_engine_proxy_index_tokens", "")] == index.tokens > 0
    assert got[("cp_engine_proxy_index_max_tokens", "")] == index.max_tokens
    assert got[("cp_engine_proxy_in_flight", "")] == 1  # the scrape itself
    assert all("/cp_engine/metrics" not in r["path"] for r in upstream.received)
    assert len(upstream.received) == 4


def test_metrics_count_upstream_failures_and_failed_rewrites(upstream, make_proxy, monkeypatch):
    with socket_closed() as port:
        dead = make_proxy(upstream=f"http://127.0.0.1:{port}")
        assert post(dead, CHAT, chat_body(question("q"), context_blocks=DOCS[:2])).status_code == 502
    got = scrape(dead)
    assert got[("cp_engine_proxy_upstream_errors_total", "502")] == 1
    assert got[("cp_engine_proxy_rewrites_rolled_back_total", "")] == 1

    async def breaks(request, body):
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(_sse({"choices": [{"delta": {"content": "one"}}]}))
        request.transport.close()
        return resp

    upstream.answer = breaks
    srv = make_proxy()
    post(srv, CHAT, chat_body(question("q"), stream=True))
    monkeypatch.setenv("CP_ENGINE_FAULT", "proxy_rewrite")
    upstream.answer = FakeUpstream.ok
    assert post(srv, CHAT, chat_body(question("q"), context_blocks=DOCS[:2])).status_code == 200
    got = scrape(srv)
    assert got[("cp_engine_proxy_upstream_errors_total", "502")] == 1
    assert got[("cp_engine_proxy_requests_rewrite_failed_total", "")] == 1
    assert got[("cp_engine_proxy_requests_passed_through_total", "")] == 1


def test_metrics_are_served_when_the_concurrency_bound_is_reached(upstream, make_proxy):
    release, arrived = hold(upstream)
    srv = make_proxy(max_concurrency=1)
    t = threading.Thread(target=lambda: post(srv, CHAT, chat_body(question("a"))))
    t.start()
    try:
        assert arrived.wait(WAIT_S)
        assert post(srv, CHAT, chat_body(question("b"))).status_code == 503
        got = scrape(srv)
    finally:
        upstream.set_event(release)
        t.join(WAIT_S)
    assert got[("cp_engine_proxy_requests_rejected_total", "503")] == 1
    assert got[("cp_engine_proxy_in_flight", "")] == 2


def test_the_proxys_index_is_bounded_by_the_upstream_cache_tokens():
    from cp_engine.proxy.app import PIPELINE

    app = build_app(ProxyConfig(upstream="http://127.0.0.1:9", upstream_cache_tokens=1234))
    assert app[PIPELINE].index.max_tokens == 1234
