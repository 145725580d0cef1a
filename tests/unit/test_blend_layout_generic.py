"""``PagedKV`` over a backend's own ``do_kv_cache_update`` (the path vLLM's GPU backends
take), on plain-torch cache writes in flash-attention's ``[2, blocks, block_size, heads,
head_dim]`` layout: hand-written ops for pure unit tests. The CPU backend's real ops are
probed in tests/engine/test_blend_layout.py."""
import pytest

torch = pytest.importorskip("torch")

from benchmarks.blend.torch_decoder import FlashAttentionLayer, FlashBackend  # noqa: E402
from cp_engine.hooks.vllm.blend_layout import PagedKV, UnsupportedLayout  # noqa: E402

BLOCKS, BS, HEADS, DIM = 12, 8, 2, 4


class IndexedWrite:
    """Flash layout written by indexing, so it follows any strides the cache has."""

    kv_cache_dtype = "auto"

    def __init__(self, spill: bool = False, drop_last_head: bool = False, scale: float = 1.0):
        self.spill, self.drop_last_head, self.scale = spill, drop_last_head, scale

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
        blocks, within = slot_mapping // BS, slot_mapping % BS
        heads = HEADS - 1 if self.drop_last_head else HEADS
        kv_cache[0, blocks, within, :heads] = key[:, :heads] * self.scale
        kv_cache[1, blocks, within, :heads] = value[:, :heads]
        if self.spill:  # a neighbour block too: the probe must notice
            kv_cache[0, (blocks + 1) % kv_cache.shape[1], within] = key


def layer(impl=None, backend=FlashBackend):
    mod = FlashAttentionLayer(HEADS, DIM)
    if impl is not None:
        mod.impl = impl
    mod.attn_backend = backend
    return mod


def flash_caches(names, dtype=torch.float32, transposed=False):
    if transposed:  # blocks outermost in memory, viewed as [2, blocks, ...]: not contiguous
        return {n: torch.zeros(BLOCKS, 2, BS, HEADS, DIM, dtype=dtype).transpose(0, 1) for n in names}
    return {n: torch.zeros(2, BLOCKS, BS, HEADS, DIM, dtype=dtype) for n in names}


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flash_layout_reads_what_the_op_wrote(transposed, dtype):
    names = ["l0", "l1"]
    caches = flash_caches(names, dtype, transposed)
    kv = PagedKV(caches, {n: layer(IndexedWrite()) for n in names}, BS, BLOCKS)
    assert kv.num_blocks == BLOCKS and kv.dtype == dtype
    gen = torch.Generator().manual_seed(3)
    blocks = [9, 2, 5]
    slots = kv.slots(blocks, 3, 20)
    k = torch.randn(len(slots), HEADS, DIM, generator=gen)
    v = torch.randn(len(slots), HEADS, DIM, generator=gen)
    kv.write("l1", slots, k, v)
    rk, rv = kv.read("l1", slots)
    assert torch.equal(rk, k.to(dtype)) and torch.equal(rv, v.to(dtype))
    cache = caches["l1"]  # the bytes sit where the flash layout says
    assert torch.equal(cache[0, 9, 3], k[0].to(dtype)) and torch.equal(cache[1, 5, 3], v[-1].to(dtype))
    assert not caches["l0"].any() and not cache[:, 9, :3].any()  # nothing else written
    bk, bv = kv.read_blocks("l1", torch.tensor(blocks), 20)
    assert torch.equal(bk[:, 3:], rk.transpose(0, 1)) and torch.equal(bv[:, 3:], rv.transpose(0, 1))
    assert not bk[:, :3].any()


@pytest.mark.parametrize("impl, reason", [
    (IndexedWrite(spill=True), "layout_probe_spill"),
    (IndexedWrite(drop_last_head=True), "layout_probe_not_permutation"),
    (IndexedWrite(scale=2.0), "layout_probe_not_permutation"),
    (object(), "layout_no_cache_op"),
])
def test_ops_that_do_not_write_a_permutation_are_refused(impl, reason):
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV(flash_caches(["l0"]), {"l0": layer(impl)}, BS, BLOCKS)
    assert err.value.reason == reason


def test_refusals_by_backend_shape_and_dtype():
    class WritesInForward:
        forward_includes_kv_cache_update = True

    with pytest.raises(UnsupportedLayout) as err:
        PagedKV(flash_caches(["l0"]), {"l0": layer(IndexedWrite(), WritesInForward)}, BS, BLOCKS)
    assert err.value.reason == "layout_no_cache_op"
    with pytest.raises(UnsupportedLayout) as err:  # two axes of length 2: which holds the blocks?
        PagedKV({"l0": torch.zeros(2, 2, BS, HEADS, DIM)}, {"l0": layer(IndexedWrite())}, BS, 2)
    assert err.value.reason == "layout_shape"
    with pytest.raises(UnsupportedLayout) as err:  # padded past K and V of a block
        PagedKV({"l0": torch.zeros(2, BLOCKS, BS, HEADS, DIM + 1)}, {"l0": layer(IndexedWrite())}, BS, BLOCKS)
    assert err.value.reason == "layout_shape"
    fp8 = IndexedWrite()
    fp8.kv_cache_dtype = "fp8_e4m3"
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV(flash_caches(["l0"]), {"l0": layer(fp8)}, BS, BLOCKS)
    assert err.value.reason == "layout_quantized_kv"
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV({"l0": torch.zeros(2, BLOCKS, BS, HEADS, DIM, device="meta")}, {"l0": layer(IndexedWrite())},
                BS, BLOCKS)
    assert err.value.reason == "layout_unknown_backend"


def test_layers_must_agree_on_the_block_axis():
    caches = {"l0": torch.zeros(2, BLOCKS, BS, HEADS, DIM), "l1": torch.zeros(BLOCKS, 2, BS, HEADS, DIM)}

    class BlocksFirst(IndexedWrite):
        def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping):
            super().do_kv_cache_update(layer, key, value, kv_cache.transpose(0, 1), slot_mapping)

    with pytest.raises(UnsupportedLayout) as err:
        PagedKV(caches, {"l0": layer(IndexedWrite()), "l1": layer(BlocksFirst())}, BS, BLOCKS)
    assert err.value.reason == "layout_mixed"


def test_slots_and_writes_are_checked():
    kv = PagedKV(flash_caches(["l0"]), {"l0": layer(IndexedWrite())}, BS, BLOCKS)
    with pytest.raises(ValueError):
        kv.read("l0", torch.tensor([BLOCKS * BS]))
    with pytest.raises(ValueError):
        kv.write("l0", torch.tensor([1, 1]), torch.zeros(2, HEADS, DIM), torch.zeros(2, HEADS, DIM))
    with pytest.raises(ValueError):
        kv.read_blocks("l0", torch.tensor([0]), BS + 1)
