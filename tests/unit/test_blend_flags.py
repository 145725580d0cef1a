"""CP_ENGINE_BLEND* flags: off by default, bounded, bad values fall back with a warning."""
from cp_engine.config import FLAGS, Config, load_config


def test_blend_is_off_by_default_and_says_it_is_approximate():
    cfg = load_config({})
    assert cfg.blend is False and "blend" not in cfg.active_features()
    (flag,) = [f for f in FLAGS if f.env == "CP_ENGINE_BLEND"]
    assert "Approximate" in flag.help and "Off by default" in flag.help


def test_blend_flags_parse():
    cfg = load_config({"CP_ENGINE_BLEND": "1", "CP_ENGINE_BLEND_STORE_MB": "64", "CP_ENGINE_BLEND_RATIO": "0.3",
                       "CP_ENGINE_BLEND_MODE": "Deviation", "CP_ENGINE_BLEND_FIRST_TOKENS": "8",
                       "CP_ENGINE_BLEND_CHECK_LAYERS": "2"})
    assert (cfg.blend, cfg.blend_store_mb, cfg.blend_ratio, cfg.blend_mode) == (True, 64, 0.3, "deviation")
    assert (cfg.blend_first_tokens, cfg.blend_check_layers) == (8, 2)
    assert "blend" in cfg.active_features() and not cfg.warnings
    assert load_config({"CP_ENGINE_BLEND_RATIO": "0"}).blend_ratio == 0.0
    assert load_config({"CP_ENGINE_BLEND_RATIO": "1"}).blend_ratio == 1.0


def test_bad_blend_values_fall_back():
    cfg = load_config({"CP_ENGINE_BLEND_RATIO": "1.5", "CP_ENGINE_BLEND_MODE": "magic",
                       "CP_ENGINE_BLEND_STORE_MB": "-1", "CP_ENGINE_BLEND": "perhaps"})
    default = Config()
    assert (cfg.blend_ratio, cfg.blend_mode, cfg.blend_store_mb, cfg.blend) == \
        (default.blend_ratio, default.blend_mode, default.blend_store_mb, False)
    assert len(cfg.warnings) == 4 and any("at most 1" in w for w in cfg.warnings)
    assert load_config({"CP_ENGINE_BLEND_RATIO": "nan"}).blend_ratio == default.blend_ratio
