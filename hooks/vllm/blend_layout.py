"""Read and write the engine's paged K/V by token slot, whatever the backend's layout.

Contract:
- ``PagedKV(kv_caches, attention_layers, block_size)`` wraps one paged KV tensor per
  attention layer. It **writes** only through the backend's own cache-update op (CPU:
  ``cpu_attn_reshape_and_cache`` with the layer's ISA, scales and cache dtype), so the
  layout is the backend's business. It **reads** through a permutation learned by a
  probe: an index pattern written by that same op into a scratch block tells where each
  (token, head, dim) element of K and V lands. The probe runs once per (backend, ISA,
  block size, KV heads, head dim, dtype) and must prove itself: every element written
  exactly once, nothing written outside the block, and a random write read back
  bit-exact. Otherwise ``UnsupportedLayout``.
- Slot of token ``t`` of a request with block ids ``B``: ``B[t // block_size] *
  block_size + t % block_size``.
- ``UnsupportedLayout.reason`` is a short metric label (``layout_*``).

Supported: vLLM's CPU attention backend (cache ``[num_blocks, kv_heads, block_size,
2 * head_dim]``, any ISA whose op keeps each (block, head) inside its block), float32,
bfloat16 and float16. Refused: quantised KV caches (fp8: the op scales and rounds, so a
read is no longer the inverse of a write), non-CPU backends. A GPU backend would need
the same probe run through its ``impl.do_kv_cache_update`` on a scratch cache shaped by
``get_kv_cache_shape`` (flash-attention keeps K and V in separate halves of a leading
axis, so a block is not one contiguous slab and the gather must index that axis too),
on the cache's device.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["UnsupportedLayout", "PagedKV", "CpuCacheOp", "probe_layout"]

# Learned permutations by (backend, isa, block size, kv heads, head dim, dtype).
_PROBES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
# The same permutations flattened in (head, token, dim) order, for ``read_blocks``.
_HEAD_MAJOR: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


class UnsupportedLayout(RuntimeError):
    """The paged KV cannot be read and written exactly; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class CpuCacheOp:
    """The CPU backend's cache write with a fixed ISA, cache dtype and scales."""

    def __init__(self, isa: str, cache_dtype: str = "auto", k_scale: float = 1.0, v_scale: float = 1.0):
        from vllm import _custom_ops as ops

        self._ops = ops
        self.isa, self.cache_dtype, self.k_scale, self.v_scale = isa, cache_dtype, k_scale, v_scale

    @classmethod
    def for_layer(cls, layer: torch.nn.Module, dtype: torch.dtype, block_size: int, head_dim: int) -> "CpuCacheOp":
        cache_dtype = str(getattr(layer.impl, "kv_cache_dtype", "auto"))
        isa = getattr(layer, "isa", None)
        if isa is None:  # the metadata builder sets layer.isa; before it runs, ask the backend's own choice
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            isa = _get_attn_isa(dtype, block_size, head_dim, cache_dtype)
        return cls(isa, cache_dtype, float(getattr(layer, "_k_scale_float", 1.0)),
                   float(getattr(layer, "_v_scale_float", 1.0)))

    def write(self, cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        num_blocks, heads, block_size, _ = cache.shape
        key_cache, value_cache = cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)
        self._ops.cpu_attn_reshape_and_cache(k.contiguous(), v.contiguous(), key_cache, value_cache,
                                             slots.to(torch.int64), self.isa, k_scale=self.k_scale,
                                             v_scale=self.v_scale, kv_cache_dtype=self.cache_dtype)


def _exact_int_limit(dtype: torch.dtype) -> int:
    """Integers 0..limit-1 are exact in ``dtype`` (2**(mantissa bits + 1))."""
    return int(round(2.0 / torch.finfo(dtype).eps))


