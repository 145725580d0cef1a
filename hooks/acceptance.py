"""Commit a rewritten request's plugin state only once the engine has accepted it.

A rewrite decides an order and a dedup plan before the engine has seen the request;
the engine may still reject it (prompt too long, bad sampling parameters, a client
that disconnects first). What each outcome leaves behind:

- at rewrite (``PendingCommit(...)``): the rendered order is indexed under the
  request id (``ContextPipeline.record``) so concurrent requests with the same blocks
  align with it while it runs; nothing is written to the conversation's dedup state;
- ``accept()``: the conversation's dedup history takes the blocks and the rendered
  turn (``commit_history``) and the rewrite counters are incremented;
- ``reject()``: the index path is dropped (``rollback``); the conversation is as it
  was, so its next turn sends the blocks in full again.

The first of ``accept`` / ``reject`` wins; later calls do nothing. Both are fail-open:
a failure is counted as ``hook_failures{hook=<hook>}`` and never raised (the fault
switch ``CP_ENGINE_FAULT=<hook>`` makes them fail, for tests). Engine-neutral: the
adapters decide what "accepted" means for their response types; for a stream of
server-sent events (both engines' OpenAI servers) ``accept_on_first_chunk`` decides:
accepted at the first normal event, rejected at a first ``data: {"error": ...}``
event or a stream that ends or is closed before any event. A stream dropped before
it was ever iterated (the client left before the response started) never runs its
own cleanup: a finalizer queues its commit, and the next ``PendingCommit`` rejects it
on the request path (never from inside the garbage collector, which may run in the
middle of an index update).
"""
from __future__ import annotations

import json
import threading
import weakref
from collections import deque
from typing import Any, AsyncIterator, Hashable

from . import faults, metrics

__all__ = ["PendingCommit", "count_rewrite", "is_error_chunk", "accept_on_first_chunk", "reject_abandoned"]

# Commits of streams dropped unstarted, waiting for the next rewrite to reject them
# (deque append/popleft are atomic: the finalizer may run in any thread).
_abandoned: deque = deque()


def reject_abandoned() -> int:
    """Reject every queued commit of an abandoned stream; returns how many were pending."""
    n = 0
    while True:
        try:
            pending = _abandoned.popleft()
        except IndexError:
            return n
        if pending.state == "pending":
            pending.reject()
            n += 1


def count_rewrite(prep: Any, n_blocks: int, max_blocks: int) -> None:
    """Counters of one accepted rewrite (``n_blocks`` as the client sent them)."""
    metrics.inc("requests_rewritten")
    moved = sum(1 for pos, i in enumerate(prep.order) if pos != i)
    if moved:
        metrics.inc("blocks_reordered", moved)
    if prep.tokens_saved:
        metrics.inc("dedup_tokens_saved", prep.tokens_saved)
    if n_blocks > max_blocks:
        metrics.inc("requests_passed_through")  # rendered as given, unreordered


class PendingCommit:
    """One rewritten request between rewrite and the engine's answer (see module docs)."""

    def __init__(self, hook: str, pipe: Any, request_id: Hashable, prep: Any, base_offset: int,
                 n_blocks: int, max_blocks: int) -> None:
        self.hook = hook
        self.request_id = request_id
        self.prep = prep
        self._pipe = pipe
        self._n_blocks = n_blocks
        self._max_blocks = max_blocks
        self._lock = threading.Lock()
        self.state = "pending"
        reject_abandoned()
        # Raises into the caller's own guard: no PendingCommit, nothing recorded.
        pipe.record(request_id, prep, base_offset=base_offset)

    def _settle(self, state: str) -> bool:
        with self._lock:
            if self.state != "pending":
                return False
            self.state = state
            return True

    def accept(self) -> None:
        if not self._settle("accepted"):
            return
        with faults.guarded(self.hook):
            faults.check_fault(self.hook)
            self._pipe.commit_history(self.prep)
            count_rewrite(self.prep, self._n_blocks, self._max_blocks)

    def reject(self) -> None:
        if not self._settle("rejected"):
            return
        with faults.guarded(self.hook):
            self._pipe.rollback(self.request_id)
            metrics.inc("requests_rolled_back")


def is_error_chunk(chunk: Any) -> bool:
    """An SSE ``data: {"error": ...}`` event (the engines' streaming error responses)."""
    if isinstance(chunk, (bytes, bytearray)):
        chunk = bytes(chunk).decode("utf-8", "replace")
    if not isinstance(chunk, str) or not chunk.startswith("data: {"):
        return False
    try:
        return "error" in json.loads(chunk[6:])
    except ValueError:
        return False


def _queue_if_unsettled(pending: PendingCommit) -> None:
    if pending.state == "pending":
        _abandoned.append(pending)


def accept_on_first_chunk(stream: Any, pending: PendingCommit) -> AsyncIterator[Any]:
    """``stream``'s chunks, unchanged, settling ``pending`` at the first one.

    Closing this generator closes ``stream`` (engines abort a request when their
    generator is closed, e.g. on a client disconnect); dropping it unstarted queues
    ``pending`` for ``reject_abandoned``.
    """
    gen = _settling(stream, pending)
    weakref.finalize(gen, _queue_if_unsettled, pending)
    return gen


async def _settling(stream: Any, pending: PendingCommit) -> AsyncIterator[Any]:
    try:
        async for chunk in stream:
            if pending.state == "pending":
                if is_error_chunk(chunk):
                    pending.reject()
                else:
                    pending.accept()
            yield chunk
    finally:
        pending.reject()  # no-op once settled; else the stream ended with no chunk
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
