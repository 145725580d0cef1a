"""Serve an aiohttp application from a background thread (tests, benchmarks, embedding).

    with BackgroundServer(build_app(cfg)) as srv:   # port 0: a free one
        requests.post(srv.url + "/v1/chat/completions", json=...)

Contract: ``start()`` returns once the server listens on ``host`` (``url`` names the
bound port) and raises what the start raised; ``run(coro)`` runs a coroutine on the
server's loop and returns its result; ``stop()`` runs the application's cleanup,
stops the loop and joins the thread. Clients that disconnect cancel their handler,
as under ``app.run``.
"""
from __future__ import annotations

import asyncio
import threading
from typing import Any, Coroutine

from aiohttp import web

__all__ = ["BackgroundServer"]


class BackgroundServer:
    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.host = host
        self.port = port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="cp-engine-proxy", daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def start(self) -> "BackgroundServer":
        self._thread.start()
        try:
            self.run(self._start())
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.run(self._runner.cleanup())
            self._runner = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
        if not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
