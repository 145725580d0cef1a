"""EngineCore tells every API server which block paths it admitted
(``--api-server-count`` > 1; docs/scale-out.md).

Each API server process keeps its own context index and sees only the requests it
took, so two of them could order one block set differently and each would align new
requests only to what it rendered itself. EngineCore sees every request: when a
rewritten one joins its waiting queue (an observer of ``hooks.vllm.queue``), it sends
a ``record`` message (namespace, request id, block path, token ends: the request's
hints) to the API servers of its instance, and each records it in its index
(``hooks.channel.apply_to_pipeline``; the API server that rendered it already holds
the same path under the same id). Nothing is sent while the instance has one
receiver. Attached and detached with eviction tracking (``hooks.vllm.eviction``);
never raises into the scheduler (the queue guards its observers).
"""
from __future__ import annotations

from typing import Any

from .. import channel
from . import hints as _hints
from . import queue as _queue

__all__ = ["share_request", "attach", "detach"]

MIN_RECEIVERS = 2  # with one API server its own record is all there is


def share_request(request: Any) -> None:
    h = _hints.of_request(request)
    if h is None or not h.path or not h.request_id or len(h.ends) != len(h.path):
        return
    channel.engine_sender().send({"op": "record", "ns": h.namespace, "rid": h.request_id,
                                  "path": channel.hex_ids(h.path), "ends": list(h.ends)},
                                 min_receivers=MIN_RECEIVERS)


def attach() -> None:
    if share_request not in _queue.observers:
        _queue.observers.append(share_request)


def detach() -> None:
    while share_request in _queue.observers:
        _queue.observers.remove(share_request)
