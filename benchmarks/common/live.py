"""Client side of the live-server benchmarks (engine, quality).

- ``Server``: either a vLLM server this process starts (``VllmServer``, 127.0.0.1)
  or an existing one (``--url``, e.g. a GPU server started by hand); both expose
  ``base_url``, ``model`` and ``metric()``.
- ``send_all``: sends requests with N threads through the openai client, in the given
  order, optionally streaming (TTFT), and returns one ``Result`` per request.

The canonical plugin interface is used as a user would: ``extra_body={"context_blocks":
[...], "conversation_id": ...}``.
"""
from __future__ import annotations

import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import requests

from cp_engine.devtools.vllm_server import VllmServer, parse_metrics

HIT, QUERY = "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total"


class Remote:
    """An already running OpenAI-compatible vLLM server (``--url``)."""

    def __init__(self, url: str, model: str | None = None):
        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self._model = model

    @property
    def model(self) -> str:
        if self._model is None:
            r = requests.get(self.url + "/v1/models", timeout=30)
            r.raise_for_status()
            self._model = r.json()["data"][0]["id"]
        return self._model

    def metric(self, name: str) -> float:
        r = requests.get(self.url + "/metrics", timeout=30)
        r.raise_for_status()
        return sum(v for k, v in parse_metrics(r.text).items() if k.partition("{")[0] == name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def start_server(model: str, env: dict, extra_args: Sequence[str] = (), kv_cache_gib: int = 2) -> VllmServer:
    """A local vLLM server (plugin state chosen by ``env``); always nice'd on a shared box."""
    srv = VllmServer(model, env=env, extra_args=tuple(extra_args), kv_cache_gib=kv_cache_gib)
    # The benchmark shares 2 cores with other work: the server inherits our niceness.
    return srv.start(timeout=600)


def base_url(srv) -> str:
    return srv.url.rstrip("/") + "/v1"


@dataclass
class Request:
    messages: list[dict]
    extra: dict = field(default_factory=dict)
    tag: Any = None  # caller's key (question index, ...)


@dataclass
class Result:
    tag: Any
    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float | None
    started_s: float  # since the start of send_all


def _client(url: str):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key="none", max_retries=0, timeout=1800)


def send_one(client, model: str, req: Request, max_tokens: int, stream: bool, t_base: float) -> Result:
    kw: dict = {"model": model, "messages": req.messages, "max_tokens": max_tokens, "temperature": 0.0}
    if req.extra:
        kw["extra_body"] = dict(req.extra)
    t0 = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(**kw)
        dt = time.perf_counter() - t0
        u = r.usage
        det = getattr(u, "prompt_tokens_details", None)
        return Result(req.tag, r.choices[0].message.content or "", u.prompt_tokens,
                      int(getattr(det, "cached_tokens", 0) or 0) if det else 0, u.completion_tokens,
                      dt, None, t0 - t_base)
    ttft, parts, usage = None, [], None
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.choices:
            delta = chunk.choices[0].delta.content
            if delta:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                parts.append(delta)
        if chunk.usage is not None:
            usage = chunk.usage
    dt = time.perf_counter() - t0
    det = getattr(usage, "prompt_tokens_details", None) if usage else None
    return Result(req.tag, "".join(parts), usage.prompt_tokens if usage else 0,
                  int(getattr(det, "cached_tokens", 0) or 0) if det else 0,
                  usage.completion_tokens if usage else 0, dt, ttft if ttft is not None else dt, t0 - t_base)