def probe_layout(op: CpuCacheOp, heads: int, block_size: int, head_dim: int, dtype: torch.dtype):
    """Flat offsets, inside one block, of K and V element ``[t, h, d]``: two LongTensors
    ``[block_size, heads, head_dim]``. Learned through ``op`` on a 3-block scratch cache
    (block 1 is probed; blocks 0 and 2 must stay untouched). ``UnsupportedLayout`` when the
    op does not write a permutation of the block or a write does not read back bit-exact.

    Element ``i`` of the pattern is written as its digits in a base every digit of which
    ``dtype`` holds exactly (256 for bfloat16, so two or three passes), one pass per digit.
    """
    per_block = heads * block_size * 2 * head_dim
    half = per_block // 2
    base = min(_exact_int_limit(dtype), 1 << 20)
    slots = torch.arange(block_size, 2 * block_size)
    index = torch.arange(per_block, dtype=torch.int64)
    found = torch.zeros(per_block, dtype=torch.int64)   # flat offset -> pattern index
    scale = 1
    while scale < per_block:  # until every index's highest digit is written
        cache = torch.full((3, heads, block_size, 2 * head_dim), -1.0, dtype=dtype)
        digit = (index // scale) % base
        pattern = digit.to(dtype).view(2, block_size, heads, head_dim)
        op.write(cache, slots, pattern[0], pattern[1])
        flat = cache.reshape(3, per_block)
        if not (flat[0] == -1).all() or not (flat[2] == -1).all():
            raise UnsupportedLayout("layout_probe_spill", f"isa {op.isa}: the op wrote outside the probed block")
        got = flat[1]
        if (got < 0).any() or (got != got.round()).any():
            raise UnsupportedLayout("layout_probe_not_permutation",
                                    f"isa {op.isa}: part of the block was not written or was transformed")
        found += got.to(torch.int64) * scale
        scale *= base
    if not torch.equal(torch.sort(found).values, index):
        raise UnsupportedLayout("layout_probe_not_permutation", f"isa {op.isa}: elements collide or are missing")
    where = torch.empty(per_block, dtype=torch.int64)
    where[found] = torch.arange(per_block)
    k_at = where[:half].view(block_size, heads, head_dim)
    v_at = where[half:].view(block_size, heads, head_dim)
    _check_round_trip(op, heads, block_size, head_dim, dtype, k_at, v_at)
    return k_at, v_at


def _check_round_trip(op, heads, block_size, head_dim, dtype, k_at, v_at) -> None:
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(block_size, heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(block_size, heads, head_dim, generator=gen).to(dtype)
    cache = torch.zeros(3, heads, block_size, 2 * head_dim, dtype=dtype)
    op.write(cache, torch.arange(block_size, 2 * block_size), k, v)
    flat = cache.reshape(3, -1)[1]
    if not (torch.equal(flat[k_at], k) and torch.equal(flat[v_at], v)):
        raise UnsupportedLayout("layout_round_trip", f"isa {op.isa}, {dtype}: a write does not read back bit-exact")


class PagedKV:
    """The engine's paged K/V, read and written by token slot, whatever the backend layout."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], attention_layers: Mapping[str, torch.nn.Module],
                 block_size: int):
        if not kv_caches:
            raise UnsupportedLayout("layout_no_layers", "no KV cache tensors were registered")
        missing = [name for name in kv_caches if name not in attention_layers]
        if missing:
            raise UnsupportedLayout("layout_unknown_layer", f"no attention module for {missing[:3]}")
        self.layer_names = tuple(name for name in attention_layers if name in kv_caches)
        self.block_size = int(block_size)
        self._caches = {name: kv_caches[name] for name in self.layer_names}
        self._ops: dict[str, CpuCacheOp] = {}
        self._at: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._head_major: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        first = attention_layers[self.layer_names[0]]
        self.num_kv_heads = int(first.num_kv_heads)
        self.head_dim = int(first.head_size)
        self.dtype = kv_caches[self.layer_names[0]].dtype
        for name in self.layer_names:
            self._learn(name, attention_layers[name], kv_caches[name])

    def _learn(self, name: str, layer: torch.nn.Module, cache: torch.Tensor) -> None:
        backend = type(getattr(layer, "impl", None)).__name__
        if backend != "CPUAttentionBackendImpl" or cache.device.type != "cpu":
            raise UnsupportedLayout("layout_unknown_backend",
                                    f"{name}: backend {backend} on {cache.device.type} (only the CPU backend is probed)")
        shape = (self.num_kv_heads, self.block_size, 2 * self.head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != shape or not cache.is_contiguous():
            raise UnsupportedLayout("layout_shape", f"{name}: cache {tuple(cache.shape)}, expected [*, {shape}]")
        if (int(layer.num_kv_heads), int(layer.head_size)) != (self.num_kv_heads, self.head_dim) \
                or cache.dtype != self.dtype:
            raise UnsupportedLayout("layout_mixed", f"{name}: layers differ in heads, head dim or dtype")
        op = CpuCacheOp.for_layer(layer, self.dtype, self.block_size, self.head_dim)
        if op.cache_dtype != "auto" or not self.dtype.is_floating_point or self.dtype.itemsize == 1:
            raise UnsupportedLayout("layout_quantized_kv", f"{name}: KV cache dtype {op.cache_dtype} ({self.dtype})")
        key = (backend, op.isa, self.block_size, self.num_kv_heads, self.head_dim, self.dtype)
        if key not in _PROBES:
            _PROBES[key] = probe_layout(op, self.num_kv_heads, self.block_size, self.head_dim, self.dtype)
        self._ops[name] = op
        self._at[name] = _PROBES[key]
        if key not in _HEAD_MAJOR:  # offsets of element [h, t, d]: one gather reads whole blocks head-major
            k_at, v_at = _PROBES[key]
            _HEAD_MAJOR[key] = (k_at.permute(1, 0, 2).reshape(-1).contiguous(),
                                v_at.permute(1, 0, 2).reshape(-1).contiguous())
        self._head_major[name] = _HEAD_MAJOR[key]

    @property
    def num_blocks(self) -> int:
        return int(self._caches[self.layer_names[0]].shape[0])

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.LongTensor:
        """Slot ids of token positions ``[start, end)`` of a request with these block ids."""
        if not 0 <= start <= end or end > len(block_ids) * self.block_size:
            raise ValueError(f"positions [{start}, {end}) do not fit {len(block_ids)} blocks of {self.block_size}")
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _check_slots(self, slots: torch.Tensor) -> torch.Tensor:
        slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_blocks * self.block_size):
            raise ValueError(f"slot ids outside the cache's {self.num_blocks} blocks of {self.block_size}")
        return slots

    def read(self, layer: str, slots: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V each ``[n, num_kv_heads, head_dim]``: copies, in the cache dtype."""
        slots = self._check_slots(slots)
        cache = self._caches[layer]
        flat = cache.view(cache.shape[0], -1)
        blocks = (slots // self.block_size)[:, None, None]
        offsets = slots % self.block_size
        k_at, v_at = self._at[layer]
        return flat[blocks, k_at[offsets]], flat[blocks, v_at[offsets]]

    def read_blocks(self, layer: str, block_ids: torch.LongTensor, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V of token positions ``[0, end)`` of a request with these block ids, each
        ``[num_kv_heads, end, head_dim]`` (head-major, as attention wants them): copies, in
        the cache dtype. Whole blocks are gathered at once, so this is much cheaper than
        ``read`` of the same slots."""
        blocks = torch.as_tensor(block_ids, dtype=torch.int64).reshape(-1)
        if not 0 <= end <= blocks.numel() * self.block_size:
            raise ValueError(f"{end} positions do not fit {blocks.numel()} blocks of {self.block_size}")
        blocks = blocks[: -(-end // self.block_size)]
        if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= self.num_blocks):
            raise ValueError(f"block ids outside the cache's {self.num_blocks} blocks")
        cache = self._caches[layer]
        rows = cache.view(cache.shape[0], -1).index_select(0, blocks)
        k_order, v_order = self._head_major[layer]
        shape = (blocks.numel(), self.num_kv_heads, self.block_size, self.head_dim)

        def gather(order: torch.Tensor) -> torch.Tensor:
            part = rows.index_select(1, order).view(shape).transpose(0, 1)
            return part.reshape(self.num_kv_heads, -1, self.head_dim)[:, :end]

        return gather(k_order), gather(v_order)

    def write(self, layer: str, slots: torch.LongTensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[n, num_kv_heads, head_dim]`` (cast to the cache dtype) into ``slots``."""
        slots = self._check_slots(slots)
        want = (slots.numel(), self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)}, expected {want}")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("duplicate slot ids in one write")
        self._ops[layer].write(self._caches[layer], slots, k.to(self.dtype), v.to(self.dtype))
