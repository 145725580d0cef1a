"""One installer for every engine: applies and undoes the rows of a patch table.

Contract (``Installer(table, wanted)``, ``wanted(row) -> bool`` reads the feature flags):
- ``patch(version)`` returns False, changing nothing, when ``table.versions`` does not
  admit ``version``; otherwise it registers one wrapt post-import hook per trigger
  module of the wanted rows, so a row is applied at once when its module is already
  imported (import-then-patch) or right after the import (patch-then-import);
- ``apply(name)`` applies an on-demand row (the adapter knows when its moment came);
- applying a row is idempotent and fails open: a route whose server module is not
  imported in this process is skipped quietly; a target that is missing or whose
  leading parameters differ from ``row.signature`` (drift) is skipped, logged once
  and counted; an optional row's absent target is only noted. Nothing is wrapped twice;
- a handler module may define ``on_patch()`` / ``on_unpatch()``: called once before
  its first row is applied and once after its rows are undone;
- ``unpatch()`` undoes every applied row in reverse order and turns pending hooks into
  no-ops; ``patch()`` afterwards applies again;
- ``status()``: ``{"enabled", "installed": [row names], "skipped": {name: reason}}``;
- ``drift(row)``: None when the target exists with the expected leading parameters,
  else what differs (drift tests and the skip above share it).
"""
from __future__ import annotations

import importlib
import inspect
import sys
import threading
from typing import Any, Callable

from . import faults, wrapping
from .ledger import Row, Table

__all__ = ["Installer", "target_of", "drift"]

Undo = Callable[[], Any]


def target_of(row: Row) -> tuple[Any, str]:
    """(owner, attribute name) of ``row``'s target; imports the target's module, except
    for a route: a route lives on a running server's app, whose module is imported by
    then (``ImportError`` otherwise, never a server module imported by us)."""
    if row.kind == "route":
        owner: Any = sys.modules.get(row.module)
        if owner is None:
            raise ImportError(f"{row.module} is not imported (no server in this process)", name=row.module)
    else:
        owner = importlib.import_module(row.module)
    *owners, attr = row.path
    for part in owners:
        owner = getattr(owner, part)
    return owner, attr


def _original(owner: Any, attr: str) -> Any:
    raw = vars(owner).get(attr) if hasattr(owner, "__dict__") else None
    if raw is None:
        raw = getattr(owner, attr)
    return getattr(raw, wrapping.TAG, raw)  # ours already: look at what it wraps


def drift(row: Row) -> str | None:
    """What moved upstream for ``row`` (None: target present, signature as declared)."""
    try:
        owner, attr = target_of(row)
        fn = _original(owner, attr)
    except (ImportError, AttributeError) as exc:
        return f"{row.target} not found: {exc}"
    if row.kind in ("method", "factory"):
        if row.kind == "method" and attr not in vars(owner):
            return f"{row.target} is not defined on its class itself"
        if not callable(fn):
            return f"{row.target} is not callable"
    if row.signature:
        try:
            params = tuple(inspect.signature(fn).parameters)
        except (TypeError, ValueError) as exc:
            return f"{row.target}: no signature ({exc})"
        if params[:len(row.signature)] != row.signature:
            return f"{row.target}{params} no longer starts with {row.signature}"
    return None


