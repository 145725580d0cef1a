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
    worker._stored[key.lookup] = (key, depth)
    worker.meta.stored.append((key.lookup, depth))
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
    assert meta.stored == [(b.lookup, 1), (c.lookup, 0)]
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
