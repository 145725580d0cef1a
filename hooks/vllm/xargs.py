"""vLLM's name for the request hints: ``request.vllm_xargs`` carries them.

The keys and their codec are engine-neutral and live in ``cp_engine.hooks.hintkeys``;
this module re-exports them so vLLM-side code (and older imports) keep one spelling.
"""
from __future__ import annotations

from ..hintkeys import (  # noqa: F401
    ALL_KEYS, ENDS, GROUP, NAMESPACE, PATH, REQUEST_ID, Hints, build_xargs, read_hints,
)

__all__ = ["ALL_KEYS", "ENDS", "GROUP", "NAMESPACE", "PATH", "REQUEST_ID", "Hints", "build_xargs", "read_hints"]
