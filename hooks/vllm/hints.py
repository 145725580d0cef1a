"""vLLM's carriage of the request hints (``cp_engine.request_hints``): the API server
merges them into ``request.vllm_xargs``; vLLM hands them to EngineCore as
``request.sampling_params.extra_args``.
"""
from __future__ import annotations

from typing import Any

from cp_engine.request_hints import Hints, build_xargs, read_hints, strip_reserved

__all__ = ["merged", "of_request"]


def merged(request: Any, prep: Any, request_id: str, base_offset: int = 0, scale: float = 1.0) -> dict:
    """``request.vllm_xargs`` with the hints of ``prep`` added (client keys kept, except
    the reserved ones); the caller assigns it, together with the new prompt."""
    hints = dict(strip_reserved(getattr(request, "vllm_xargs", None)) or {})
    hints.update(build_xargs(prep, request_id, base_offset, scale=scale))
    return hints


def of_request(request: Any) -> Hints | None:
    """Hints carried by an EngineCore ``Request`` (None when absent); never raises."""
    params = getattr(request, "sampling_params", None)
    return read_hints(getattr(params, "extra_args", None)) if params is not None else None
