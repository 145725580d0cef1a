"""Read-only, local view of the API server's context index (reliability tests, soak).

Switched on with vLLM's own middleware option, so no patch is involved and a server
started without it has no such route:

    vllm serve MODEL --middleware cp_engine.hooks.debugview.index_view

(``index_view`` is the ASGI middleware class ``IndexView``: other requests pass
straight through to the app.)

``GET /cp_engine/index`` answers ``index_status()`` as JSON (``?paths=0`` leaves the
paths out), after the eviction receiver has applied what it was holding back for its
batching window (``hooks.channel.Receiver.flush``), so a client that waits for its
request's answer and then reads the view sees the evictions that request caused. Only
loopback clients get it; anyone else, and any other method, gets 404. It never changes
the index.

Contract of ``index_status(pipe)`` (a ``ContextPipeline``, locked or plain):
- ``nodes`` / ``requests`` / ``max_nodes`` / ``evicted_nodes``: the index's counters;
- invariants, all 0 in a consistent index: ``refs_negative`` (live nodes with a
  negative reference count), ``unowned`` (live nodes no recorded request holds),
  ``child_over_parent`` (a node with more references than its parent: every path
  through a child passes its parent), ``unreachable`` (``nodes`` minus the nodes
  reachable from the root: leaked numbers);
- ``refs_min``: smallest reference count of a live node (0 when empty);
- ``paths``: namespace -> root-to-leaf block paths (16-hex ids), at most
  ``max_paths`` in all (``paths_truncated`` says when more exist);
- ``channel``: this process's receiver counters (received / applied / failed, and
  the wake-ups that applied them), so a caller can wait for eviction messages in
  flight to be applied;
- ``pid``: the answering process (``--api-server-count`` > 1 runs several, each with
  its own index).
"""
from __future__ import annotations

import os
from typing import Any

__all__ = ["PATH", "IndexView", "index_status", "index_view"]

PATH = "/cp_engine/index"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def _plain(pipe: Any) -> Any:
    return getattr(pipe, "unwrapped", pipe)


def index_status(pipe: Any, paths: bool = True, max_paths: int = 5000) -> dict:
    """Counters, invariant checks and (optionally) paths of ``pipe``'s index."""
    index = _plain(pipe).index
    out: dict[str, Any] = {}
    # Reads the trie's arrays directly: the public API has no whole-tree walk, and
    # the index lock (an RLock every public method takes) keeps the walk consistent.
    with index._lock:
        trie = index._trie
        refs, children = trie.refs, trie.children
        negative = unowned = over_parent = reachable = 0
        refs_min = None
        found: dict[str, list[list[str]]] = {}
        total_paths = 0
        stack = [(0, None, [])]  # (node, namespace, block path)
        while stack:
            node, ns, prefix = stack.pop()
            for key, child in children[node].items():
                reachable += 1
                r = refs[child]
                negative += r < 0
                unowned += r == 0
                if node != 0 and r > refs[node]:
                    over_parent += 1
                refs_min = r if refs_min is None else min(refs_min, r)
                if node == 0:  # namespace node: key is (marker, name)
                    stack.append((child, str(key[1]) if isinstance(key, tuple) else str(key), []))
                    continue
                path = prefix + [format(int(key) & 0xFFFFFFFFFFFFFFFF, "016x")]
                if children[child]:
                    stack.append((child, ns, path))
                elif paths:
                    total_paths += 1
                    if total_paths <= max_paths:
                        found.setdefault(ns or "", []).append(path)
        out.update(
            nodes=trie.size, requests=index.requests, max_nodes=index.max_nodes,
            evicted_nodes=index.evicted_nodes, refs_min=refs_min or 0, refs_negative=negative,
            unowned=unowned, child_over_parent=over_parent, unreachable=trie.size - reachable,
        )
    if paths:
        out["paths"] = found
        out["paths_truncated"] = total_paths > max_paths
    out["channel"] = _channel_counters()
    out["pid"] = os.getpid()
    return out


def _channel_counters() -> dict:
    from . import channel

    recv = getattr(channel, "_receiver", None)
    if recv is None:
        return {}
    return {"received": recv.received, "applied": recv.applied, "failed": recv.failed, "wakeups": recv.wakeups}


class IndexView:
    """ASGI middleware (vLLM's ``--middleware`` adds a class as one): serves ``GET
    /cp_engine/index`` and hands every other request to the app untouched.

    A class, not an ``http`` function middleware: Starlette runs those through
    ``BaseHTTPMiddleware``, which passes every response through a task and a memory
    stream whether or not it is this route's (CPU per request: ``python -m
    benchmarks.micro.middleware``).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http" or scope.get("path") != PATH:
            await self.app(scope, receive, send)
            return
        response = await _answer(scope)
        await response(scope, receive, send)


index_view = IndexView  # the name the docs give ``--middleware``


async def _answer(scope: dict) -> Any:
    from starlette.requests import Request
    from starlette.responses import JSONResponse

    request = Request(scope)
    host = request.client.host if request.client is not None else ""
    if request.method != "GET" or host not in _LOOPBACK:
        return JSONResponse({"error": "not found"}, status_code=404)
    from . import channel, runtime

    try:
        recv = getattr(channel, "_receiver", None)
        if recv is not None:
            # Evictions held back by the receiver's batching window count too. The flush
            # waits for the receiver thread, so it runs off the event loop.
            import asyncio

            await asyncio.to_thread(recv.flush)
        body = index_status(runtime.pipeline(), paths=request.query_params.get("paths") != "0")
    except Exception as exc:  # a debug view must not turn into a server error page
        return JSONResponse({"error": f"index status failed: {exc!r}"}, status_code=503)
    return JSONResponse(body)
