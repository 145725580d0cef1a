"""Store keys: everything a block's KV depends on besides its position.

Contract:
- ``KVLayout`` names the model and how its KV is laid out (model name/path, a content
  fingerprint, dtype, layers, KV heads, head dim, engine block size, RoPE identity and
  any extra engine facts such as the tensor-parallel shard or KV-cache dtype);
- ``Scope`` names who may share an entry (tenant key and ``cache_salt``);
- ``block_key(layout, scope, token_ids)`` gives a ``BlockKey``: a namespace digest of
  layout + scope, a digest of the exact token ids, and the ids themselves. Keys under a
  different layout or scope never compare equal, and the store checks the kept ids on
  every hit, so a digest collision can cost a miss but never return another block's KV.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import numpy as np

__all__ = ["KVLayout", "Scope", "BlockKey", "block_key", "token_digest", "model_fingerprint"]

_PERSON_NS = b"cp_engine-bkns"
_PERSON_TOK = b"cp_engine-bktk"


def _digest(parts: Iterable[str], person: bytes) -> str:
    h = hashlib.blake2b(digest_size=16, person=person)
    for p in parts:  # length-prefixed, so ("ab", "c") and ("a", "bc") differ
        data = p.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


@dataclass(frozen=True)
class KVLayout:
    """The model and KV layout an entry was computed under (all fields must match)."""

    model: str
    fingerprint: str
    dtype: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    rope: str
    extra: tuple[tuple[str, str], ...] = ()

    def __post_init__(self):
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if not self.model or not self.fingerprint or not self.dtype or not self.rope:
            raise ValueError("KVLayout needs a model, a fingerprint, a dtype and a RoPE identity")

    @classmethod
    def make(cls, extra: Mapping[str, object] | None = None, **fields) -> "KVLayout":
        """Build with ``extra`` given as a mapping (sorted, stringified)."""
        pairs = tuple(sorted((str(k), str(v)) for k, v in (extra or {}).items()))
        return cls(extra=pairs, **fields)

    def parts(self) -> list[str]:
        out = [self.model, self.fingerprint, self.dtype, str(self.num_layers), str(self.num_kv_heads),
               str(self.head_dim), str(self.block_size), self.rope]
        for k, v in self.extra:
            out += [k, v]
        return out


@dataclass(frozen=True)
class Scope:
    """Who may share entries: ``tenant`` (e.g. ``hooks.tenant.tenant_key``) and ``cache_salt``."""

    tenant: str = ""
    cache_salt: str = ""


@dataclass(frozen=True)
class BlockKey:
    """Lookup key of one block; ``token_ids`` (checked on hits) and ``layout`` (the shape
    and dtype an entry must have) ride along without taking part in equality."""

    namespace: str
    tokens: str
    token_ids: tuple[int, ...] = field(compare=False, hash=False, repr=False)
    layout: KVLayout | None = field(default=None, compare=False, hash=False, repr=False)

    @property
    def lookup(self) -> tuple[str, str]:
        return self.namespace, self.tokens

    def __len__(self) -> int:
        return len(self.token_ids)


def token_digest(token_ids: Sequence[int]) -> str:
    """Digest of an exact token-id sequence (order and length matter)."""
    arr = np.asarray(token_ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError("token ids must be a flat sequence of integers")
    h = hashlib.blake2b(digest_size=16, person=_PERSON_TOK)
    h.update(arr.astype("<i8").tobytes())
    return h.hexdigest()


def block_key(layout: KVLayout, scope: Scope, token_ids: Sequence[int]) -> BlockKey:
    """Key of the block ``token_ids`` under ``layout`` and ``scope`` (see module contract)."""
    ids = tuple(int(t) for t in token_ids)
    if not ids:
        raise ValueError("a block needs at least one token")
    namespace = _digest(layout.parts() + ["\x00scope", scope.tenant, scope.cache_salt], _PERSON_NS)
    return BlockKey(namespace, token_digest(ids), ids, layout)


_SAMPLE = 1 << 20


def model_fingerprint(model_dir: str) -> str:
    """Content fingerprint of a HuggingFace model folder.

    Hashes every ``*.json`` file whole and, of each weight file (``*.safetensors``,
    ``*.bin``, ``*.pt``, ``*.gguf``), its name, size and 1 MiB samples at the start,
    middle and end: another checkpoint of the same architecture differs there with
    overwhelming likelihood, without reading gigabytes. Callers that know a revision
    hash may pass that instead."""
    h = hashlib.blake2b(digest_size=16, person=b"cp_engine-model")
    names = sorted(os.listdir(model_dir))
    for name in names:
        path = os.path.join(model_dir, name)
        if not os.path.isfile(path):
            continue
        if name.endswith(".json"):
            h.update(name.encode() + b"\x00")
            with open(path, "rb") as f:
                h.update(f.read())
        elif name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
            size = os.path.getsize(path)
            h.update(f"{name}\x00{size}\x00".encode())
            with open(path, "rb") as f:
                for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
                    f.seek(offset)
                    h.update(f.read(_SAMPLE))
    return h.hexdigest()
