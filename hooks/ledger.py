"""Patch ledger: the row types of the per-engine patch tables, with no engine import.

Every change cp_engine makes to a host process is one ``Row`` of its engine's
``Table`` (``hooks/vllm/table.py``, ``hooks/sglang/table.py``): which symbol, what kind
of change, which feature flag gates it, why, when it can go, and the leading
parameter names the handler relies on (checked before applying and by the drift
test). ``hooks.installer`` applies and undoes rows; this module only describes them,
so ``install_hook.py status``, the docs and the tests can read a table without the
engine installed.

Contract:
- ``Versions(low, high).admits(version)``: ``low`` inclusive on the full version,
  ``high`` inclusive on its major.minor series (``0.32`` admits ``0.32.4``); local
  tags and pre-release suffixes are ignored; an unparsable version is not admitted.
  A table declares its engine's range once, and only releases that were run.
- ``Row.target`` is ``"module:attr"`` or ``"module:Owner.attr"``; ``Row.kind`` is one
  of ``KINDS``; ``Row.trigger`` names the module whose import applies the row
  (default: the target's module; ``""`` with ``on_demand=True``: the adapter applies
  it itself, e.g. once the API server exists).
- ``Table.as_markdown()`` is the docs' patch table (kept in sync by a test).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["KINDS", "Versions", "Row", "Table", "parse_version"]

# kind -> what applying a row of that kind does (and how it is undone)
KINDS: dict[str, str] = {
    "method": "wrapt wrapper on the class attribute (unwrapped on undo)",
    "factory": "wrapt wrapper on the module-level factory (unwrapped on undo)",
    "route": "ASGI app behind an HTTP route swapped (original put back on undo)",
    "registry": "collector registered on a Prometheus registry (unregistered on undo)",
    "service": "background receiver started in this process (stopped on undo)",
}

_VERSION_RE = re.compile(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?")


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Leading ``major.minor.patch`` of a version string (local tags ignored)."""
    m = _VERSION_RE.match(str(text).strip().lstrip("v"))
    if not m:
        return None
    return tuple(int(g) if g else 0 for g in m.groups())  # type: ignore[return-value]


@dataclass(frozen=True)
class Versions:
    low: str  # inclusive
    high: str  # inclusive on major.minor: "0.32" admits every 0.32.x

    def admits(self, version: str | None) -> bool:
        v = parse_version(version) if version is not None else None
        lo, hi = parse_version(self.low), parse_version(self.high)
        if v is None or lo is None or hi is None:
            return False
        return lo <= v and v[:2] <= hi[:2]

    def __str__(self) -> str:
        return self.low if self.low == self.high else f"{self.low}–{self.high}"


@dataclass(frozen=True)
class Row:
    name: str  # short id: status output, test ids, on-demand application
    target: str  # "module:attr" or "module:Owner.attr"
    kind: str  # a key of KINDS
    handler: str  # "cp_engine.hooks...module:callable" (resolved only when applied)
    why: str
    remove_when: str
    feature: str = ""  # config attributes joined by "|", any one on enables it; "" = always
    signature: tuple[str, ...] = ()  # leading parameter names of the target the handler binds
    trigger: str | None = None  # module whose import applies it (None: the target's module)
    on_demand: bool = False  # applied by the adapter (``Installer.apply``), not by an import
    optional: bool = False  # absent in part of the supported range: skipped, not a failure

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"row {self.name!r}: unknown kind {self.kind!r}")
        if ":" not in self.target or ":" not in self.handler:
            raise ValueError(f"row {self.name!r}: target and handler are 'module:symbol'")

    @property
    def module(self) -> str:
        return self.target.partition(":")[0]

    @property
    def path(self) -> tuple[str, ...]:
        """Attribute path inside ``module`` (``("Owner", "attr")`` or ``("attr",)``)."""
        return tuple(self.target.partition(":")[2].split("."))

    @property
    def trigger_module(self) -> str | None:
        if self.on_demand:
            return None
        return self.trigger or self.module

    def features(self) -> tuple[str, ...]:
        return tuple(f for f in self.feature.split("|") if f)


@dataclass(frozen=True)
class Table:
    engine: str
    versions: Versions
    rows: tuple[Row, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        names = [r.name for r in self.rows]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.engine}: duplicate row names")

    def row(self, name: str) -> Row:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def as_markdown(self) -> str:
        lines = [f"{self.engine} {self.versions}: every change cp_engine makes to the host process.", "",
                 "| target | kind | binds | flag | why | remove when |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            flag = " or ".join(f"`CP_ENGINE_{f.upper()}`" for f in r.features()) or "always"
            target = f"`{r.target}`" + (" (when present)" if r.optional else "")
            binds = f"`({', '.join(r.signature)})`" if r.signature else "–"
            lines.append(f"| {target} | {r.kind} | {binds} | {flag} | {r.why} | {r.remove_when} |")
        return "\n".join(lines)
