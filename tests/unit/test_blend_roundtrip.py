"""The connector's flow on the tiny Llama model: K/V at position p -> store -> back at q.

A block alone (nothing before it) sees only relative positions, so with RoPE every
layer's K at [q, q+n) is the K at [p, p+n) rotated by q-p and V is unchanged. The
stored entry, moved, must therefore equal the model's own full cache at q.
"""
import pytest

from cp_engine.blend.keys import KVLayout, Scope, block_key
from cp_engine.blend.rope import RopeSpec, shift_k
from cp_engine.blend.store import BlockKVStore

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")


def _cache(model, ids, start):
    """[layers, 2, tokens, kv_heads, head_dim] of ``ids`` at positions [start, start+n)."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), position_ids=torch.arange(start, start + len(ids))[None],
                    use_cache=True)
    layers = out.past_key_values.layers
    return torch.stack([torch.stack([lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)]) for lay in layers])


def test_stored_block_moved_to_a_new_position_equals_the_models_cache_there():
    from transformers import AutoModelForCausalLM

    from cp_engine.devtools.vllm_server import tiny_model_dir

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=torch.float32).eval()
    cfg = model.config
    spec = RopeSpec.from_hf_config(cfg)
    layout = KVLayout(model="tiny", fingerprint="test", dtype="float32", num_layers=cfg.num_hidden_layers,
                      num_kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, block_size=16,
                      rope=spec.identity())
    ids = list(range(200, 248))
    p, q = 37, 1500
    at_p = _cache(model, ids, p)
    stored = at_p.clone()
    stored[:, 0] = shift_k(at_p[:, 0], -p, spec)  # K normalised to [0, n)
    store = BlockKVStore(1 << 24)
    key = block_key(layout, Scope(), ids)
    assert store.put(key, stored)

    got = store.get(key)
    moved = got.clone()
    moved[:, 0] = shift_k(got[:, 0], q, spec)
    at_q = _cache(model, ids, q)
    scale = at_q.abs().max()
    assert (moved - at_q).abs().max() <= 3e-4 * scale  # measured 4e-5
    assert (at_p - at_q).abs().max() > 1e-2 * scale  # unmoved K would not pass
