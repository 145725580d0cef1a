"""Process-wide lazy singletons shared by every engine adapter.

Contract:
- ``config()``: ``cp_engine.config.load_config()`` parsed once per process (its
  warnings logged once);
- ``pipeline()``: one ``ContextPipeline`` per process (the API server's index), built
  on first use; every method call on it is serialised by one lock, because the
  eviction receiver thread (and SGLang's thread-pool chat path) use it concurrently
  with the request path; ``pipeline().unwrapped`` is the plain object; each call
  passes the ``index`` fault point (``hooks.faults``);
- ``instance_id()``: the name of this server instance for the local eviction channel.
  The first process that asks (the API server, before it spawns EngineCore) picks a
  fresh id and stores it with its pid in ``CP_ENGINE_INSTANCE``; children inherit the
  variable and adopt the id only when that pid is one of their ancestors, so an
  unrelated server started from the same shell (or a test runner) never shares it.
"""
from __future__ import annotations

import logging
import os
import secrets
import threading
from typing import Any

from . import faults

__all__ = ["config", "pipeline", "instance_id", "reset_for_tests", "INSTANCE_ENV"]

INSTANCE_ENV = "CP_ENGINE_INSTANCE"
logger = logging.getLogger("cp_engine.hooks")

_lock = threading.RLock()
_config: Any = None
_pipeline: Any = None
_instance: str | None = None


def config():
    global _config
    if _config is None:
        with _lock:
            if _config is None:
                from cp_engine.config import load_config

                cfg = load_config()
                for w in cfg.warnings:
                    logger.warning("cp_engine config: %s", w)
                _config = cfg
    return _config


class LockedPipeline:
    """Forwards to a ContextPipeline, holding one lock for the duration of each call."""

    def __init__(self, pipe: Any):
        self.unwrapped = pipe
        self._call_lock = threading.RLock()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.unwrapped, name)
        if not callable(attr):
            return attr
        lock = self._call_lock

        def locked(*args: Any, **kwargs: Any) -> Any:
            with lock:
                faults.check_fault("index")  # test switch: the index raises or stalls
                return attr(*args, **kwargs)

        if callable(type(self.unwrapped).__dict__.get(name)) and name not in vars(self.unwrapped):
            # A method of the class: the same bound method every time, so keep its
            # locked form; later lookups find it here without calling __getattr__.
            self.__dict__[name] = locked
        return locked


def pipeline():
    global _pipeline
    if _pipeline is None:
        with _lock:
            if _pipeline is None:
                from cp_engine.pipeline import ContextPipeline

                _pipeline = LockedPipeline(ContextPipeline(config()))
    return _pipeline


def _ancestors(limit: int = 16) -> set[int]:
    """Pids of this process's ancestors (Linux /proc; parent only elsewhere)."""
    out: set[int] = set()
    pid = os.getppid()
    for _ in range(limit):
        if pid <= 1 or pid in out:
            break
        out.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
            # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
            pid = int(stat.rsplit(")", 1)[1].split()[1])
        except Exception:
            break
    return out


def instance_id() -> str:
    global _instance
    if _instance is not None:
        return _instance
    with _lock:
        if _instance is not None:
            return _instance
        raw = os.environ.get(INSTANCE_ENV, "")
        ident, _, owner = raw.partition("@")
        adopted = False
        if ident and owner.isdigit():
            adopted = int(owner) == os.getpid() or int(owner) in _ancestors()
        if not adopted:
            ident = f"{os.getpid()}-{secrets.token_hex(4)}"
            # Set before EngineCore is spawned: spawned children inherit os.environ.
            os.environ[INSTANCE_ENV] = f"{ident}@{os.getpid()}"
        _instance = ident
        return ident


def reset_for_tests() -> None:
    global _config, _pipeline, _instance
    with _lock:
        _config = _pipeline = _instance = None
    faults.reset_breaker()
