"""Reversible attribute wrapping for the SGLang adapter.

Contract:
- ``wrap(owner, name, wrapper)`` replaces ``owner.name`` by a ``wrapt.FunctionWrapper``
  calling ``wrapper(wrapped, instance, args, kwargs)``; wrapping the same
  ``(owner, name)`` again is a no-op (double install never double-wraps);
- a method only inherited by ``owner`` is wrapped on ``owner`` itself, and ``unwrap``
  deletes it again (the base class is never touched);
- ``unwrap_all()`` restores every original in reverse order, so install → uninstall
  leaves the engine's classes exactly as they were.
"""
from __future__ import annotations

import threading
from typing import Any, Callable

import wrapt

__all__ = ["wrap", "unwrap", "unwrap_all", "is_wrapped", "applied"]

_MISSING = object()
_lock = threading.RLock()
# (id(owner), name) -> (owner, name, raw original from owner.__dict__ or _MISSING, wrapper)
_applied: dict[tuple[int, str], tuple[Any, str, Any, Any]] = {}


def is_wrapped(owner: Any, name: str) -> bool:
    with _lock:
        entry = _applied.get((id(owner), name))
        return entry is not None and vars(owner).get(name) is entry[3]


def wrap(owner: Any, name: str, wrapper: Callable) -> bool:
    """Wrap ``owner.name``; returns False when it was already wrapped by us."""
    with _lock:
        if is_wrapped(owner, name):
            return False
        raw = vars(owner).get(name, _MISSING)
        target = getattr(owner, name)  # raises AttributeError when the symbol moved
        if isinstance(raw, (staticmethod, classmethod)):
            raise TypeError(f"{owner!r}.{name} is a {type(raw).__name__}; not supported")
        fw = wrapt.FunctionWrapper(target if raw is _MISSING else raw, wrapper)
        setattr(owner, name, fw)
        _applied[(id(owner), name)] = (owner, name, raw, fw)
        return True


def unwrap(owner: Any, name: str) -> bool:
    with _lock:
        entry = _applied.pop((id(owner), name), None)
        if entry is None:
            return False
        _, _, raw, fw = entry
        if vars(owner).get(name) is not fw:
            return False  # someone re-patched on top of us: leave their object alone
        if raw is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, raw)
        return True


def unwrap_all() -> int:
    with _lock:
        keys = list(_applied)
        n = 0
        for owner_id, name in reversed(keys):
            owner = _applied[(owner_id, name)][0]
            n += unwrap(owner, name)
        return n


def applied() -> list[str]:
    with _lock:
        return [f"{getattr(o, '__module__', '?')}.{getattr(o, '__qualname__', o)}.{n}"
                for o, n, _, _ in _applied.values()]
