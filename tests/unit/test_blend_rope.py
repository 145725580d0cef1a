"""Moving K between positions (cp_engine.blend.rope), against a real model's RoPE."""
import numpy as np
import pytest

from cp_engine.blend.rope import RopeSpec, UnsupportedRope, shift_k, shift_k_numpy

torch = pytest.importorskip("torch")


def _spec(style="neox", head_dim=64, rotary_dim=None):
    rot = rotary_dim or head_dim
    inv = 1.0 / 10000.0 ** (np.arange(0, rot, 2) / rot)
    return RopeSpec.from_inv_freq(inv, style, head_dim)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_shift_then_unshift_is_identity_and_torch_matches_numpy(style, rotary_dim):
    spec = _spec(style, 64, rotary_dim)
    k = np.random.default_rng(0).standard_normal((5, 2, 64)).astype(np.float32)
    moved = shift_k_numpy(k, 1234, spec)
    assert not np.allclose(moved, k)
    np.testing.assert_allclose(shift_k_numpy(moved, -1234, spec), k, atol=2e-5)
    np.testing.assert_allclose(shift_k(torch.from_numpy(k), 1234, spec).numpy(), moved, atol=2e-5)
    if rotary_dim:  # dims beyond the rotary part are never touched
        np.testing.assert_array_equal(moved[..., rotary_dim:], k[..., rotary_dim:])
    # shifts compose: +500 then +734 is +1234
    np.testing.assert_allclose(shift_k_numpy(shift_k_numpy(k, 500, spec), 734, spec), moved, atol=2e-5)


def test_styles_differ_and_gptj_rotates_adjacent_pairs():
    k = np.zeros((1, 8), np.float32)
    k[0, 0] = 1.0  # one unit vector in the first pair's first half
    inv = [1.0, 0.1, 0.01, 0.001]
    gptj = shift_k_numpy(k, 1, RopeSpec.from_inv_freq(inv, "gptj", 8))
    neox = shift_k_numpy(k, 1, RopeSpec.from_inv_freq(inv, "neox", 8))
    np.testing.assert_allclose(gptj[0, :2], [np.cos(1), np.sin(1)], atol=1e-6)  # partner is dim 1
    np.testing.assert_allclose(neox[0, [0, 4]], [np.cos(1), np.sin(1)], atol=1e-6)  # partner is dim 4


def test_head_dim_mismatch_is_refused():
    with pytest.raises(ValueError, match="head_dim"):
        shift_k_numpy(np.zeros((2, 32), np.float32), 1, _spec())


def test_config_variants():
    base = {"model_type": "llama", "hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 8192}
    plain = RopeSpec.from_hf_config(dict(base, rope_theta=500000.0))
    linear = RopeSpec.from_hf_config(dict(base, rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0}))
    np.testing.assert_allclose(np.array(linear.inv_freq) * 4, plain.inv_freq)
    assert plain.identity() != linear.identity()
    assert RopeSpec.from_hf_config(dict(base, model_type="gptj", rotary_dim=32)).rotary_dim == 32
    partial = RopeSpec.from_hf_config(dict(base, model_type="qwen2", partial_rotary_factor=0.5))
    assert (partial.rotary_dim, partial.head_dim) == (32, 64)
    for scaling, reason in [({"rope_type": "dynamic", "factor": 2.0}, "sequence length"),
                            ({"rope_type": "longrope", "short_factor": [1], "long_factor": [2]}, "sequence length"),
                            ({"rope_type": "yarn", "factor": 4.0}, "from_inv_freq"),
                            ({"rope_type": "default", "mrope_section": [16, 24, 24]}, "multimodal"),
                            ({"rope_type": "wavy"}, "not a fixed-frequency")]:
        with pytest.raises(UnsupportedRope, match=reason):
            RopeSpec.from_hf_config(dict(base, rope_scaling=scaling))
    with pytest.raises(UnsupportedRope, match="malformed"):
        RopeSpec.from_hf_config(dict(base, rope_scaling={"type": "linear"}))  # no factor
    with pytest.raises(UnsupportedRope, match="malformed"):
        RopeSpec.from_hf_config({"model_type": "llama"})  # no dims
    with pytest.raises(UnsupportedRope, match="pair style unknown"):
        RopeSpec.from_hf_config(dict(base, model_type="phi3"))
    with pytest.raises(UnsupportedRope, match="per layer type"):
        RopeSpec.from_hf_config(dict(base, rope_parameters={"full_attention": {"rope_theta": 1e6}}))


