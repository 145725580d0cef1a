"""Routing keys of a block-marked request that depend on its block set alone.

A router sees a request before any replica renders it, and each replica's plugin
orders the blocks against its own index, so the rendered prompt is not something a
router can compute. These keys are functions of the *set* of blocks, so the router,
every replica and every API server process get the same answer for the same blocks
in any retrieval order:

- ``canonical_order(ids)``: the distinct block ids in ascending order. Ids are
  BLAKE2b-64 of the block text (``cp_engine.blocks.block_id``), so this is a random
  but fixed ranking shared by every process, with no state.
- ``lead_ids(ids, lead)``: the first ``lead`` ids of that order, the set's bottom-k
  MinHash sketch: two sets with Jaccard similarity J have the same first id with
  probability J, so requests retrieving mostly the same documents share a key.
- ``routing_key(blocks, lead)``: those ids as one lowercase hex string (16 digits per
  id, joined by ``-``), for an HTTP header or a consistent-hash router.
- ``key_hash(ids, lead)``: the same key as an unsigned 64-bit int (a ring position).
- ``conversation_key(conversation_id)``: the key of a conversation instead, the same for
  every turn whatever blocks it carries (``conv-`` and 16 hex digits of its BLAKE2b-64).
"""
from __future__ import annotations

import hashlib
from typing import Hashable, Iterable, Sequence

from ..blocks import block_id

ROUTING_HEADER = "X-CP-Route-Key"  # the header name the deployment recipes use


def conversation_key(conversation_id: str) -> str:
    """Header value for every turn of one conversation."""
    return "conv-" + hashlib.blake2b(conversation_id.encode("utf-8"), digest_size=8).hexdigest()


def canonical_order(ids: Iterable[int]) -> list[int]:
    """Distinct ``ids`` in ascending order (the same for any order or repetition)."""
    return sorted(set(ids))


def lead_ids(ids: Iterable[int], lead: int = 1) -> list[int]:
    """The ``lead`` smallest distinct ids (fewer when the set is smaller)."""
    if lead < 1:
        raise ValueError("lead must be >= 1")
    return canonical_order(ids)[:lead]


def routing_key(blocks: Sequence[Hashable], lead: int = 1) -> str:
    """Header value for ``blocks`` (texts or ids); ``""`` for a request without blocks."""
    return "-".join(f"{b:016x}" for b in lead_ids((block_id(b) for b in blocks), lead))


def key_hash(ids: Iterable[int], lead: int = 1) -> int:
    """``lead_ids`` folded into one unsigned 64-bit int (0 for an empty set)."""
    picked = lead_ids(ids, lead)
    if not picked:
        return 0
    if len(picked) == 1:
        return picked[0]  # already a uniform 64-bit hash
    data = b"".join(b.to_bytes(8, "little") for b in picked)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")
