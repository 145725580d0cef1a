"""Runs one arm on one server and measures it from vLLM's own counters.

Per arm: prompt tokens, recomputed prompt tokens (prompt - cached, from
``usage.prompt_tokens_details``), vLLM's prefix-cache hit ratio (``/metrics`` hits /
queries deltas), engine prefill time (``vllm:request_prefill_time_seconds`` sum), TTFT
(client, streaming: mean and p90), wall time and throughput. The prefix cache is reset
(``/reset_prefix_cache``, which the plugin mirrors into its index) before every arm.
"""
from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Sequence

import requests

from benchmarks.common.live import HIT, QUERY, Request, send_all
from benchmarks.engine.arms import SYSTEM, rag_requests
from benchmarks.engine.workloads import Chat, Rag

PREFILL, TTFT = "vllm:request_prefill_time_seconds_sum", "vllm:time_to_first_token_seconds_sum"


def reset_cache(srv) -> None:
    for _ in range(20):
        r = requests.post(srv.url + "/reset_prefix_cache", timeout=60)
        if r.status_code == 200 and r.json().get("success", True):
            return
        time.sleep(0.5)
    raise RuntimeError(f"could not reset the prefix cache: {r.status_code} {r.text[:200]}")


def snapshot(srv) -> dict:
    return {"hits": srv.metric(HIT), "queries": srv.metric(QUERY), "prefill": srv.metric(PREFILL),
            "ttft": srv.metric(TTFT)}


def measure(srv, results, wall: float, before: dict, plan_s: float = 0.0) -> dict:
    time.sleep(1.0)  # the last step's scheduler stats reach /metrics just after the last response
    after = snapshot(srv)
    prompt = sum(r.prompt_tokens for r in results)
    cached = sum(r.cached_tokens for r in results)
    ttfts = sorted(r.ttft_s for r in results if r.ttft_s is not None)
    d = {k: after[k] - before[k] for k in after}
    return {
        "requests": len(results), "prompt_tokens": prompt, "cached_tokens": cached,
        "recomputed_tokens": prompt - cached,
        "hit_ratio": round(d["hits"] / d["queries"], 4) if d["queries"] else 0.0,
        "engine_prefill_s": round(d["prefill"], 3), "engine_ttft_s": round(d["ttft"], 3),
        "ttft_mean_s": round(statistics.fmean(ttfts), 4) if ttfts else None,
        "ttft_p90_s": round(ttfts[int(0.9 * (len(ttfts) - 1))], 4) if ttfts else None,
        "wall_s": round(wall, 2), "plan_s": round(plan_s, 3),
        "throughput_rps": round(len(results) / wall, 3) if wall else None,
        "prompt_tok_per_s": round(prompt / wall, 1) if wall else None,
    }


def warmup_requests(workloads_: Sequence, count: int) -> list[Request]:
    """The first ``count`` plain requests of the first batched-RAG workload (none: []).

    Plain, so they pass the plugin untouched and teach its index nothing; the prefix
    cache is reset after them, so they leave no cached block behind either.
    """
    rag = next((w for w in workloads_ if isinstance(w, Rag)), None)
    return rag_requests("off", rag)[0][:count] if rag is not None and count > 0 else []


def warm_up(srv, reqs: list[Request], concurrency: int, max_tokens: int) -> None:
    """Untimed requests before a server's first arm, so start-up costs are not billed to
    whichever arm goes first. On this 2-core box it was not enough: with 128 of them the
    first timed arm still ran up to ~20% slower per token than the same server's later
    arms, so compare wall times with ``benchmarks.engine.server_ab`` (interleaved)."""
    if not reqs:
        return
    send_all(srv.url + "/v1", srv.model, reqs, concurrency=concurrency, max_tokens=max_tokens, stream=True)
    reset_cache(srv)


def run_rag(arm: str, srv, rag: Rag, concurrency: int, max_tokens: int,
            count_tokens: Callable[[str], int] | None = None) -> dict | None:
    reqs, plan_s = rag_requests(arm, rag, count_tokens)
    if not reqs:
        return None
    reset_cache(srv)
    before = snapshot(srv)
    results, wall = send_all(srv.url + "/v1", srv.model, reqs, concurrency=concurrency,
                             max_tokens=max_tokens, stream=True, progress=f"{rag.name} {arm}")
    return measure(srv, results, wall, before, plan_s)


def run_chat(arm: str, srv, chat: Chat, concurrency: int, max_tokens: int, tag: str) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.common.live import _client, run_session

    reset_cache(srv)
    before = snapshot(srv)
    client = _client(srv.url + "/v1")
    t0 = time.perf_counter()

    def session(s: int):
        turns = [(blocks, q, (s, t)) for t, (blocks, q) in enumerate(chat.sessions[s])]
        return run_session(client, srv.model, SYSTEM, turns, arm == "on", f"{tag}-{s}", max_tokens, True, t0)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        results = [r for rs in pool.map(session, range(len(chat.sessions))) for r in rs]
    wall = time.perf_counter() - t0
    print(f"[{chat.name} {arm}] {len(results)} turns in {wall:.0f} s", file=sys.stderr, flush=True)
    return measure(srv, results, wall, before)