class Installer:
    """Applies one engine's table in this process (see module contract)."""

    def __init__(self, table: Table, wanted: Callable[[Row], bool]) -> None:
        self.table = table
        self._wanted = wanted
        self._lock = threading.RLock()
        self._enabled = False
        self._registered: set[str] = set()  # trigger modules with a post-import hook
        self._applied: dict[str, Undo] = {}  # row name -> undo, in apply order
        self._modules: dict[str, Any] = {}  # handler modules whose on_patch ran
        self._skipped: dict[str, str] = {}
        self._applying: set[str] = set()  # importing a handler may fire other hooks: no re-entry

    # -- switching on and off ----------------------------------------------------
    def patch(self, version: str | None) -> bool:
        from wrapt import register_post_import_hook

        if not self.table.versions.admits(version):
            return False
        with self._lock:
            if self._enabled:
                return True
            self._enabled = True
            for row in self.table.rows:
                if not self._wanted(row):
                    self._skipped[row.name] = f"feature {row.feature} off"
            triggers = sorted({r.trigger_module for r in self.table.rows if r.trigger_module})
            for name in triggers:
                if name in self._registered:  # hook from an earlier patch(): fire it by hand
                    if name in sys.modules:
                        self._on_import(sys.modules[name])
                    continue
                self._registered.add(name)
                register_post_import_hook(self._on_import, name)
            return True

    def unpatch(self) -> int:
        """Undo every applied row (reverse order); returns how many were undone."""
        with self._lock:
            self._enabled = False
            undone = 0
            for name in reversed(list(self._applied)):
                undo = self._applied.pop(name)
                try:
                    undo()
                    undone += 1
                except Exception as exc:
                    faults.record_failure(f"unpatch.{name}", exc)
            for mod in reversed(list(self._modules.values())):
                hook = getattr(mod, "on_unpatch", None)
                if hook is not None:
                    faults.call_guarded("unpatch.on_unpatch", hook)
            self._modules.clear()
            self._skipped.clear()
            return undone

    @property
    def enabled(self) -> bool:
        return self._enabled

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"enabled": self._enabled, "installed": list(self._applied), "skipped": dict(self._skipped)}

    def applied(self, name: str) -> bool:
        return name in self._applied

    # -- applying rows -----------------------------------------------------------------
    def _on_import(self, module: Any) -> None:
        """Post-import hook: apply every wanted row triggered by ``module``."""
        with self._lock:
            if not self._enabled:
                return
            for row in self.table.rows:
                if row.trigger_module == module.__name__:
                    self._apply(row)

    def apply(self, name: str) -> bool:
        """Apply one row now (on-demand rows); True when it is applied."""
        with self._lock:
            if not self._enabled:
                return False
            return self._apply(self.table.row(name))

    def _apply(self, row: Row) -> bool:
        if row.name in self._applied:
            return True
        if row.name in self._applying or not self._wanted(row):
            return False
        self._applying.add(row.name)
        try:
            return self._apply_now(row)
        finally:
            self._applying.discard(row.name)

    def _apply_now(self, row: Row) -> bool:
        if row.kind == "route" and row.module not in sys.modules:
            self._skipped[row.name] = "no server in this process"
            return False
        try:
            faults.check_fault(f"install.{row.name}")
            moved = drift(row)
            if moved is not None:
                if row.optional:
                    self._skipped[row.name] = "absent in this version"
                else:
                    self._skipped[row.name] = moved
                    faults.log_once(f"drift:{row.target}", "cp_engine: %s; that patch stays off", moved)
                    faults.record_failure(f"install.{row.name}", RuntimeError(moved))
                return False
            mod_name, _, fn_name = row.handler.partition(":")
            module = importlib.import_module(mod_name)
            handler = getattr(module, fn_name)
            if mod_name not in self._modules:
                hook = getattr(module, "on_patch", None)
                if hook is not None:
                    hook()
                self._modules[mod_name] = module
            undo = self._change(row, handler)
        except Exception as exc:
            self._skipped[row.name] = f"failed: {exc!r}"
            faults.record_failure(f"install.{row.name}", exc)
            return False
        if undo is None:
            self._skipped[row.name] = "nothing to change"
            return False
        self._applied[row.name] = undo
        self._skipped.pop(row.name, None)
        return True

    @staticmethod
    def _change(row: Row, handler: Callable[..., Any]) -> Undo | None:
        owner, attr = target_of(row)
        if row.kind in ("method", "factory"):
            wrapping.wrap_method(owner, attr, handler)  # False: ours already (reload): adopt it
            return lambda: wrapping.unwrap_method(owner, attr)
        # route / registry / service: the handler makes the change and returns its undo.
        return handler(getattr(owner, attr))