def send_all(url: str, model: str, reqs: Sequence[Request], concurrency: int = 8, max_tokens: int = 16,
             stream: bool = False, progress: str | None = None,
             on_result: Callable[[Result], None] | None = None) -> tuple[list[Result], float]:
    """Send ``reqs`` (submission order = list order) with ``concurrency`` threads.

    Returns the results in input order and the wall time of the whole batch.
    """
    client = _client(url)
    out: list[Result | None] = [None] * len(reqs)
    lock = threading.Lock()
    done = [0]
    t_base = time.perf_counter()
    show = progress is not None and sys.stderr.isatty() or os.environ.get("CP_BENCH_PROGRESS") == "1"

    def work(i: int) -> None:
        r = send_one(client, model, reqs[i], max_tokens, stream, t_base)
        out[i] = r
        with lock:
            done[0] += 1
            if on_result is not None:
                on_result(r)
            if progress is not None and (show or done[0] % max(1, len(reqs) // 10) == 0 or done[0] == len(reqs)):
                print(f"\r[{progress}] {done[0]}/{len(reqs)}", end="\n" if not show or done[0] == len(reqs) else "",
                      file=sys.stderr, flush=True)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        list(pool.map(work, range(len(reqs))))
    return [r for r in out if r is not None], time.perf_counter() - t_base


# ------------------------------------------------------------------------ multi-turn

def plain_messages(system: str, blocks: Sequence[str], question: str, history: Sequence[dict] = ()) -> list[dict]:
    """What a client without the plugin sends: documents joined in retrieval order, then the question."""
    from cp_engine.marking import fallback_messages, find_marks

    msgs = [{"role": "system", "content": system}, *history, {"role": "user", "content": question}]
    return fallback_messages(find_marks({"context_blocks": list(blocks)}, msgs))


def run_session(client, model: str, system: str, turns, dedup: bool, conversation_id: str,
                max_tokens: int, stream: bool, t0: float) -> list[Result]:
    """One conversation, turn by turn; ``turns`` = [(blocks, question, tag)].

    ``dedup=False``: a plain client re-sends every turn with its documents and the full
    rendered history. ``dedup=True``: the plugin client sends ``context_blocks`` +
    ``conversation_id`` with its short history (questions and answers only).
    """
    out: list[Result] = []
    short: list[dict] = []
    full: list[dict] = []
    for blocks, q, tag in turns:
        if dedup:
            msgs = [{"role": "system", "content": system}, *short, {"role": "user", "content": q}]
            req = Request(msgs, {"context_blocks": list(blocks), "conversation_id": conversation_id}, tag=tag)
        else:
            msgs = plain_messages(system, blocks, q, full[1:])
            req = Request(msgs, tag=tag)
        r = send_one(client, model, req, max_tokens, stream, t0)
        out.append(r)
        answer = {"role": "assistant", "content": r.text}
        short += [{"role": "user", "content": q}, answer]
        full = msgs + [answer]
    return out


# ----------------------------------------------------------------------------- stats

# ------------------------------------------------------------------------------ peer

def peer_messages(docs: list[list[str]], queries: list[str], system: str | None) -> dict | None:
    """The peer's ``optimize_batch`` output (messages in its execution order + ``order``),
    run in its own venv; cached on disk by content; None when the peer is unavailable."""
    import hashlib
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    from benchmarks.peer.client import PEER_PY, SETUP_HINT, peer_available
    from benchmarks.common.workloads import CACHE

    spec = {"docs": docs, "queries": queries, "system": system}
    key = hashlib.blake2b(json.dumps(spec, sort_keys=True).encode(), digest_size=10).hexdigest()
    path = CACHE / f"peer_msgs_{key}.json"
    if path.exists():
        return json.loads(path.read_text())
    if not peer_available():
        print(f"[peer] skipped: no peer venv ({SETUP_HINT} creates it)", file=sys.stderr)
        return None
    runner = Path(__file__).resolve().parents[1] / "peer" / "optimize_batch.py"
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        src, dst = Path(tmp) / "in.json", Path(tmp) / "out.json"
        src.write_text(json.dumps(spec))
        proc = subprocess.run([str(PEER_PY), str(runner), str(src), str(dst)], capture_output=True,
                              text=True, timeout=3600)
        if proc.returncode != 0 or not dst.exists():
            print("[peer] failed: " + " | ".join((proc.stderr or "").strip().splitlines()[-5:]), file=sys.stderr)
            return None
        out = json.loads(dst.read_text())
    if sorted(out["order"]) != list(range(len(docs))):
        raise ValueError("peer order is not a permutation of the requests")
    path.write_text(json.dumps(out))
    return out


# ---------------------------------------------------------------------------- models

def choose_model(model_arg: str | None, remote: bool, default) -> tuple[str | None, str]:
    """(model folder or None for a remote server, display name); ``default()`` builds one."""
    if model_arg:
        return model_arg, os.path.basename(model_arg.rstrip("/"))
    if remote:
        return None, "remote"
    return default()
