"""API-server end of the eviction channel: start the receiver that applies EngineCore's
eviction messages to this process's context index (``hooks.channel``).

Row ``receiver`` of ``hooks/vllm/table.py``: applied when the OpenAI chat serving
module is imported (only the API server does), before EngineCore sends anything.
Fail-open: without a receiver, senders drop.
"""
from __future__ import annotations

from typing import Any, Callable

from .. import channel, runtime


def start(_serving_cls: Any = None) -> Callable[[], None]:
    """Start the receiver; returns the undo (stop it)."""
    channel.start_receiver(runtime.pipeline())
    return channel.stop_all
