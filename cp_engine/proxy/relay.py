"""The upstream's answer back to the client, chunk by chunk, settling the commit.

Contract of ``relay(request, upstream, pending)``: the client gets the upstream's
status, reason, headers (minus hop-by-hop ones) and body bytes unchanged, each
chunk written as soon as it arrives. ``pending`` (a rewritten request's
``PendingCommit``, or None) is settled as the plugin settles it from the engine's
answer (``hooks.acceptance``): rejected by a status >= 400; for a stream of
server-sent events accepted at a first normal event and rejected at a first
``data: {"error": ...}`` event or an end before any event; any other answer is
accepted at once. A relay that breaks (client gone, upstream silent or broken)
rejects a still-pending commit, closes the upstream connection (so the upstream
stops generating) and ends the client's answer as an error rather than leaving it
waiting: an event stream gets a final ``data: {"error": ...}`` event, any other body
is cut off (the client sees an incomplete body). A client that leaves once every
chunk was written (a stream client stops at ``data: [DONE]``) ends a complete answer:
nothing is rejected or reported. ``on_broken`` (optional) is called once when the
upstream's answer broke off (not when the client left).
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable

import aiohttp
from aiohttp import web

from cp_engine.hooks.acceptance import PendingCommit, is_error_chunk
from .errors import error_body
from .forward import forwarded_headers

__all__ = ["FirstEvent", "relay"]

logger = logging.getLogger("cp_engine.proxy")

_EVENT_END = (b"\n\n", b"\r\n\r\n")
_MAX_FIRST_EVENT = 1 << 20  # an "event" this long without an end is no SSE error event


def _is_event_stream(upstream: aiohttp.ClientResponse) -> bool:
    return upstream.headers.get("Content-Type", "").split(";")[0].strip().lower() == "text/event-stream"


class FirstEvent:
    """Settles ``pending`` from an SSE stream's first complete event (module docs)."""

    def __init__(self, pending: PendingCommit):
        self.pending = pending
        self._buf = b""

    def feed(self, chunk: bytes) -> None:
        if self.pending.state != "pending":
            return
        self._buf += chunk
        ends = [i for i in (self._buf.find(e) for e in _EVENT_END) if i >= 0]
        if ends:
            if is_error_chunk(self._buf[:min(ends)]):
                self.pending.reject()
            else:
                self.pending.accept()
            self._buf = b""
        elif len(self._buf) > _MAX_FIRST_EVENT:
            self.pending.accept()
            self._buf = b""

    def end(self) -> None:
        self.pending.reject()  # no-op once settled: else the stream held no event


async def relay(request: web.Request, upstream: aiohttp.ClientResponse,
                pending: PendingCommit | None, on_broken: Callable[[], None] | None = None) -> web.StreamResponse:
    stream = _is_event_stream(upstream)
    watch: FirstEvent | None = None
    if pending is not None:
        if upstream.status >= 400:
            pending.reject()
        elif stream:
            watch = FirstEvent(pending)
        else:
            pending.accept()
    resp = web.StreamResponse(status=upstream.status, reason=upstream.reason,
                              headers=forwarded_headers(upstream.headers, drop=("content-length",)))
    if upstream.content_length is not None and "Transfer-Encoding" not in upstream.headers:
        resp.content_length = upstream.content_length
    broke: BaseException | None = None
    try:
        await resp.prepare(request)
        while True:
            try:
                chunk = await upstream.content.readany()
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                broke = exc
                break
            if not chunk:
                break
            if watch is not None:
                watch.feed(chunk)
            await resp.write(chunk)
    except BaseException:  # client gone or handler cancelled: stop the upstream too
        upstream.close()
        if pending is not None:
            pending.reject()
        raise
    if broke is not None:
        if on_broken is not None:
            on_broken()
        return await _broke_off(request, resp, upstream, pending, stream, broke)
    if watch is not None:
        watch.end()
    upstream.release()
    try:
        await resp.write_eof()
    except ConnectionResetError:  # the client closed once it had the body (e.g. at `data: [DONE]`)
        logger.debug("cp_engine proxy: client of %s left before the end of its answer", request.path)
    return resp


async def _broke_off(request: web.Request, resp: web.StreamResponse, upstream: aiohttp.ClientResponse,
                     pending: PendingCommit | None, stream: bool, exc: BaseException) -> web.StreamResponse:
    """The upstream failed mid-answer: end the client's answer as an error (module docs)."""
    upstream.close()
    if pending is not None:
        pending.reject()
    logger.warning("cp_engine proxy: upstream answer to %s broke off: %s: %s",
                   request.path, type(exc).__name__, exc)
    if not stream:
        raise ConnectionResetError("upstream answer broke off") from exc  # aiohttp drops the connection
    message = f"cp_engine proxy: upstream answer broke off ({type(exc).__name__})"
    await resp.write(b"data: " + json.dumps(error_body(502, message)).encode() + b"\n\n")
    await resp.write_eof()
    return resp
