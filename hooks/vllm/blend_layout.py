"""Read and write the engine's paged K/V by token slot, whatever the backend's layout.

Contract:
- ``PagedKV(kv_caches, attention_layers, block_size, num_blocks=None)`` wraps one paged KV
  tensor per attention layer. It **writes** only through the backend's own cache-update
  op, so the layout is the backend's business: the CPU backend's
  ``cpu_attn_reshape_and_cache`` with the layer's ISA, scales and cache dtype
  (``CpuCacheOp``), or, for any other backend, the layer's ``impl.do_kv_cache_update``
  (``BackendCacheOp``: vLLM's GPU backends whose forward leaves the cache write to that
  method). It **reads** through coordinates learned by a probe: an index pattern written
  by that same op into a 3-block scratch cache shaped and strided like the real one tells
  where each (token, head, dim) element of K and V lands. The probe runs once per (op and
  its plain settings, block size, KV heads, head dim, dtype, device, cache shape and
  stride order) and must prove itself: every element of the probed block written exactly
  once, nothing written outside it, and a random write read back bit-exact. Otherwise
  ``UnsupportedLayout``.
- The block axis is the cache axis of length ``num_blocks`` (axis 0 when ``num_blocks`` is
  None, as in the CPU backend's ``[num_blocks, kv_heads, block_size, 2 * head_dim]``);
  exactly one axis may have that length, and the cache must hold exactly K and V of
  ``block_size`` tokens per block (no padding).
- Slot of token ``t`` of a request with block ids ``B``: ``B[t // block_size] *
  block_size + t % block_size``. Slot and block tensors may live on any device; reads
  return tensors on the cache's device.
- ``UnsupportedLayout.reason`` is a short metric label (``layout_*``).

Supported: any layout the op writes as a permutation of whole blocks, in float32,
bfloat16 and float16. Checked with vLLM's CPU backend (through both ops) and with
plain-torch writes in flash-attention's older ``[2, num_blocks, block_size, kv_heads,
head_dim]`` layout; not yet with a GPU backend's own op.
Refused: quantised KV caches (fp8: the op scales and rounds, so a read is no longer the
inverse of a write), backends without a separate cache-update op (``layout_no_cache_op``),
the CPU backend off the CPU, caches on the ``meta`` device.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

__all__ = ["UnsupportedLayout", "PagedKV", "CpuCacheOp", "BackendCacheOp", "probe_layout", "block_offsets"]

# Learned coordinates by (op, its settings, block size, kv heads, head dim, dtype, device, layout).
_PROBES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


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
        self.label = f"cpu/{isa}"

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


class BackendCacheOp:
    """A backend's own cache write: ``layer.impl.do_kv_cache_update(layer, k, v, cache, slots)``.

    Only for backends whose forward does not write the cache itself
    (``forward_includes_kv_cache_update`` false on the layer's backend class): there the
    method is the whole write and does not depend on the step's attention metadata.
    """

    def __init__(self, layer: torch.nn.Module):
        impl = getattr(layer, "impl", None)
        backend = getattr(layer, "attn_backend", None)
        if not callable(getattr(impl, "do_kv_cache_update", None)) \
                or getattr(backend, "forward_includes_kv_cache_update", True):
            raise UnsupportedLayout("layout_no_cache_op",
                                    f"{type(impl).__name__}: no cache write separate from the forward")
        self.layer, self.impl = layer, impl
        self.cache_dtype = str(getattr(impl, "kv_cache_dtype", "auto"))
        self.label = type(impl).__name__
        # The impl's plain settings (cache dtype, layout switches, ...) are part of what a
        # probe learned, so layers share a probe only when they agree on all of them.
        self.settings = tuple(sorted((k, v) for k, v in vars(impl).items()
                                     if isinstance(v, (bool, int, float, str, type(None)))))

    def write(self, cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.impl.do_kv_cache_update(self.layer, k.contiguous(), v.contiguous(), cache,
                                     slots.to(device=cache.device, dtype=torch.int64))


def _exact_int_limit(dtype: torch.dtype) -> int:
    """Integers 0..limit-1 are exact in ``dtype`` (2**(mantissa bits + 1))."""
    return int(round(2.0 / torch.finfo(dtype).eps))


def _stride_order(t: torch.Tensor) -> tuple[int, ...]:
    """``t``'s axes from the innermost (smallest stride) out; ties: the later axis first."""
    return tuple(sorted(range(t.dim()), key=lambda d: (t.stride(d), -d)))


def _scratch_like(cache: torch.Tensor, axis: int, blocks: int) -> torch.Tensor:
    """A dense tensor shaped like ``cache`` with ``blocks`` on ``axis``, its axes in the same
    stride order (an op that follows strides writes it as it writes the cache)."""
    shape = list(cache.shape)
    shape[axis] = blocks
    strides, step = [0] * cache.dim(), 1
    for d in _stride_order(cache):
        strides[d] = step
        step *= shape[d]
    return torch.empty_strided(shape, strides, dtype=cache.dtype, device=cache.device)


def _storage(t: torch.Tensor) -> torch.Tensor:
    """A 1-D view of every storage element ``t`` can address, from its first element."""
    span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) if t.numel() else 0
    return t.as_strided((span,), (1,))


