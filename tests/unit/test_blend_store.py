"""Block KV store (cp_engine.blend.store): bound, value eviction, verification, counters."""
import dataclasses
import threading

import numpy as np
import pytest

from cp_engine.blend.keys import KVLayout, Scope, block_key
from cp_engine.blend.store import STATS_HELP, BlockKVStore, kv_shape
from cp_engine.config import load_config

LAYOUT = KVLayout(model="tiny", fingerprint="f0", dtype="float32", num_layers=2, num_kv_heads=2, head_dim=4,
                  block_size=16, rope="neox/r")
PER_TOKEN = 2 * 2 * 2 * 4 * 4  # layers * (K, V) * heads * head_dim * float32 bytes


def key(ids, layout=LAYOUT, scope=Scope()):
    return block_key(layout, scope, ids)


def kv(k, fill=1.0):
    return np.full(kv_shape(k), fill, dtype=np.dtype(k.layout.dtype))


def test_put_get_and_counters():
    store = BlockKVStore(10 * PER_TOKEN)
    k = key([1, 2, 3])
    assert store.get(k) is None
    assert store.put(k, kv(k, 2.0))
    got = store.get(k)
    assert got.shape == (2, 2, 3, 2, 4) and float(got[0, 0, 0, 0, 0]) == 2.0
    assert not got.flags.writeable  # stored arrays are read-only
    assert store.contains(k)
    s = store.stats()
    assert set(s) == set(STATS_HELP)
    assert (s["blend_hits"], s["blend_misses"], s["blend_store_entries"], s["blend_store_tokens"]) == (1, 1, 1, 3)
    assert (s["blend_store_bytes"], s["blend_stored_tokens"], s["blend_reused_tokens"]) == (3 * PER_TOKEN, 3, 3)


def test_other_model_dtype_salt_or_tenant_never_hits():
    store = BlockKVStore(100 * PER_TOKEN)
    k = key([1, 2, 3])
    store.put(k, kv(k))
    for other in [dataclasses.replace(LAYOUT, model="m2"), dataclasses.replace(LAYOUT, dtype="float16"),
                  dataclasses.replace(LAYOUT, block_size=32)]:
        assert store.get(key([1, 2, 3], layout=other)) is None
    assert store.get(key([1, 2, 3], scope=Scope(cache_salt="s"))) is None
    assert store.get(key([1, 2, 3], scope=Scope(tenant="t"))) is None
    assert store.get(key([1, 2, 4])) is None
    assert store.stats()["blend_misses"] == 6 and store.stats()["blend_hits"] == 0


def test_digest_collision_or_corrupt_entry_is_a_counted_miss():
    store = BlockKVStore(100 * PER_TOKEN)
    k = key([1, 2, 3])
    store.put(k, kv(k))
    forged = dataclasses.replace(k, token_ids=(9, 9, 9))  # same digest, other tokens
    assert store.get(forged) is None
    assert store.stats()["blend_rejects"] == 1 and len(store) == 0
    # an entry corrupted after the put (wrong shape) is dropped, never returned
    store.put(k, kv(k))
    store._entries[k.lookup].kv = np.zeros((1, 2, 3), np.float32)
    assert store.get(k) is None and store.stats()["blend_rejects"] == 2
    store.put(k, kv(k))
    store._entries[k.lookup].kv = object()
    assert not store.contains(k) and store.stats()["blend_rejects"] == 3


def test_puts_that_do_not_fit_are_refused_and_lose_nothing():
    store = BlockKVStore(4 * PER_TOKEN)
    k = key([1, 2, 3])
    assert store.put(k, kv(k))
    assert not store.put(k, np.zeros((2, 2, 3, 2, 8), np.float32))  # shape
    assert not store.put(k, np.zeros(kv_shape(k), np.float64))  # dtype
    assert not store.put(k, [[0.0]])  # not an array
    big = key(list(range(5)))
    assert not store.put(big, kv(big))  # larger than the whole bound
    assert store.stats()["blend_store_refused"] == 4
    assert store.get(k) is not None  # the good entry survived every refusal


def test_eviction_keeps_the_bound_and_drops_the_least_valuable():
    store = BlockKVStore(10 * PER_TOKEN, half_life=1000)
    a, b, c = key([1, 2, 3, 4]), key([5, 6]), key([7, 8, 9, 10])
    for k in (a, b, c):
        store.put(k, kv(k))
    for _ in range(3):
        store.get(b)  # b: (1+3)*2 = 8 beats a's and c's (1+0)*4 = 4
    d = key([11, 12, 13])
    store.put(d, kv(d))  # needs 3 tokens: evict a (value 4, older than c)
    s = store.stats()
    assert s["blend_store_bytes"] <= store.capacity_bytes and s["blend_evictions"] == 1
    assert not store.contains(a) and all(store.contains(k) for k in (b, c, d))


def test_recency_decays_value():
    # value halves every half_life operations: an old popular block loses to a fresh one
    store = BlockKVStore(8 * PER_TOKEN, half_life=2)
    old, fresh = key([1, 2, 3, 4]), key([5, 6, 7, 8])
    store.put(old, kv(old))
    store.get(old)  # old: (1+1)*4 = 8 at op 2
    store.put(fresh, kv(fresh))
    for _ in range(4):
        store.get(fresh)  # fresh: 5*4 = 20 at op 7; old decayed to 8 * 2**-2.5
    new = key([9, 10, 11, 12])
    store.put(new, kv(new))
    assert store.contains(fresh) and not store.contains(old)


def test_replacing_an_entry_keeps_bytes_exact():
    store = BlockKVStore(10 * PER_TOKEN)
    k = key([1, 2])
    store.put(k, kv(k))
    store.put(k, kv(k, 3.0))
    assert store.stats()["blend_store_bytes"] == 2 * PER_TOKEN and len(store) == 1
    assert float(store.get(k)[0, 0, 0, 0, 0]) == 3.0
    assert store.remove(k) and not store.remove(k) and store.stats()["blend_store_bytes"] == 0


def test_torch_tensors_including_bfloat16():
    torch = pytest.importorskip("torch")
    layout = dataclasses.replace(LAYOUT, dtype="bfloat16")
    k = key([1, 2, 3], layout=layout)
    store = BlockKVStore(1 << 20)
    assert store.put(k, torch.ones(kv_shape(k), dtype=torch.bfloat16))
    assert store.get(k).dtype == torch.bfloat16
    assert store.stats()["blend_store_bytes"] == 3 * PER_TOKEN // 2
    assert not store.put(k, torch.ones(kv_shape(k), dtype=torch.float32))


def test_concurrent_use_keeps_the_books_straight():
    store = BlockKVStore(50 * PER_TOKEN)
    keys = [key([i, i + 1]) for i in range(0, 200, 2)]

    def work(offset):
        for i in range(300):
            k = keys[(i * 7 + offset) % len(keys)]
            if store.get(k) is None:
                store.put(k, kv(k))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = store.stats()
    assert s["blend_hits"] + s["blend_misses"] == 1200
    assert s["blend_store_bytes"] == s["blend_store_entries"] * 2 * PER_TOKEN <= store.capacity_bytes
    assert s["blend_store_tokens"] == 2 * s["blend_store_entries"]


def test_sized_from_the_flag():
    assert BlockKVStore.from_config(load_config({"CP_ENGINE_BLEND_STORE_MB": "3"})).capacity_bytes == 3 << 20
