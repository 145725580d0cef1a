"""The live-server pool's schedule (tests/server_pool.py) with a stand-in server class:
starts in order of first use, at most ``STARTING`` at once, each configuration once,
stopped after its last planned test; ``take`` and ``prepare``."""
from __future__ import annotations

import threading
import time

import pytest

import server_pool as sp


class _Server:
    """Stand-in for ``VllmServer``: a start that takes a moment, a record of calls."""

    events: list = []
    lock = threading.Lock()
    running = 0
    most_running = 0

    def __init__(self, model_dir, name, **kwargs):
        self.name, self.kwargs, self.up = name, kwargs, False

    def start(self, timeout):
        with _Server.lock:
            _Server.running += 1
            _Server.most_running = max(_Server.most_running, _Server.running)
            _Server.events.append(("start", self.name))
        time.sleep(0.05)
        with _Server.lock:
            _Server.running -= 1
        self.up = True

    def stop(self):
        if self.up:
            _Server.events.append(("stop", self.name))
        self.up = False


class _Item:
    def __init__(self, nodeid, fixturenames):
        self.nodeid, self.fixturenames = nodeid, fixturenames


@pytest.fixture
def pool(monkeypatch):
    monkeypatch.setattr(sp, "VllmServer", _Server)
    monkeypatch.setattr(sp, "tiny_model_dir", lambda: "model")
    monkeypatch.setattr(sp, "vllm_available", lambda: True)
    monkeypatch.setattr(sp, "CONFIGS", {name: {} for name in "abcde"})
    monkeypatch.setattr(sp, "PREPARE", {})
    monkeypatch.setattr(sp, "STARTING", 2)
    monkeypatch.setattr(sp, "LIMIT", 4)
    _Server.events, _Server.running, _Server.most_running = [], 0, 0
    p = sp._Pool()
    yield p
    p.stop_all()


ITEMS = [_Item("t0", []), _Item("t1", ["a"]), _Item("t2", ["b", "a"]), _Item("t3", ["c"]),
         _Item("t4", ["d"]), _Item("t5", ["e", "a"]), _Item("t6", ["e"])]


def _run(pool, items, during=None):
    pool.plan(items)
    for item in items:
        for name in item.fixturenames:
            assert pool.get(name).up, (item.nodeid, name)
        if during:
            during(item)
        pool.done(item.nodeid)


def test_each_configuration_starts_once_in_first_use_order_and_stops_after_its_last_test(pool):
    stops_at = {}
    _run(pool, ITEMS, during=lambda item: stops_at.update(
        {n: item.nodeid for kind, n in _Server.events if kind == "stop" and n not in stops_at}))
    starts = [n for kind, n in _Server.events if kind == "start"]
    assert starts == list("abcde")
    assert _Server.most_running <= 2
    # a stop seen during test tN happened in done() of an earlier test: b after t2, c after t3, ...
    assert stops_at == {"b": "t3", "c": "t4", "d": "t5", "a": "t6"}
    assert {n for kind, n in _Server.events if kind == "stop"} == set("abcde")


def test_no_more_than_limit_alive(pool, monkeypatch):
    monkeypatch.setattr(sp, "LIMIT", 2)
    alive = []
    _run(pool, ITEMS, during=lambda item: alive.append(
        sum(1 for s in pool.slots.values() if not s.stopped)))
    assert max(alive) <= 2


def test_take_hands_over_the_pool_server_at_its_last_use_only(pool):
    taken = {}

    def during(item):
        if item.nodeid == "t2":  # a later test (t5) still uses a: a fresh server
            taken["early"] = pool.take("a", "t2")
        if item.nodeid == "t5":
            taken["last"] = pool.take("a", "t5")

    _run(pool, ITEMS, during=during)
    assert taken["last"] is pool.slots["a"].server and taken["last"].up  # the pool left it running
    assert taken["early"] is not taken["last"] and taken["early"].up
    assert ("stop", "a") not in _Server.events


def test_prepare_runs_before_the_start_and_sets_the_servers_attributes(pool, monkeypatch):
    seen = {}

    def prepare(workdir):
        seen["dir"] = workdir
        seen["started_before"] = ("start", "c") in _Server.events
        return {"python": "/venv/bin/python"}, {"checked": True}

    monkeypatch.setitem(sp.PREPARE, "c", prepare)
    _run(pool, ITEMS)
    srv = pool.slots["c"].server
    assert seen["started_before"] is False and ("start", "c") in _Server.events
    assert srv.python == "/venv/bin/python" and srv.prepared == {"checked": True}
    assert seen["dir"] and not __import__("os").path.exists(seen["dir"])  # removed with the server


def test_a_failed_prepare_fails_the_test_that_waits(pool, monkeypatch):
    def prepare(workdir):
        raise AssertionError("probe said the hook is still there")

    monkeypatch.setitem(sp.PREPARE, "a", prepare)
    pool.plan(ITEMS[:2])
    with pytest.raises(RuntimeError, match="probe said the hook is still there"):
        pool.get("a")
