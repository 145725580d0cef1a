"""Reversible method wrapping with wrapt, shared by the engine adapters.

Contract: ``wrap_method(owner, name, wrapper)`` replaces ``owner.<name>`` (a class or a
module; looked up in the owner's own ``__dict__``, so a subclass is never patched
through its base) with a
``wrapt.FunctionWrapper`` tagged as ours and returns True; wrapping an already wrapped
method is a no-op returning False. ``unwrap_method`` restores the original exactly.
``bind_args(wrapped, args, kwargs)`` binds a call by parameter *name* (never by
position), so a parameter added upstream does not shift what the wrapper reads.
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


# Signatures of the wrapped callables, keyed by (function, bound or not): building one
# costs tens of microseconds, and the API-server wrappers bind on every request.
_signatures: dict[tuple[Any, bool], inspect.Signature] = {}
_MAX_SIGNATURES = 256


def _signature(wrapped: Callable[..., Any]) -> inspect.Signature:
    key = (getattr(wrapped, "__func__", wrapped), hasattr(wrapped, "__self__"))
    try:
        return _signatures[key]
    except (KeyError, TypeError):  # TypeError: an unhashable callable, never cached
        pass
    sig = inspect.signature(wrapped)
    try:
        if len(_signatures) >= _MAX_SIGNATURES:
            _signatures.clear()
        _signatures[key] = sig
    except TypeError:
        pass
    return sig


def bind_args(wrapped: Callable[..., Any], args: tuple, kwargs: dict) -> inspect.BoundArguments:
    bound = _signature(wrapped).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound
