"""What a block followed when its KV was computed: its lead digest.

A block's *lead* is the token ids from the start of the previous located block up to
the block's own start: that block and whatever separates them (a blank line, a label).
The first located block of a prompt has no lead. A stored entry keeps the lead it was
computed behind; a reused block whose lead in the new prompt equals its entry's lead is
*carried*: its KV was computed right behind the same neighbour, at the same relative
positions, and only context further back has changed (CacheSlide's relative-position
case: an agent's memory and history moving behind a segment that changes every turn).
Blend recomputes a share of a displaced block's tokens and none of a carried one's
(``selection``), so the digest decides how much is recomputed, never what is reused.

Digests are 12-byte BLAKE2b of the ids as int64: equal ids give equal digests across
processes, which the scheduler and worker need, and a collision would need 2^48 leads.
"""
from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

__all__ = ["lead_digest", "lead_digests"]

Span = "tuple[int, int] | None"


def lead_digest(ids: Sequence[int]) -> str:
    """The digest of one lead's token ids."""
    return hashlib.blake2b(np.asarray(ids, dtype=np.int64).tobytes(), digest_size=12).hexdigest()


def lead_digests(prompt_ids: Sequence[int], spans: Sequence[Span]) -> list[str | None]:
    """Per span, the digest of ``prompt_ids[previous_start:start]``, where
    ``previous_start`` is the start of the previous located span; None for a span not
    located (None) and for the first located one."""
    out: list[str | None] = []
    previous = None
    for span in spans:
        if span is None:
            out.append(None)
            continue
        start = int(span[0])
        out.append(None if previous is None else lead_digest(prompt_ids[previous:start]))
        previous = start
    return out
