"""Blend connector, worker side: what it reports about its store (no engine runs; the
worker gets a real ``BlockKVStore`` and the keys the scheduler would order saved)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vllm_server import vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]


def _worker(capacity_tokens: int):
    from cp_engine.blend.keys import KVLayout
    from cp_engine.blend.store import BlockKVStore
    from cp_engine.config import load_config
    from cp_engine.hooks.vllm.blend_worker import BlendWorker

    worker = BlendWorker(SimpleNamespace(cache_config=SimpleNamespace(block_size=16)), load_config({}))
    worker.layout = KVLayout.make(model="tiny", fingerprint="f", dtype="float32", num_layers=2, num_kv_heads=1,
                                  head_dim=4, block_size=16, rope="neox/test")
    per_token = 2 * 2 * 1 * 4 * 4
    worker.store = BlockKVStore(capacity_tokens * per_token)
    return worker


def _put(worker, ids, depth=0):
    """What ``save`` does once it has read a block's KV: put it and note it."""
    from cp_engine.blend.keys import Scope, block_key
    from cp_engine.blend.store import kv_shape

    key = block_key(worker.layout, Scope(), ids)
    assert worker.store.put(key, np.zeros(kv_shape(key), dtype=np.float32))
    worker._stored[key.lookup] = (key, (depth, None))
    worker.meta.stored.append((key.lookup, depth, None))
    return key


def test_an_entry_put_and_evicted_in_one_step_is_reported_dropped_not_stored():
    worker = _worker(capacity_tokens=20)
    a = _put(worker, list(range(10)))
    b = _put(worker, list(range(10, 20)), depth=1)
    c = _put(worker, list(range(20, 30)))  # over the bound: a (the least valuable) goes
    worker._store_changed = True
    worker.end_step()
    meta = worker.take_meta()
    assert a.lookup in meta.dropped
    assert meta.stored == [(b.lookup, 1, None), (c.lookup, 0, None)]
    # the scheduler's mirror, fed this report, holds exactly what the store holds
    from cp_engine.hooks.vllm.blend_scheduler import MirrorIndex

    mirror = MirrorIndex()
    mirror.apply(meta.stored, meta.dropped)
    assert [mirror.contains(k) for k in (a, b, c)] == [False, True, True] and mirror.depth(b) == 1


def test_reset_empties_the_store_and_reports_every_entry_dropped():
    worker = _worker(capacity_tokens=100)
    keys = [_put(worker, list(range(i, i + 10))) for i in (0, 10)]
    worker.end_step()
    worker.take_meta()
    worker.reset()
    worker.end_step()
    meta = worker.take_meta()
    assert sorted(meta.dropped) == sorted(k.lookup for k in keys) and not meta.stored
    assert len(worker.store) == 0


def test_save_all_reads_once_per_layer_and_stores_what_each_block_holds():
    """Every saved block's entry equals its own slots read layer by layer with K moved to
    position 0; a block the store holds, or a second order for the same block, is not
    read again. On the torch stand-in decoder (a flash-layout cache)."""
    import torch

    from benchmarks.blend.torch_decoder import Dims, FlashPagedKV, build
    from cp_engine.blend.keys import KVLayout, Scope, block_key
    from cp_engine.blend.rope import shift_k
    from cp_engine.blend.store import BlockKVStore
    from cp_engine.config import load_config
    from cp_engine.hooks.vllm.blend_meta import SaveOrder
    from cp_engine.hooks.vllm.blend_recompute import DecoderRecompute
    from cp_engine.hooks.vllm.blend_worker import BlendWorker

    dims = Dims(64, 128, 3, 4, 2, 16, vocab=500, max_positions=2048)
    model = build(dims, "cpu", torch.float32, seed=2)
    paged = FlashPagedKV([l.self_attn.attn.layer_name for l in model.model.layers], 24, 16, 2, 16,
                         torch.float32, "cpu")
    gen = torch.Generator().manual_seed(4)
    slots = paged.slots(range(24), 0, 384)
    for name in paged.layer_names:
        paged.write(name, slots, torch.randn(384, 2, 16, generator=gen), torch.randn(384, 2, 16, generator=gen))
    worker = BlendWorker(SimpleNamespace(cache_config=SimpleNamespace(block_size=16)), load_config({}))
    worker.paged, worker.recompute = paged, DecoderRecompute.from_model(model, paged)
    worker.layout = KVLayout.make(model="stand-in", fingerprint="f", dtype="float32", num_layers=3, num_kv_heads=2,
                                  head_dim=16, block_size=16, rope=worker.recompute.rope.identity())
    worker.store = BlockKVStore(1 << 22)
    blocks = tuple(range(15, -1, -1))  # a block table out of order
    orders = [SaveOrder("a", Scope(), 5, 40, tuple(range(35)), blocks, depth=0),
              SaveOrder("a", Scope(), 40, 75, tuple(range(100, 135)), blocks, depth=2, lead="lead-of-a2"),
              SaveOrder("b", Scope(), 80, 115, tuple(range(35)), blocks, depth=0),  # the first block again
              SaveOrder("c", Scope(), 120, 150, tuple(range(200, 230)), blocks, depth=1)]
    held = block_key(worker.layout, Scope(), orders[3].token_ids)
    assert worker.store.put(held, torch.zeros(3, 2, 30, 2, 16))
    reads = []
    real_read = paged.read
    paged.read = lambda name, s: (reads.append(name), real_read(name, s))[1]
    try:
        worker.save_all(orders)
    finally:
        del paged.read
    assert reads == list(paged.layer_names)  # one read per layer for the whole step
    for order in orders[:2]:
        key = block_key(worker.layout, order.scope, order.token_ids)
        own = paged.slots(blocks, order.start, order.end)
        k = torch.stack([paged.read(n, own)[0] for n in paged.layer_names])
        v = torch.stack([paged.read(n, own)[1] for n in paged.layer_names])
        want = torch.stack([shift_k(k, -order.start, worker.recompute.rope), v], dim=1)
        assert torch.equal(worker.store.get(key), want)
    assert not worker.store.get(held).any()  # held before: not overwritten
    assert [(depth, lead) for _, depth, lead in worker.meta.stored] == [(0, None), (2, "lead-of-a2")]
