"""API-server end of the eviction channel: start the receiver that applies EngineCore's
eviction messages to this process's context index (``hooks.channel``).

Installed when the OpenAI chat serving module is imported (only the API server does),
before EngineCore sends anything. Fail-open: without a receiver, senders drop.
"""
from __future__ import annotations

from .. import channel, runtime


def install() -> bool:
    channel.start_receiver(runtime.pipeline())
    return True


def uninstall() -> None:
    channel.stop_all()
