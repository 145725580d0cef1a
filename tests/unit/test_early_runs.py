"""tests/early_runs.py: a declared run starts once when a selected test needs it, gives
the finished ``CompletedProcess``; a run that does not apply never starts; the tests
reading a run go last."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

import early_runs


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(early_runs, "RUNS", {})
    monkeypatch.setattr(early_runs, "_started", {})
    yield
    early_runs.stop_all()


class _Item:
    def __init__(self, *fixturenames):
        self.fixturenames = fixturenames


def _python(code: str, timeout: float = 60) -> dict:
    return {"args": [sys.executable, "-c", code], "timeout": timeout}


def test_started_once_for_the_selection_and_waited_for(registry):
    made = []
    early_runs.early_run("echo_run", lambda: made.append(1) or _python("print('hi'); import sys; sys.exit(3)"))
    early_runs.early_run("unused_run", lambda: made.append(2) or _python("print('never')"))
    early_runs.start_selected([_Item("echo_run", "tmp_path"), _Item("echo_run")])
    assert made == [1] and set(early_runs._started) == {"echo_run"}
    out = early_runs._start("echo_run").wait()
    assert isinstance(out, subprocess.CompletedProcess)
    assert out.returncode == 3 and out.stdout == "hi\n"


def test_a_run_that_does_not_apply_never_starts(registry):
    early_runs.early_run("no_run", lambda: None)
    early_runs.start_selected([_Item("no_run")])
    assert early_runs._start("no_run") is None and early_runs._started == {}


def test_timeout_is_raised_in_the_waiting_test_and_stop_all_kills(registry):
    early_runs.early_run("slow_run", lambda: _python("import time; time.sleep(30)", timeout=0.5))
    early_runs.early_run("long_run", lambda: _python("import time; time.sleep(30)"))
    early_runs.start_selected([_Item("slow_run", "long_run")])
    with pytest.raises(subprocess.TimeoutExpired):
        early_runs._start("slow_run").wait()
    long_run = early_runs._started["long_run"]
    deadline = time.monotonic() + 10
    while long_run.proc is None and time.monotonic() < deadline:
        time.sleep(0.01)
    early_runs.stop_all()
    assert long_run.wait().returncode != 0  # killed, not left running


def test_readers_of_a_run_go_last_in_their_order(registry):
    early_runs.early_run("a_run", lambda: None)
    early_runs.early_run("b_run", lambda: None)
    items = [_Item("b_run"), _Item("tmp_path"), _Item("a_run", "tmp_path"), _Item(), _Item("tmp_path")]
    order = list(items)
    early_runs.readers_last(items)
    assert items == [order[1], order[3], order[4], order[0], order[2]]


def test_with_background_runs_off_a_run_starts_when_its_test_asks(registry, monkeypatch):
    monkeypatch.setattr(early_runs, "BACKGROUND", False)
    early_runs.early_run("late_run", lambda: _python("print('late')"))
    early_runs.start_selected([_Item("late_run")])
    assert early_runs._started == {}
    assert early_runs._start("late_run").wait().stdout == "late\n"
