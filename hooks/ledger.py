"""Patch ledger: every engine symbol cp_engine patches, with why and when to drop it.

Contract:
- adapters call ``register(Patch(...))`` at import time of their own module, once per
  patched symbol; registering the same ``target`` again replaces the entry (module
  reloads stay idempotent);
- ``supported(entry, version)`` tells whether an installed engine version lies in the
  entry's declared range; adapters check it *before* patching and skip otherwise;
- ``entries()`` / ``as_markdown()`` are for ``install_hook.py status`` and the docs.
Pure Python, no engine imports.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

__all__ = ["Patch", "register", "entries", "get", "supported", "parse_version", "as_markdown"]


@dataclass(frozen=True)
class Patch:
    engine: str  # "vllm" or "sglang"
    target: str  # dotted symbol, e.g. "vllm.v1.core.sched.scheduler.create_request_queue"
    why: str
    how: str
    min_version: str  # inclusive
    max_version: str  # inclusive on major.minor (0.33 admits 0.33.x)
    upstream: str  # upstream file / issue the patch depends on
    remove_when: str
    feature: str = ""  # config feature that gates it ("" = always with the plugin)


_lock = threading.Lock()
_entries: dict[str, Patch] = {}


def register(entry: Patch) -> Patch:
    with _lock:
        _entries[entry.target] = entry
    return entry


def entries(engine: str | None = None) -> list[Patch]:
    with _lock:
        out = list(_entries.values())
    return [e for e in out if engine is None or e.engine == engine]


def get(target: str) -> Patch | None:
    with _lock:
        return _entries.get(target)


_VERSION_RE = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Leading ``major.minor.patch`` of a version string (local tags ignored)."""
    m = _VERSION_RE.match(str(text).strip().lstrip("v"))
    if not m:
        return None
    return tuple(int(g) if g else 0 for g in m.groups())  # type: ignore[return-value]


def supported(entry: Patch, version: str) -> bool:
    v = parse_version(version)
    lo = parse_version(entry.min_version)
    hi = parse_version(entry.max_version)
    if v is None or lo is None or hi is None:
        return False
    # The upper bound names a minor series: every patch release inside it is admitted.
    return lo <= v and v[:2] <= hi[:2]


def as_markdown(engine: str | None = None) -> str:
    rows = ["| target | versions | why | how | remove when |", "|---|---|---|---|---|"]
    for e in sorted(entries(engine), key=lambda e: e.target):
        rows.append(f"| `{e.target}` | {e.min_version}–{e.max_version} | {e.why} | {e.how} | {e.remove_when} |")
    return "\n".join(rows)
