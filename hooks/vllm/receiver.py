"""API-server end of the eviction channel: start the receiver that applies EngineCore's
eviction messages to this process's context index (``hooks.channel``).

Row ``receiver`` of ``hooks/vllm/table.py``: applied when the OpenAI chat serving
module is imported (only the API server does), before EngineCore sends anything.
Fail-open: without a receiver, senders drop.
"""
from __future__ import annotations

from typing import Any, Callable

from .. import channel, runtime


# EngineCore runs in its own process unless VLLM_ENABLE_V1_MULTIPROCESSING=0, so its
# messages arrive on the socket, which wakes the receiver; polling it every 50 ms for
# in-process messages cost the API server 2-4 ms of CPU a second on 2 loaded cores.
# Once an in-process message shows up the receiver polls at its short default again.
IDLE_POLL_MS = 500


def start(_serving_cls: Any = None) -> Callable[[], None]:
    """Start the receiver; returns the undo (stop it)."""
    channel.start_receiver(runtime.pipeline(), idle_poll_ms=IDLE_POLL_MS)
    return channel.stop_all
