"""A request's own blend ratio and mode (``cp_engine.blend.settings``) and the API
server's refusal of bad ones (``blend_spans.process_inputs_wrapper``, HTTP 400)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from cp_engine.blend.settings import (MODE_KEY, RATIO_KEY, BlendSettings, InvalidBlendSetting, check_settings,
                                      read_settings)


@pytest.mark.parametrize("extra, want", [
    (None, BlendSettings(0.15, "both")),
    ({}, BlendSettings(0.15, "both")),
    ({RATIO_KEY: 0.3}, BlendSettings(0.3, "both")),
    ({RATIO_KEY: 0}, BlendSettings(0.0, "both")),
    ({RATIO_KEY: 1, MODE_KEY: "deviation"}, BlendSettings(1.0, "deviation")),
    ({MODE_KEY: "first_tokens"}, BlendSettings(0.15, "first_tokens")),
])
def test_valid_settings_are_read_and_missing_ones_default(extra, want):
    check_settings(extra)
    got = read_settings(extra, 0.15, "both")
    assert got == want and type(got.ratio) is float


@pytest.mark.parametrize("extra, field", [
    ({RATIO_KEY: 1.5}, RATIO_KEY),
    ({RATIO_KEY: -0.01}, RATIO_KEY),
    ({RATIO_KEY: math.nan}, RATIO_KEY),
    ({RATIO_KEY: math.inf}, RATIO_KEY),
    ({RATIO_KEY: True}, RATIO_KEY),
    ({RATIO_KEY: "0.3"}, RATIO_KEY),
    ({RATIO_KEY: [0.3]}, RATIO_KEY),
    ({RATIO_KEY: None}, RATIO_KEY),
    ({MODE_KEY: "fast"}, MODE_KEY),
    ({MODE_KEY: 1}, MODE_KEY),
    ({MODE_KEY: ["both"]}, MODE_KEY),
])
def test_refused_settings_name_their_field_and_the_engine_falls_back(extra, field):
    with pytest.raises(InvalidBlendSetting) as exc:
        check_settings(extra)
    assert exc.value.field == field and field in str(exc.value)
    assert isinstance(exc.value, ValueError)  # vLLM's API server answers a ValueError with 400
    got = read_settings({**extra, "other": 1}, 0.15, "both")
    assert got == BlendSettings(0.15, "both")


def test_a_bad_field_does_not_drop_the_good_one():
    assert read_settings({RATIO_KEY: 2, MODE_KEY: "deviation"}, 0.15, "both") == BlendSettings(0.15, "deviation")
    assert read_settings({RATIO_KEY: 0.5, MODE_KEY: "x"}, 0.15, "both") == BlendSettings(0.5, "both")
    assert read_settings("not a mapping", 0.2, "first_tokens") == BlendSettings(0.2, "first_tokens")


def _engine_request(extra):
    from vllm import SamplingParams

    return SimpleNamespace(sampling_params=SamplingParams(extra_args=extra), prompt_token_ids=[1, 2, 3])


@pytest.mark.parametrize("blend", ["0", "1"])
def test_the_request_gate_refuses_bad_settings_only_with_blend_on(monkeypatch, blend):
    pytest.importorskip("vllm")
    from cp_engine.hooks import runtime
    from cp_engine.hooks.vllm.blend_spans import process_inputs_wrapper

    monkeypatch.setenv("CP_ENGINE_BLEND", blend)
    runtime.reset_for_tests()
    try:
        bad = _engine_request({RATIO_KEY: 7, "cp_spans": [0, 2]})
        call = lambda request: process_inputs_wrapper(lambda: request, None, (), {})  # noqa: E731
        if blend == "1":
            with pytest.raises(ValueError, match=f"cp_engine: vllm_xargs.{RATIO_KEY} must be a number from 0 to 1") as exc:
                call(bad)
            # AsyncLLM.generate passes only vLLM's client errors through unchanged (anything
            # else becomes a 500); vLLM's own error mapping answers this one with 400
            from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
            from vllm.exceptions import VLLMClientError

            assert isinstance(exc.value, VLLMClientError)
            err = create_error_response(exc.value)
            assert err.error.code == 400 and f"vllm_xargs.{RATIO_KEY}" in err.error.message
        else:
            assert call(bad) is bad and bad.sampling_params.extra_args[RATIO_KEY] == 7
        good = _engine_request({RATIO_KEY: 0.3, MODE_KEY: "deviation", "cp_spans": [0, 2]})
        assert call(good).sampling_params.extra_args == {RATIO_KEY: 0.3, MODE_KEY: "deviation", "cp_spans": [0, 2]}
    finally:
        runtime.reset_for_tests()


def test_a_request_can_lower_the_store_depth_never_raise_it():
    from cp_engine.blend.settings import STORE_DEPTH_KEY

    assert read_settings({}, 0.15, "both", 2).store_depth == 2
    assert read_settings({STORE_DEPTH_KEY: 0}, 0.15, "both", 2).store_depth == 0
    assert read_settings({STORE_DEPTH_KEY: 5}, 0.15, "both", 1).store_depth == 1
    for bad in (-1, 1.0, True, "1", None):
        assert read_settings({STORE_DEPTH_KEY: bad}, 0.15, "both", 1).store_depth == 1
        with pytest.raises(InvalidBlendSetting) as exc:
            check_settings({STORE_DEPTH_KEY: bad})
        assert exc.value.field == STORE_DEPTH_KEY
    check_settings({STORE_DEPTH_KEY: 3})


def test_the_store_depth_flag_takes_zero_to_eight():
    from cp_engine.config import load_config

    assert load_config({}).blend_store_depth == 8  # the default the quality sweep measured
    assert load_config({"CP_ENGINE_BLEND_STORE_DEPTH": "0"}).blend_store_depth == 0
    assert load_config({"CP_ENGINE_BLEND_STORE_DEPTH": "2"}).blend_store_depth == 2
    for bad in ("-1", "9", "x"):
        cfg = load_config({"CP_ENGINE_BLEND_STORE_DEPTH": bad})
        assert cfg.blend_store_depth == 8 and any("CP_ENGINE_BLEND_STORE_DEPTH" in w for w in cfg.warnings)
