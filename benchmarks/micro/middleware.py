"""API server CPU per request that an ASGI middleware's form costs, engine-free.

    .venv/bin/python -m benchmarks.micro.middleware            # 3 rounds of 3,000 requests
    .venv/bin/python -m benchmarks.micro.middleware --quick    # 1 round of 500

Drives a FastAPI app (what vLLM's API server is built on) straight through ASGI, one
request after another: a POST answered with an SSE stream of ``--chunks`` chunks, as
a streamed chat completion is. Side by side, the same app with nothing in front of
it, with the debug index view (``hooks.debugview.IndexView``, which passes other
paths through) and with a do-nothing ``http`` function middleware (what
``--middleware`` makes of a coroutine: Starlette's ``BaseHTTPMiddleware``). Reported:
this thread's CPU per request (``time.thread_time_ns``), median over rounds, the
rounds interleaved. Results: ``benchmarks/results/middleware_cost[_quick].*``.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common.results import RESULTS, provenance, write_result

FORMS = ("none", "IndexView", "http function")


def _app(form: str, chunks: int):
    from fastapi import FastAPI
    from starlette.responses import StreamingResponse

    from cp_engine.hooks.debugview import IndexView

    async def events():
        for _ in range(chunks):
            yield b"data: {}\n\n"

    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat():
        return StreamingResponse(events(), media_type="text/event-stream")

    if form == "IndexView":
        app.add_middleware(IndexView)  # what vLLM does with --middleware <class>
    elif form == "http function":
        async def passing(request, call_next):
            return await call_next(request)

        app.middleware("http")(passing)  # what vLLM does with --middleware <coroutine>
    return app


_SCOPE = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions",
          "query_string": b"", "headers": [(b"content-type", b"application/json")], "client": ("127.0.0.1", 1),
          "server": ("127.0.0.1", 8000), "scheme": "http", "http_version": "1.1", "root_path": "",
          "asgi": {"version": "3.0"}}


async def _one(app) -> int:
    """Serve one request; returns the response body's size (checked equal across forms)."""
    given = False
    body = 0

    async def receive():
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": b"{}", "more_body": False}
        await asyncio.sleep(3600)  # the client stays: nothing disconnects mid-stream

    async def send(message):
        nonlocal body
        body += len(message.get("body", b""))

    await app(dict(_SCOPE), receive, send)
    return body


async def _rounds(requests: int, rounds: int, chunks: int) -> dict[str, list[float]]:
    apps = {form: _app(form, chunks) for form in FORMS}
    sizes = {form: await _one(app) for form, app in apps.items()}  # warm, and the same answer
    if len(set(sizes.values())) != 1:
        raise RuntimeError(f"the forms answered differently: {sizes}")
    out: dict[str, list[float]] = {form: [] for form in FORMS}
    for _ in range(rounds):
        for form, app in apps.items():
            start = time.thread_time_ns()
            for _ in range(requests):
                await _one(app)
            out[form].append((time.thread_time_ns() - start) / requests / 1e3)
    return out


def markdown(data: dict) -> str:
    base = statistics.median(data["us"]["none"])
    lines = [f"One streamed POST ({data['chunks']} SSE chunks) through a FastAPI app, {data['requests']:,} "
             f"requests per round, {data['rounds']} rounds interleaved; this thread's CPU, median of rounds.", "",
             "| in front of the app | µs / request | added µs / request |", "|---|---|---|"]
    for form in FORMS:
        us = statistics.median(data["us"][form])
        lines.append(f"| {form} | {us:.1f} | {us - base:+.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 round of 500 requests")
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--out", type=Path, help="results JSON (default: results/middleware_cost[_quick].json)")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.micro.middleware", argv)
    requests, rounds = (500, 1) if args.quick else (3000, 3)
    us = asyncio.run(_rounds(requests, rounds, args.chunks))
    data = {"chunks": args.chunks, "requests": requests, "rounds": rounds,
            "us": {k: [round(v, 2) for v in vs] for k, vs in us.items()}}
    out = args.out or RESULTS / ("middleware_cost_quick.json" if args.quick else "middleware_cost.json")
    write_result(out, data, table=markdown, prov=prov)
    return 0


if __name__ == "__main__":
    sys.exit(main())
