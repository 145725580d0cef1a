"""Hints the API server attaches to a rewritten SGLang request for the scheduler.

SGLang's chat request drops unknown top-level fields, but ``custom_params`` (a dict
of JSON scalars / lists) travels unchanged into ``SamplingParams.custom_params`` of the
scheduler's ``Req``. The hint keys and their meaning are shared with the vLLM adapter
(``cp_engine.request_hints``): one definition for both engines.
"""
from __future__ import annotations

from typing import Any

from cp_engine.request_hints import Hints, build_xargs, read_hints

__all__ = ["attach", "of_request"]


def attach(request: Any, prep: Any, request_id: str, base_offset: int = 0) -> None:
    """Merge the hints of ``prep`` into ``request.custom_params`` (client keys kept)."""
    current = getattr(request, "custom_params", None)
    merged = dict(current) if isinstance(current, dict) else {}
    merged.update(build_xargs(prep, request_id, base_offset))
    request.custom_params = merged


def of_request(req: Any) -> Hints | None:
    """Hints carried by a scheduler ``Req`` (None when absent); never raises."""
    params = getattr(req, "sampling_params", None)
    custom = getattr(params, "custom_params", None) if params is not None else None
    return read_hints(custom) if isinstance(custom, dict) else None
