"""Block identity: a stable 64-bit id for every context block.

Contract:
- text (``str``) and ``bytes`` blocks hash their content with BLAKE2b-64, so equal
  text gives an equal id in every process and after restarts (no PYTHONHASHSEED);
- a non-negative ``int`` below 2**64 is already an id and is used as is;
- any other hashable is hashed from ``repr`` with a type tag; such opaque ids are
  stable only as long as their ``repr`` is.
"""
from __future__ import annotations

import hashlib
import numbers
from typing import Hashable, Iterable, Sequence

BlockId = int
_MASK64 = (1 << 64) - 1
# Rough characters-per-token of BPE tokenizers on English prose; used only when the
# caller cannot give real token counts (they weigh prefixes, they never truncate).
_CHARS_PER_TOKEN = 4


def block_id(block: Hashable) -> BlockId:
    """Stable unsigned 64-bit id of one block (see module contract)."""
    if isinstance(block, str):
        data = block.encode("utf-8", "surrogatepass")
    elif isinstance(block, (bytes, bytearray, memoryview)):
        data = bytes(block)
    elif isinstance(block, bool):
        data = b"\x01bool:" + repr(block).encode()
    elif isinstance(block, int):
        if 0 <= block <= _MASK64:
            return block
        data = b"\x01int:" + repr(block).encode()
    else:
        data = b"\x01" + type(block).__qualname__.encode() + b":" + repr(block).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_ids(blocks: Iterable[Hashable]) -> list[BlockId]:
    return [block_id(b) for b in blocks]


def short_label(bid: BlockId, width: int = 8) -> str:
    """Short hexadecimal label of a block id, stable across requests."""
    return format(bid & _MASK64, "016x")[:width]


def estimate_tokens(block: Hashable) -> int:
    """Token-length estimate of a block (>= 1); exact counts should be preferred."""
    if isinstance(block, str):
        return max(1, (len(block) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN)
    if isinstance(block, (bytes, bytearray)):
        return max(1, (len(block) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN)
    return 1


def token_lengths(blocks: Sequence[Hashable], given: Sequence[int] | None = None) -> list[int]:
    """Token lengths for ``blocks``: ``given`` when supplied (validated), else estimates."""
    if given is None:
        return [estimate_tokens(b) for b in blocks]
    if len(given) != len(blocks):
        raise ValueError(f"token_lengths has {len(given)} entries for {len(blocks)} blocks")
    out = []
    for n in given:
        # Integral: ints and NumPy integers; a float, bool or string is a caller's bug.
        if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 0:
            raise ValueError(f"token lengths must be non-negative ints, got {n!r}")
        out.append(int(n))
    return out
