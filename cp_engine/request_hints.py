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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

NAMESPACE = "cp_ns"
PATH = "cp_path"
ENDS = "cp_ends"
GROUP = "cp_group"
REQUEST_ID = "cp_rid"
ALL_KEYS = (NAMESPACE, PATH, ENDS, GROUP, REQUEST_ID)


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
