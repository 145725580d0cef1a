"""The proxy's HTTP server: one catch-all route, bounded body size and concurrency.

Every request, whatever its method and path, goes to the upstream. POSTs to
``.../chat/completions`` and ``.../completions`` whose JSON body marks context blocks
are rewritten first (``rewrite.stage``); everything else goes byte-identical. Answers
the proxy makes itself (``errors``): 400 for malformed marks (the plugin's message),
413 for a body over ``max_body_bytes``, 503 with ``Retry-After`` beyond
``max_concurrency`` requests in flight, 502/504 from ``forward``. A client that
disconnects cancels its request, upstream included. A successful ``POST`` to a route
that drops the upstream's whole prefix cache (vLLM's ``/reset_prefix_cache``,
SGLang's ``/flush_cache``) resets the context index too. ``GET /cp_engine/metrics`` is
the proxy's own route (never forwarded): its counters and index size as Prometheus
text (``counters``), served even when the concurrency bound is reached.

``build_app(cfg, pipeline=None)`` gives the aiohttp application (its own
``ContextPipeline`` whose index is bounded by ``cfg.upstream_cache_tokens``, unless
one is passed); ``run(cfg)`` serves it until interrupted.
"""
from __future__ import annotations

import logging

from aiohttp import web

from cp_engine.config import load_config
from cp_engine.hooks.acceptance import PendingCommit
from cp_engine.index import ContextIndex
from cp_engine.pipeline import ContextPipeline
from . import rewrite
from .config import ProxyConfig
from .counters import CONTENT_TYPE, ProxyCounters, render
from .errors import error_response
from .forward import Upstream, UpstreamError
from .relay import relay

__all__ = ["COUNTERS", "METRICS_PATH", "PIPELINE", "build_app", "make_pipeline", "run"]

logger = logging.getLogger("cp_engine.proxy")

CONFIG = web.AppKey("cp_engine_proxy_config", ProxyConfig)
PIPELINE = web.AppKey("cp_engine_proxy_pipeline", ContextPipeline)
UPSTREAM = web.AppKey("cp_engine_proxy_upstream", Upstream)
COUNTERS = web.AppKey("cp_engine_proxy_counters", ProxyCounters)
METRICS_PATH = "/cp_engine/metrics"
# Routes that drop the upstream's whole prefix cache (vLLM, SGLang).
_CACHE_RESETS = ("/reset_prefix_cache", "/flush_cache")


class InFlight:
    """Requests being handled; the event loop is the only writer, so no lock."""

    def __init__(self, limit: int):
        self.limit = limit
        self.count = 0


IN_FLIGHT = web.AppKey("cp_engine_proxy_in_flight", InFlight)


def make_pipeline(cfg: ProxyConfig) -> ContextPipeline:
    """The ``CP_ENGINE_*`` flags' pipeline, its index bounded by the upstream's cache size."""
    flags = load_config()
    for warning in flags.warnings:
        logger.warning("cp_engine config: %s", warning)
    return ContextPipeline(flags, index=ContextIndex(max_nodes=flags.index_max_nodes,
                                                     max_tokens=cfg.upstream_cache_tokens))


async def _read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None when it is over ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        return None
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        return None


async def metrics(request: web.Request) -> web.Response:
    app = request.app
    text = render(app[COUNTERS], app[PIPELINE].index, app[IN_FLIGHT].count + 1)
    return web.Response(body=text.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})


async def handle(request: web.Request) -> web.StreamResponse:
    app = request.app
    cfg = app[CONFIG]
    in_flight = app[IN_FLIGHT]
    if in_flight.count >= in_flight.limit:
        app[COUNTERS].inc("requests_rejected", 503)
        return error_response(503, f"cp_engine proxy: {in_flight.limit} requests already in flight",
                              headers={"Retry-After": "1"})
    in_flight.count += 1
    try:
        return await _forward(request, cfg)
    finally:
        in_flight.count -= 1


async def _forward(request: web.Request, cfg: ProxyConfig) -> web.StreamResponse:
    counters = request.app[COUNTERS]
    body = await _read_body(request, cfg.max_body_bytes)
    if body is None:
        counters.inc("requests_rejected", 413)
        return error_response(413, f"cp_engine proxy: request body over {cfg.max_body_bytes} bytes")
    outcome = None
    route = rewrite.route_of(request.method, request.path)
    if route is not None:
        outcome = rewrite.stage(route, body, request.headers, request.app[PIPELINE])
        if isinstance(outcome, rewrite.Invalid):
            counters.inc("requests_rejected", 400)
            return error_response(400, outcome.message)
    if outcome is None:
        counters.inc("requests_passed_through")
        pending = None
    else:
        body, pending = outcome.body, outcome.pending
        counters.inc("requests_rewritten" if pending is not None else "requests_rewrite_failed")
    try:
        return await _exchange(request, body, pending, counters)
    finally:
        if pending is not None and pending.state == "rejected":
            counters.inc("rewrites_rolled_back")


async def _exchange(request: web.Request, body: bytes, pending: PendingCommit | None,
                    counters: ProxyCounters) -> web.StreamResponse:
    """Send to the upstream and relay its answer; ``pending`` is settled either way."""
    try:
        upstream = await request.app[UPSTREAM].send(request.method, request.raw_path, request.headers, body)
    except UpstreamError as exc:
        if pending is not None:
            pending.reject()
        counters.inc("upstream_errors", exc.status)
        logger.warning("%s", exc.message)
        return error_response(exc.status, exc.message)
    except BaseException:  # cancelled (client gone) while waiting
        if pending is not None:
            pending.reject()
        raise
    if request.method == "POST" and request.path.rstrip("/").endswith(_CACHE_RESETS) and upstream.status < 400:
        # The upstream has forgotten every prefix: so does the index, before the client
        # can read the answer and send a request that would align to a stale path.
        request.app[PIPELINE].reset()
    return await relay(request, upstream, pending, on_broken=lambda: counters.inc("upstream_errors", 502))


def build_app(cfg: ProxyConfig, pipeline: ContextPipeline | None = None) -> web.Application:
    app = web.Application(client_max_size=cfg.max_body_bytes)
    app[CONFIG] = cfg
    app[PIPELINE] = pipeline if pipeline is not None else make_pipeline(cfg)
    app[UPSTREAM] = Upstream(cfg.upstream_base, cfg.connect_timeout_s, cfg.read_timeout_s, cfg.max_concurrency)
    app[IN_FLIGHT] = InFlight(cfg.max_concurrency)
    app[COUNTERS] = ProxyCounters()

    async def start(app: web.Application) -> None:
        await app[UPSTREAM].start()

    async def stop(app: web.Application) -> None:
        await app[UPSTREAM].close()

    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def run(cfg: ProxyConfig) -> None:
    logger.info("cp_engine proxy on http://%s:%d -> %s (upstream cache %d tokens, body limit %d bytes, "
                "%d requests in flight at most)", cfg.host, cfg.port, cfg.upstream_base,
                cfg.upstream_cache_tokens, cfg.max_body_bytes, cfg.max_concurrency)
    web.run_app(build_app(cfg), host=cfg.host, port=cfg.port, handler_cancellation=True,
                access_log=None, print=None)
