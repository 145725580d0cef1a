"""API-server end of the eviction channel in SGLang: start the receiver that applies the
scheduler's eviction messages to this process's context index (``hooks.channel``).

Row ``receiver`` of ``hooks/sglang/table.py``: applied by ``chat_rewrite.after_init``
once the API server builds its chat serving object. Fail-open: without a receiver,
senders drop.
"""
from __future__ import annotations

from typing import Any, Callable

from .. import channel


def start(_serving_cls: Any = None) -> Callable[[], None]:
    """Start the receiver; returns the undo (stop it)."""
    channel.start_receiver()
    return channel.stop_all
