"""Fresh-interpreter runs that tests check, started in the background as soon as the
selection is known, so that their wall time overlaps the tests before them.

A module declares one with ``name = early_run(name, make)``: ``make()`` gives the
``subprocess.run`` keyword arguments (``args``, ``env``, ``cwd``, ``timeout``) or
``None`` where the run does not apply (it then never starts). Every test whose fixture
closure holds ``name`` receives the ``CompletedProcess`` (text output captured) and
asserts on it as it would on its own ``subprocess.run``. tests/conftest.py puts the
tests that read a run last (``readers_last``), calls ``start_selected`` with the
selection and ``stop_all`` at the end.
"""
from __future__ import annotations

import os
import subprocess
import threading
from typing import Callable

import pytest

import warm_bytecode

RUNS: dict[str, Callable[[], dict | None]] = {}
# CP_TEST_EARLY_RUNS=0: no run starts ahead; each starts when its first test needs it and
# that test waits (cheaper where nothing else would overlap it, e.g. scripts/vllm_matrix.sh:
# concurrent first imports of a fresh venv each compile the same bytecode).
BACKGROUND = os.environ.get("CP_TEST_EARLY_RUNS", "1") != "0"
_started: dict[str, "_Run"] = {}
_lock = threading.Lock()


class _Run:
    def __init__(self, kwargs: dict):
        self.timeout = kwargs.pop("timeout", 600)
        self.kwargs = kwargs
        self.proc: subprocess.Popen | None = None
        self.result: subprocess.CompletedProcess | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            warm_bytecode.wait()  # most runs import vLLM: after a fresh venv's one compile
            self.proc = subprocess.Popen(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **self.kwargs)
            try:
                out, err = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, err = self.proc.communicate()
                raise subprocess.TimeoutExpired(self.kwargs["args"], self.timeout, out, err) from None
            self.result = subprocess.CompletedProcess(self.kwargs["args"], self.proc.returncode, out, err)
        except BaseException as exc:  # re-raised in the test that waits for it
            self.error = exc

    def wait(self) -> subprocess.CompletedProcess:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()


def _start(name: str) -> "_Run | None":
    with _lock:
        if name not in _started:
            kwargs = RUNS[name]()
            if kwargs is None:
                return None
            _started[name] = _Run(kwargs)
        return _started[name]


def readers_last(items: list) -> None:
    """Move the tests that read a declared run after every other test (in place,
    order otherwise kept): the runs then have the whole session to finish instead of
    the main thread sitting idle waiting for one part-way through."""
    items.sort(key=lambda item: any(name in RUNS for name in getattr(item, "fixturenames", ())))


def start_selected(items: list) -> None:
    if not BACKGROUND:
        return
    for item in items:
        for name in getattr(item, "fixturenames", ()):
            if name in RUNS:
                _start(name)


def stop_all() -> None:
    for run in list(_started.values()):
        run.stop()


def early_run(name: str, make: Callable[[], dict | None]):
    """A session fixture named ``name`` giving the finished run of ``make()``'s command
    (skipped where ``make()`` gives ``None``). Assign it to a module-level name."""
    RUNS[name] = make

    @pytest.fixture(name=name, scope="session")
    def _fixture():
        run = _start(name)
        if run is None:
            pytest.skip(f"{name} does not apply here")
        return run.wait()

    return _fixture
