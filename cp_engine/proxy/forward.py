"""The upstream side: one aiohttp client session, header filtering, 502/504 mapping.

Contract of ``Upstream.send(method, path_qs, headers, body)``: sends the request to
the upstream base URL + ``path_qs`` (the client's raw path and query, unchanged) with
the client's headers minus hop-by-hop ones, and returns the upstream's response as
soon as its headers arrive (the caller relays and releases it). Nothing is added:
no default User-Agent / Accept / Content-Type, no redirects followed, bodies never
decompressed, so what the upstream sends is what the client gets. Raises
``UpstreamError`` with status 502 (refused, unreachable, broken connection, not HTTP)
or 504 (no connection within ``connect_timeout_s``, silence longer than
``read_timeout_s``) and a message naming the upstream.
"""
from __future__ import annotations

import asyncio
import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

__all__ = ["HOP_BY_HOP", "Upstream", "UpstreamError", "forwarded_headers"]

# RFC 9110 §7.6.1: meaningful for one connection only, never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"})


class UpstreamError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def forwarded_headers(headers: CIMultiDictProxy, drop: tuple[str, ...] = ()) -> CIMultiDict:
    """``headers`` (repeated names kept) without hop-by-hop ones, those the Connection
    header names, and ``drop``."""
    named = {t.strip().lower() for v in headers.getall("Connection", ()) for t in v.split(",")}
    skip = HOP_BY_HOP | named | {d.lower() for d in drop}
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in skip)


class Upstream:
    def __init__(self, base_url: str, connect_timeout_s: float, read_timeout_s: float, max_connections: int):
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(total=None, connect=self.connect_timeout_s,
                                        sock_connect=self.connect_timeout_s, sock_read=self.read_timeout_s)
        self._session = aiohttp.ClientSession(
            timeout=timeout, auto_decompress=False, connector=aiohttp.TCPConnector(limit=self._max_connections),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(self, method: str, path_qs: str, headers: CIMultiDictProxy, body: bytes) -> aiohttp.ClientResponse:
        assert self._session is not None, "Upstream.start() first"
        url = URL(self.base_url + path_qs, encoded=True)
        out = forwarded_headers(headers, drop=("host", "content-length"))
        try:
            return await self._session.request(method, url, headers=out, data=body or None,
                                               allow_redirects=False)
        except aiohttp.ConnectionTimeoutError as exc:
            raise UpstreamError(504, f"cp_engine proxy: upstream {self.base_url} did not accept a connection "
                                     f"within {self.connect_timeout_s:g} s") from exc
        except (aiohttp.SocketTimeoutError, asyncio.TimeoutError) as exc:
            raise UpstreamError(504, f"cp_engine proxy: upstream {self.base_url} sent no answer within "
                                     f"{self.read_timeout_s:g} s") from exc
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamError(502, f"cp_engine proxy: upstream {self.base_url} is unreachable: {exc}") from exc
        except aiohttp.ClientError as exc:  # disconnected, reset, not HTTP
            raise UpstreamError(502, f"cp_engine proxy: upstream {self.base_url} failed: "
                                     f"{type(exc).__name__}: {exc}") from exc
