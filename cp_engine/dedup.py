"""Per-conversation de-duplication of context blocks.

Contract of ``Deduplicator.mark``: for each position of a request's block-id list it
says whether the block must be sent in full (``True``) or may be replaced by a short
reference hint (``False``). A block is sent in full the first time the conversation
sees it; later copies — in a later turn or repeated inside the same request — become
references. First occurrences are therefore never dropped. Memory is bounded: at
most ``max_conversations`` conversations (least recently active forgotten first) and
``max_blocks`` remembered blocks per conversation (oldest forgotten first; a
forgotten block is simply sent in full again).

Conversations are keyed by ``(tenant, conversation_id)``: one tenant can never read
or evict another tenant's entries by guessing an id.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Sequence

from .blocks import BlockId


class ConversationState:
    """What one conversation has been sent: block ids and its rendered user turns."""

    __slots__ = ("sent", "turns")

    def __init__(self) -> None:
        self.sent: OrderedDict[BlockId, None] = OrderedDict()
        # original user-turn text → (text the engine saw, ids rendered in full there)
        self.turns: OrderedDict[str, tuple[str, frozenset]] = OrderedDict()


class Deduplicator:
    def __init__(self, max_conversations: int = 10_000, max_blocks: int = 512, max_turns: int = 64):
        self.max_conversations = max_conversations
        self.max_blocks = max_blocks
        self.max_turns = max_turns
        self._convs: OrderedDict[Hashable, ConversationState] = OrderedDict()
        self._lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._convs)

    def _state(self, key: Hashable, create: bool) -> ConversationState | None:
        state = self._convs.get(key)
        if state is None and create:
            state = self._convs[key] = ConversationState()
            while len(self._convs) > self.max_conversations:
                self._convs.popitem(last=False)
        if state is not None:
            self._convs.move_to_end(key)
        return state

    def mark(self, key: Hashable, ids: Sequence[BlockId], commit: bool = True,
             available: frozenset | set | None = None) -> list[bool]:
        """Full (True) or reference (False) for each position; see module contract.

        ``available``: when given, only these ids count as already sent (the server
        passes the ids rendered in full in the history turns this request replays,
        so a reference never points at a turn the client dropped).
        """
        with self._lock:
            state = self._state(key, create=commit)
            if available is not None:
                sent = available
            else:
                sent = state.sent if state is not None else {}
            here: set[BlockId] = set()
            out = []
            for b in ids:
                out.append(b not in sent and b not in here)
                here.add(b)
            if commit and state is not None:
                for b in ids:
                    state.sent[b] = None
                    state.sent.move_to_end(b)
                while len(state.sent) > self.max_blocks:
                    state.sent.popitem(last=False)
            return out

    def remember_turn(self, key: Hashable, original: str, rendered: str, full_ids: Sequence[BlockId] = ()) -> None:
        """Remember how a user turn was rendered so later turns can replay it exactly."""
        with self._lock:
            state = self._state(key, create=True)
            state.turns[original] = (rendered, frozenset(full_ids))
            state.turns.move_to_end(original)
            while len(state.turns) > self.max_turns:
                state.turns.popitem(last=False)

    def rendered_turn(self, key: Hashable, original: str) -> tuple[str, frozenset] | None:
        """(rendered text, ids rendered in full) of an earlier turn, or None."""
        with self._lock:
            state = self._state(key, create=False)
            return None if state is None else state.turns.get(original)

    def forget(self, key: Hashable) -> bool:
        with self._lock:
            return self._convs.pop(key, None) is not None

    def reset(self) -> None:
        with self._lock:
            self._convs.clear()
