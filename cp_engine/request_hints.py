"""Keys of the hints the API server attaches to a request for the engine's scheduler.

Engine-neutral: one definition for every adapter. vLLM carries them in
``request.vllm_xargs`` → ``SamplingParams.extra_args`` (EngineCore reads
``request.sampling_params.extra_args``); SGLang in ``custom_params`` →
``SamplingParams.custom_params`` (``hooks/sglang/hints.py``). Values are JSON scalars or
lists, so they cross the engines' process hops unchanged.

Contract (API server writes with ``build_xargs``, the scheduler reads with ``read_hints``):
- ``cp_ns``    str: index namespace of the request (prompt text before the blocks);
- ``cp_path``  list[str]: 16-hex-char index ids of the rendered blocks, in prompt order;
- ``cp_ends``  list[int]: estimated token offset where each rendered block ends in the
  prompt (same length as ``cp_path``, non-decreasing);
- ``cp_group`` str: group key of the leading block(s) (queue grouping);
- ``cp_rid``   str: the request id the API server recorded in the index (vLLM adds a
  suffix to the engine-side id, so EngineCore reports evictions under this one).
A request without ``cp_path`` was not rewritten; EngineCore must treat it as plain.

Blend hints (read independently of ``cp_path``; see ``docs/blend-design.md``):
- ``cp_spans`` list[[int, int]]: exact ``[start, end)`` token offsets of the context
  blocks in the prompt, in prompt order. EngineCore trusts them only as far as
  ``read_spans`` validates them, and keys stored KV by the prompt's own ids in each
  span, so a wrong span can only miss. A client may send them itself (token prompts).
- ``cp_scope`` str: the tenant scope of the request's stored KV. Only the API server
  sets it; a client's own value must be dropped there (``strip_reserved``).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence  # (isinstance on the request path: typing's aliases check slower)
from dataclasses import dataclass
from typing import Any

NAMESPACE = "cp_ns"
PATH = "cp_path"
ENDS = "cp_ends"
GROUP = "cp_group"
REQUEST_ID = "cp_rid"
SPANS = "cp_spans"
SCOPE = "cp_scope"
INDEX_KEYS = (NAMESPACE, PATH, ENDS, GROUP, REQUEST_ID)  # what build_xargs writes
ALL_KEYS = INDEX_KEYS + (SPANS, SCOPE)
SERVER_ONLY_KEYS = (SCOPE,)
MAX_SPANS = 4096


@dataclass(frozen=True)
class Hints:
    namespace: str
    path: tuple[int, ...]
    ends: tuple[int, ...]
    group: str
    request_id: str


def build_xargs(prep: Any, request_id: str, base_offset: int = 0, scale: float = 1.0) -> dict[str, Any]:
    """Hints for one rewritten request (``prep`` is a ``cp_engine.pipeline.Prepared``).

    ``base_offset`` and ``prep.token_lengths`` are estimates; ``scale`` (real tokens per
    estimated token, see ``hooks.tokenratio``) converts them to the engine's units.
    """
    path = [format(b & 0xFFFFFFFFFFFFFFFF, "016x") for b in prep.index_path()]
    ends: list[int] = []
    pos = float(base_offset)
    for i, n in enumerate(prep.token_lengths):
        # Blocks are joined by a blank line: about one token between neighbours.
        pos += int(n) + (1 if i else 0)
        ends.append(int(round(pos * scale)))
    return {NAMESPACE: str(prep.namespace), PATH: path, ENDS: ends,
            GROUP: str(prep.group_key), REQUEST_ID: str(request_id)}


def read_hints(extra_args: Mapping[str, Any] | None) -> Hints | None:
    """Parse the hints from ``sampling_params.extra_args``; None if absent or malformed.

    Never raises: a client may send arbitrary ``vllm_xargs``.
    """
    try:
        if not extra_args or PATH not in extra_args:
            return None
        raw_path = extra_args.get(PATH)
        raw_ends = extra_args.get(ENDS) or []
        if not isinstance(raw_path, Sequence) or isinstance(raw_path, (str, bytes)):
            return None
        path = tuple(int(p, 16) for p in raw_path)
        ends = tuple(int(e) for e in raw_ends) if isinstance(raw_ends, Sequence) else ()
        if len(ends) != len(path):
            ends = ()
        return Hints(str(extra_args.get(NAMESPACE, "")), path, ends,
                     str(extra_args.get(GROUP, "")), str(extra_args.get(REQUEST_ID, "")))
    except Exception:
        return None


def read_spans(extra_args: Mapping[str, Any] | None, prompt_len: int) -> tuple[tuple[int, int], ...] | None:
    """The blend spans of a request, or None when absent or invalid.

    Valid means: a list of at most ``MAX_SPANS`` pairs of ints, each non-empty, sorted,
    disjoint and inside ``[0, prompt_len)``; or the same flat, ``[s0, e0, s1, e1, ...]``
    (vLLM's ``vllm_xargs`` type admits only lists of scalars, so a client sends this
    form). Never raises.
    """
    try:
        raw = (extra_args or {}).get(SPANS)
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
            return None
        if all(type(x) is int for x in raw):
            if len(raw) % 2:
                return None
            raw = list(zip(raw[0::2], raw[1::2]))
        if len(raw) > MAX_SPANS:
            return None
        spans: list[tuple[int, int]] = []
        last_end = 0
        for pair in raw:
            if isinstance(pair, (str, bytes)) or len(pair) != 2:
                return None
            start, end = pair
            if type(start) is not int or type(end) is not int:  # bool and float are refused too
                return None
            if not (last_end <= start < end <= prompt_len):
                return None
            spans.append((start, end))
            last_end = end
        return tuple(spans)
    except Exception:
        return None


def read_scope(extra_args: Mapping[str, Any] | None) -> str:
    """The tenant scope the API server attached ("" when none)."""
    value = (extra_args or {}).get(SCOPE, "")
    return value if isinstance(value, str) else ""


def strip_reserved(extra_args: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A client's ``vllm_xargs`` without the keys only the API server may set."""
    if extra_args is None:
        return None
    return {k: v for k, v in extra_args.items() if k not in SERVER_ONLY_KEYS}
