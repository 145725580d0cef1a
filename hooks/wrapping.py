"""Reversible method wrapping with wrapt, shared by the engine adapters.

Contract: ``wrap_method(owner, name, wrapper)`` replaces ``owner.<name>`` (a class or a
module; looked up in the owner's own ``__dict__``, so a subclass is never patched
through its base) with a
``wrapt.FunctionWrapper`` tagged as ours and returns True; wrapping an already wrapped
method is a no-op returning False. ``unwrap_method`` restores the original exactly.
``bind_args(wrapped, args, kwargs)`` binds a call by parameter *name* (never by
position), so a parameter added upstream does not shift what the wrapper reads;
``read_args`` reads just the named arguments the same way, for per-request wrappers.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import wrapt

TAG = "_self_cp_engine_original"  # "_self_" attributes live on the wrapt proxy, not the function


def is_wrapped(cls: type, name: str) -> bool:
    return hasattr(cls.__dict__.get(name), TAG)


def wrap_method(cls: type, name: str, wrapper: Callable[..., Any]) -> bool:
    original = cls.__dict__.get(name)
    if original is None:
        raise AttributeError(f"{getattr(cls, '__qualname__', cls.__name__)} defines no {name!r} itself")
    if hasattr(original, TAG):
        return False
    proxy = wrapt.FunctionWrapper(original, wrapper)
    setattr(proxy, TAG, original)
    setattr(cls, name, proxy)
    return True


def unwrap_method(cls: type, name: str) -> bool:
    current = cls.__dict__.get(name)
    original = getattr(current, TAG, None)
    if original is None:
        return False
    setattr(cls, name, original)
    return True


# Signatures of the wrapped callables (with where each parameter comes from), keyed by
# (function, bound or not): building one costs tens of microseconds, and the
# API-server wrappers read arguments on every request.
_Slot = tuple  # (position or None, passable by name, default or inspect.Parameter.empty)
_signatures: dict[tuple[Any, bool], tuple[inspect.Signature, dict[str, _Slot]]] = {}
_MAX_SIGNATURES = 256


def _layout(sig: inspect.Signature) -> dict[str, _Slot]:
    P = inspect.Parameter
    layout, positional = {}, True
    for i, p in enumerate(sig.parameters.values()):
        if p.kind is P.VAR_POSITIONAL:
            positional = False  # parameters after *args are keyword-only
        at = i if positional and p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD) else None
        layout[p.name] = (at, p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY), p.default)
    return layout


def _signature(wrapped: Callable[..., Any]) -> tuple[inspect.Signature, dict[str, _Slot]]:
    key = (getattr(wrapped, "__func__", wrapped), hasattr(wrapped, "__self__"))
    try:
        return _signatures[key]
    except (KeyError, TypeError):  # TypeError: an unhashable callable, never cached
        pass
    sig = inspect.signature(wrapped)
    entry = (sig, _layout(sig))
    try:
        if len(_signatures) >= _MAX_SIGNATURES:
            _signatures.clear()
        _signatures[key] = entry
    except TypeError:
        pass
    return entry


def bind_args(wrapped: Callable[..., Any], args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = _signature(wrapped)[0].bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def read_args(wrapped: Callable[..., Any], args: tuple, kwargs: dict, names: tuple[str, ...]) -> dict[str, Any]:
    """The arguments called ``names`` of a call to ``wrapped``, as ``bind_args`` would
    give them (defaults for omitted ones), without binding the whole call: a parameter's
    position comes from its name in the signature. Raises ``TypeError`` when a name is
    not a parameter or the call holds no value for it."""
    layout = _signature(wrapped)[1]
    out = {}
    for name in names:
        slot = layout.get(name)
        if slot is None:
            raise TypeError(f"{getattr(wrapped, '__qualname__', wrapped)!r} has no parameter {name!r}")
        at, by_name, default = slot
        if by_name and name in kwargs:
            out[name] = kwargs[name]
        elif at is not None and at < len(args):
            out[name] = args[at]
        elif default is not inspect.Parameter.empty:
            out[name] = default
        else:
            raise TypeError(f"missing argument {name!r}")
    return out