def block_offsets(coords: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
    """Storage offsets in ``cache`` (from its first element) of the elements whose
    coordinates are ``coords`` ``[ndim, ...]`` (block coordinate 0)."""
    strides = torch.tensor(cache.stride(), dtype=torch.int64, device=coords.device)
    return (coords * strides.view(-1, *([1] * (coords.dim() - 1)))).sum(0)


def probe_layout(op, like: torch.Tensor, axis: int, heads: int, block_size: int, head_dim: int):
    """Coordinates in a cache like ``like`` of K and V element ``[t, h, d]`` of block 0:
    two LongTensors ``[ndim, block_size, heads, head_dim]`` (their ``axis`` row is 0).
    Learned through ``op`` on a 3-block scratch shaped and strided like ``like``, on its
    device (block 1 is probed; blocks 0 and 2 must stay untouched). ``UnsupportedLayout``
    when the op does not write a permutation of the block or a write does not read back
    bit-exact.

    Element ``i`` of the pattern is written as its digits in a base every digit of which the
    dtype holds exactly (256 for bfloat16, so two or three passes), one pass per digit.
    """
    dtype, device = like.dtype, like.device
    per_half = block_size * heads * head_dim
    per_block = 2 * per_half
    scratch = _scratch_like(like, axis, 3)
    if scratch.numel() != 3 * per_block:
        raise UnsupportedLayout("layout_shape", f"{op.label}: a block holds {scratch.numel() // 3} elements, "
                                                f"K and V of {block_size} tokens are {per_block}")
    flat = _storage(scratch)
    offsets = torch.arange(flat.numel(), device=device)
    in_probe = (offsets // scratch.stride(axis)) % 3 == 1
    inside = offsets[in_probe]                          # storage offsets of block 1, ascending
    base = min(_exact_int_limit(dtype), 1 << 20)
    slots = torch.arange(block_size, 2 * block_size, device=device)
    index = torch.arange(per_block, dtype=torch.int64, device=device)
    found = torch.zeros(per_block, dtype=torch.int64, device=device)   # position in block -> pattern index
    scale = 1
    while scale < per_block:  # until every index's highest digit is written
        scratch.fill_(-1)
        pattern = ((index // scale) % base).to(dtype).view(2, block_size, heads, head_dim)
        op.write(scratch, slots, pattern[0], pattern[1])
        if not (flat[~in_probe] == -1).all():
            raise UnsupportedLayout("layout_probe_spill", f"{op.label}: the op wrote outside the probed block")
        got = flat[inside]
        if (got < 0).any() or (got != got.round()).any():
            raise UnsupportedLayout("layout_probe_not_permutation",
                                    f"{op.label}: part of the block was not written or was transformed")
        found += got.to(torch.int64) * scale
        scale *= base
    if not torch.equal(torch.sort(found).values, index):
        raise UnsupportedLayout("layout_probe_not_permutation", f"{op.label}: elements collide or are missing")
    where = torch.empty(per_block, dtype=torch.int64, device=device)
    where[found] = inside                               # pattern index -> storage offset
    coords = torch.stack([(where // scratch.stride(d)) % scratch.shape[d] for d in range(scratch.dim())])
    coords[axis] = 0
    shape = (scratch.dim(), block_size, heads, head_dim)
    k_at, v_at = coords[:, :per_half].reshape(shape), coords[:, per_half:].reshape(shape)
    _check_round_trip(op, scratch, axis, k_at, v_at)
    return k_at, v_at


def _check_round_trip(op, scratch: torch.Tensor, axis: int, k_at: torch.Tensor, v_at: torch.Tensor) -> None:
    _, block_size, heads, head_dim = k_at.shape
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(block_size, heads, head_dim, generator=gen).to(device=scratch.device, dtype=scratch.dtype)
    v = torch.randn(block_size, heads, head_dim, generator=gen).to(device=scratch.device, dtype=scratch.dtype)
    scratch.zero_()
    op.write(scratch, torch.arange(block_size, 2 * block_size, device=scratch.device), k, v)
    flat, shift = _storage(scratch), scratch.stride(axis)
    if not (torch.equal(flat[block_offsets(k_at, scratch) + shift], k)
            and torch.equal(flat[block_offsets(v_at, scratch) + shift], v)):
        raise UnsupportedLayout("layout_round_trip", f"{op.label}, {scratch.dtype}: a write does not read back bit-exact")


class _LayerView:
    """One layer's cache with its write op and the storage offsets of block 0's elements."""

    def __init__(self, cache: torch.Tensor, op, axis: int, k_at: torch.Tensor, v_at: torch.Tensor):
        self.cache, self.op, self.flat = cache, op, _storage(cache)
        self.block_stride = int(cache.stride(axis))
        k_off, v_off = block_offsets(k_at, cache), block_offsets(v_at, cache)   # [block_size, heads, head_dim]
        self.k_off, self.v_off = k_off, v_off
        # Offsets of element [h, t, d]: whole blocks gathered head-major, as attention reads them.
        self.k_head_major = k_off.permute(1, 0, 2).reshape(-1).contiguous()
        self.v_head_major = v_off.permute(1, 0, 2).reshape(-1).contiguous()
        per_block = 2 * k_off.numel()
        # Blocks that are contiguous slabs along a leading axis are gathered row by row.
        self.rows = cache.view(cache.shape[0], -1) if (
            axis == 0 and cache.is_contiguous() and self.block_stride == per_block) else None


class PagedKV:
    """The engine's paged K/V, read and written by token slot, whatever the backend layout."""

    def __init__(self, kv_caches: Mapping[str, torch.Tensor], attention_layers: Mapping[str, torch.nn.Module],
                 block_size: int, num_blocks: int | None = None):
        if not kv_caches:
            raise UnsupportedLayout("layout_no_layers", "no KV cache tensors were registered")
        missing = [name for name in kv_caches if name not in attention_layers]
        if missing:
            raise UnsupportedLayout("layout_unknown_layer", f"no attention module for {missing[:3]}")
        self.layer_names = tuple(name for name in attention_layers if name in kv_caches)
        self.block_size = int(block_size)
        first = attention_layers[self.layer_names[0]]
        self.num_kv_heads = int(first.num_kv_heads)
        self.head_dim = int(first.head_size)
        self.dtype = kv_caches[self.layer_names[0]].dtype
        self._axis: int | None = None
        self._views: dict[str, _LayerView] = {}
        for name in self.layer_names:
            self._views[name] = self._learn(name, attention_layers[name], kv_caches[name], num_blocks)

    def _block_axis(self, name: str, cache: torch.Tensor, num_blocks: int | None) -> int:
        if num_blocks is None:
            return 0
        axes = [d for d, size in enumerate(cache.shape) if size == int(num_blocks)]
        if len(axes) != 1:
            raise UnsupportedLayout("layout_shape", f"{name}: cache {tuple(cache.shape)} has {len(axes)} axes "
                                                    f"of the block count {num_blocks}")
        return axes[0]

    def _op_for(self, name: str, layer: torch.nn.Module, cache: torch.Tensor):
        backend = type(getattr(layer, "impl", None)).__name__
        if cache.device.type == "meta":
            raise UnsupportedLayout("layout_unknown_backend", f"{name}: cache on the meta device")
        if backend != "CPUAttentionBackendImpl":
            return BackendCacheOp(layer)
        if cache.device.type != "cpu":
            raise UnsupportedLayout("layout_unknown_backend", f"{name}: CPU backend with a {cache.device.type} cache")
        shape = (self.num_kv_heads, self.block_size, 2 * self.head_dim)
        if cache.dim() != 4 or tuple(cache.shape[1:]) != shape or not cache.is_contiguous():
            raise UnsupportedLayout("layout_shape", f"{name}: cache {tuple(cache.shape)}, expected [*, {shape}]")
        return CpuCacheOp.for_layer(layer, self.dtype, self.block_size, self.head_dim)

    def _learn(self, name: str, layer: torch.nn.Module, cache: torch.Tensor, num_blocks: int | None) -> _LayerView:
        if (int(layer.num_kv_heads), int(layer.head_size)) != (self.num_kv_heads, self.head_dim) \
                or cache.dtype != self.dtype:
            raise UnsupportedLayout("layout_mixed", f"{name}: layers differ in heads, head dim or dtype")
        op = self._op_for(name, layer, cache)
        if op.cache_dtype != "auto" or not self.dtype.is_floating_point or self.dtype.itemsize == 1:
            raise UnsupportedLayout("layout_quantized_kv", f"{name}: KV cache dtype {op.cache_dtype} ({self.dtype})")
        axis = self._block_axis(name, cache, num_blocks)
        if self._axis is None:
            self._axis = axis
        elif axis != self._axis or cache.shape[axis] != self.num_blocks:
            raise UnsupportedLayout("layout_mixed", f"{name}: layers differ in block axis or block count")
        if cache.numel() != cache.shape[axis] * 2 * self.block_size * self.num_kv_heads * self.head_dim:
            raise UnsupportedLayout("layout_shape", f"{name}: cache {tuple(cache.shape)} is not whole K/V blocks")
        order = _stride_order(cache)
        layout = tuple(s for d, s in enumerate(cache.shape) if d != axis)
        key = (op.label, getattr(op, "settings", ()), self.block_size, self.num_kv_heads, self.head_dim, self.dtype, str(cache.device),
               axis, layout, order)
        if key not in _PROBES:
            _PROBES[key] = probe_layout(op, cache, axis, self.num_kv_heads, self.block_size, self.head_dim)
        return _LayerView(cache, op, axis, *_PROBES[key])

    @property
    def num_blocks(self) -> int:
        view = self._views[self.layer_names[0]]
        return int(view.cache.shape[self._axis])

    @property
    def device(self) -> torch.device:
        """Where the caches live (reads return tensors there)."""
        return self._views[self.layer_names[0]].cache.device

    def slots(self, block_ids: Sequence[int], start: int, end: int) -> torch.LongTensor:
        """Slot ids of token positions ``[start, end)`` of a request with these block ids."""
        if not 0 <= start <= end or end > len(block_ids) * self.block_size:
            raise ValueError(f"positions [{start}, {end}) do not fit {len(block_ids)} blocks of {self.block_size}")
        pos = torch.arange(start, end, dtype=torch.int64)
        blocks = torch.as_tensor(list(block_ids), dtype=torch.int64)
        return blocks[pos // self.block_size] * self.block_size + pos % self.block_size

    def _check_slots(self, slots: torch.Tensor, device: torch.device) -> torch.Tensor:
        slots = torch.as_tensor(slots, dtype=torch.int64).reshape(-1)
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= self.num_blocks * self.block_size):
            raise ValueError(f"slot ids outside the cache's {self.num_blocks} blocks of {self.block_size}")
        return slots.to(device)

    def read(self, layer: str, slots: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V each ``[n, num_kv_heads, head_dim]``: copies, in the cache dtype."""
        view = self._views[layer]
        slots = self._check_slots(slots, view.cache.device)
        start = ((slots // self.block_size) * view.block_stride)[:, None, None]
        within = slots % self.block_size
        return view.flat[start + view.k_off[within]], view.flat[start + view.v_off[within]]

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
        view = self._views[layer]
        blocks = blocks.to(view.cache.device)
        shape = (blocks.numel(), self.num_kv_heads, self.block_size, self.head_dim)

        def gather(order: torch.Tensor) -> torch.Tensor:
            if view.rows is not None:
                part = view.rows.index_select(0, blocks).index_select(1, order)
            else:
                part = view.flat[(blocks * view.block_stride)[:, None] + order[None, :]]
            return part.view(shape).transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, :end]

        return gather(view.k_head_major), gather(view.v_head_major)

    def write(self, layer: str, slots: torch.LongTensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write ``k``, ``v`` ``[n, num_kv_heads, head_dim]`` (cast to the cache dtype) into ``slots``."""
        view = self._views[layer]
        slots = self._check_slots(slots, view.cache.device)
        want = (slots.numel(), self.num_kv_heads, self.head_dim)
        if tuple(k.shape) != want or tuple(v.shape) != want:
            raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)}, expected {want}")
        if torch.unique(slots).numel() != slots.numel():
            raise ValueError("duplicate slot ids in one write")
        view.op.write(view.cache, slots, k.to(device=view.cache.device, dtype=self.dtype),
                      v.to(device=view.cache.device, dtype=self.dtype))
