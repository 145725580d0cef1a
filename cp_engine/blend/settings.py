"""A request's own blend settings: the recompute ratio and mode it asks for.

A client sets them in the request's hints (vLLM: ``vllm_xargs``; SGLang:
``custom_params``), beside ``cp_spans``; both are optional and default to
``CP_ENGINE_BLEND_RATIO`` / ``CP_ENGINE_BLEND_MODE``:
- ``cp_blend_ratio``: a number in ``[0, 1]`` (an int 0 or 1 too; a bool, a string, NaN
  or anything outside is refused), the share of the reused tokens recomputed;
- ``cp_blend_mode``: one of ``selection.MODES`` (``both``, ``first_tokens``, ``deviation``);
- ``cp_blend_store_depth``: a non-negative int, how many stitching generations the
  block KV this request stores may sit behind (see ``plan.store_depth``). A request can
  only lower the server's ``CP_ENGINE_BLEND_STORE_DEPTH``, never raise it: the server
  owner decides how far approximate KV may compound;
- ``cp_blend_carry``: true/false (or 1/0), whether a block stored behind the same lead
  as now is kept whole (``leads``); default ``CP_ENGINE_BLEND_CARRY``.

Two readers, one rule:
- ``check_settings(extra)`` (API server) raises ``InvalidBlendSetting`` naming the field
  for a value it refuses, so the client gets an HTTP 400 before anything is queued;
- ``read_settings(extra, ratio, mode, store_depth)`` (EngineCore) never raises: a value that passes
  ``check_settings`` is used, anything else falls back to the given defaults (a request
  that did not pass the API server, e.g. the offline engine, still runs).
"""
from __future__ import annotations

import math
from collections.abc import Mapping  # (isinstance on the request path: typing's alias checks slower)
from dataclasses import dataclass
from typing import Any

from .selection import MODES

__all__ = ["RATIO_KEY", "MODE_KEY", "STORE_DEPTH_KEY", "CARRY_KEY", "BlendSettings", "InvalidBlendSetting",
           "check_settings", "read_settings"]

RATIO_KEY = "cp_blend_ratio"
MODE_KEY = "cp_blend_mode"
STORE_DEPTH_KEY = "cp_blend_store_depth"
CARRY_KEY = "cp_blend_carry"


class InvalidBlendSetting(ValueError):
    """A request's blend setting is refused; ``field`` names the hint."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class BlendSettings:
    ratio: float
    mode: str
    store_depth: int = 0
    carry: bool = True


def _ratio(value: Any) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidBlendSetting(RATIO_KEY, f"{RATIO_KEY} must be a number from 0 to 1, got {value!r}")
    return float(value)


def _mode(value: Any) -> str:
    if not isinstance(value, str) or value not in MODES:
        raise InvalidBlendSetting(MODE_KEY, f"{MODE_KEY} must be one of {', '.join(MODES)}, got {value!r}")
    return value


def _store_depth(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise InvalidBlendSetting(STORE_DEPTH_KEY, f"{STORE_DEPTH_KEY} must be an integer >= 0, got {value!r}")
    return value


def _carry(value: Any) -> bool:
    # vLLM's HTTP schema for vllm_xargs has no bool: a JSON true may arrive as 1
    if type(value) not in (bool, int) or value not in (0, 1):
        raise InvalidBlendSetting(CARRY_KEY, f"{CARRY_KEY} must be true or false (1 or 0), got {value!r}")
    return bool(value)


def check_settings(extra: Mapping[str, Any] | None) -> None:
    """Raise ``InvalidBlendSetting`` if ``extra`` carries a blend setting that is refused."""
    if not isinstance(extra, Mapping):
        return
    if RATIO_KEY in extra:
        _ratio(extra[RATIO_KEY])
    if MODE_KEY in extra:
        _mode(extra[MODE_KEY])
    if STORE_DEPTH_KEY in extra:
        _store_depth(extra[STORE_DEPTH_KEY])
    if CARRY_KEY in extra:
        _carry(extra[CARRY_KEY])


def read_settings(extra: Mapping[str, Any] | None, ratio: float, mode: str, store_depth: int = 0,
                  carry: bool = True) -> BlendSettings:
    """The request's settings where valid, else ``ratio`` / ``mode`` / ``carry``; its
    store depth is at most ``store_depth`` (the server's). Never raises."""
    out_ratio, out_mode, out_depth, out_carry = ratio, mode, store_depth, carry
    if isinstance(extra, Mapping):
        try:
            if RATIO_KEY in extra:
                out_ratio = _ratio(extra[RATIO_KEY])
        except InvalidBlendSetting:
            pass
        try:
            if MODE_KEY in extra:
                out_mode = _mode(extra[MODE_KEY])
        except InvalidBlendSetting:
            pass
        try:
            if STORE_DEPTH_KEY in extra:
                out_depth = min(store_depth, _store_depth(extra[STORE_DEPTH_KEY]))
        except InvalidBlendSetting:
            pass
        try:
            if CARRY_KEY in extra:
                out_carry = _carry(extra[CARRY_KEY])
        except InvalidBlendSetting:
            pass
    return BlendSettings(out_ratio, out_mode, out_depth, out_carry)