def test_llama3_frequencies_match_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=131072, rope_parameters=scaling)
    theirs, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = RopeSpec.from_hf_config(cfg.to_dict())
    np.testing.assert_allclose(ours.inv_freq, theirs.double().numpy(), rtol=1e-6)


# -- against the tiny Llama model's own rotary embedding -------------------------------

def _tiny(dtype):
    # Loaded in ``dtype`` (not converted after loading: ``.to`` would round the rotary
    # frequencies to bfloat16 too, which no engine does).
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM

    from cp_engine.devtools.vllm_server import tiny_model_dir

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir(), dtype=dtype).eval()


def _layer0_keys(model, ids, start):
    """Layer-0 K (post-RoPE) of ``ids`` placed at positions [start, start+n): [n, kv_heads, head_dim]."""
    pos = torch.arange(start, start + len(ids)).unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), position_ids=pos, use_cache=True)
    return out.past_key_values.layers[0].keys[0].transpose(0, 1).contiguous()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-4), (torch.bfloat16, 2e-2)])
def test_moved_k_equals_the_models_k_at_the_new_position(dtype, tol):
    # Layer 0's K depends only on each token and its position, so K computed at p and
    # moved to q must equal the model's own K computed at q.
    tiny = _tiny(dtype)
    spec = RopeSpec.from_hf_config(tiny.config)
    np.testing.assert_allclose(spec.inv_freq, tiny.model.rotary_emb.inv_freq.double().numpy(), rtol=1e-6)
    ids = list(range(100, 140))
    at_p = {p: _layer0_keys(tiny, ids, p) for p in (0, 7, 300, 2000)}
    assert all(k.dtype == dtype for k in at_p.values())
    for p, k_p in at_p.items():
        normalised = shift_k(k_p, -p, spec)
        for q, k_q in at_p.items():
            moved = shift_k(normalised, q, spec).float()
            scale = k_q.float().abs().max()
            assert (moved - k_q.float()).abs().max() <= tol * scale, (p, q)
    # and the check is sharp: K at another position is far from it
    assert (at_p[0].float() - at_p[7].float()).abs().max() > 10 * tol * at_p[0].float().abs().max()


def test_yarn_moves_exactly_with_the_engines_frequencies():
    # YaRN's attention factor multiplies cos and sin alike; a rotation by delta keeps it.
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=32768,
                                   rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                    "original_max_position_embeddings": 8192})
    rotary = LlamaRotaryEmbedding(cfg)
    assert rotary.attention_scaling != 1.0
    spec = RopeSpec.from_inv_freq(rotary.inv_freq, "neox", 64, "yarn")
    raw = torch.randn(1, 1, 6, 64)

    def at(p):
        cos, sin = rotary(raw, torch.arange(p, p + 6).unsqueeze(0))
        return apply_rotary_pos_emb(raw, raw, cos, sin)[1][0, 0]

    moved = shift_k(at(5), 9000 - 5, spec)
    assert (moved - at(9000)).abs().max() <= 5e-4 * at(9000).abs().max()


@pytest.mark.parametrize("family", ["qwen2", "mistral", "gptj"])
def test_other_families_move_exactly_too(family):
    # Random small decoders of each family built in memory: their own layer-0 K decides.
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if family == "gptj":  # interleaved pairs, partial rotary
        cfg = transformers.GPTJConfig(vocab_size=200, n_embd=128, n_layer=1, n_head=2, rotary_dim=32, n_positions=4096)
    else:
        cls = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[family]
        cfg = cls(vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, max_position_embeddings=4096, rope_theta=1e6)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    spec = RopeSpec.from_hf_config(cfg)
    assert spec.style == ("gptj" if family == "gptj" else "neox")
    ids = list(range(3, 23))
    k5, k900 = _layer0_keys(model, ids, 5), _layer0_keys(model, ids, 900)
    assert (shift_k(k5, 895, spec) - k900).abs().max() <= 2e-4 * k900.abs().max()
    assert (k5 - k900).abs().max() > 1e-2 * k900.abs().max()
