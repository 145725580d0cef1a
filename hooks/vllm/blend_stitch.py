"""Place stored block K/V at new positions in a request's paged cache.

Contract: ``write_moved(paged, rope, slots, moves)`` takes ``moves`` as
``(kv, offset, start, n)``: tokens ``[offset, offset + n)`` of a stored entry ``kv``
(``[layers, 2, tokens, kv_heads, head_dim]``, K normalised to position 0 as the store
keeps it) go to positions ``[start, start + n)`` of the request whose slot ids are
``slots``, K rotated by ``start - offset``. Blocks are copied to the cache's device
(``paged.device``, wherever ``slots`` live) and rotated one by one, then written with
one ``paged.write`` per layer for all of them: on a GPU each write is a kernel launch,
and a request stitches tens of blocks.
"""
from __future__ import annotations

from typing import Sequence

import torch

from cp_engine.blend.rope import RopeSpec, shift_k

__all__ = ["write_moved"]


def write_moved(paged, rope: RopeSpec, slots: torch.LongTensor,
                moves: Sequence[tuple[torch.Tensor, int, int, int]]) -> None:
    """See the module docstring. Raises ``ValueError`` for a move outside ``slots``."""
    if not moves:
        return
    device = paged.device  # rotate on the cache's device: the slots may be host tensors
    ks, vs, dests = [], [], []
    for kv, offset, start, n in moves:
        if start < 0 or start + n > slots.numel() or offset < 0 or offset + n > kv.shape[2]:
            raise ValueError(f"move of {n} tokens from {offset} to {start} outside the entry or the slots")
        # From pinned host memory the copies queue behind each other without a host wait.
        part = kv[:, :, offset:offset + n].to(device, non_blocking=True)
        ks.append(shift_k(part[:, 0], start - offset, rope))
        vs.append(part[:, 1])
        dests.append(slots[start:start + n])
    k, v, dest = torch.cat(ks, dim=1), torch.cat(vs, dim=1), torch.cat(dests)
    for i, name in enumerate(paged.layer_names):
        paged.write(name, dest, k[i], v[i])
