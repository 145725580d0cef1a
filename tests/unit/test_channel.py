"""Unit tests for the local eviction channel (hooks/channel.py), over real ZeroMQ ipc."""
from __future__ import annotations

import json
import os
import pickle
import secrets
import shutil
import stat
import tempfile
import threading
import time

import pytest

zmq = pytest.importorskip("zmq")

from cp_engine.hooks import channel, metrics  # noqa: E402


@pytest.fixture
def runtime_dir(monkeypatch):
    # Short base path: ipc socket paths are limited to ~100 bytes.
    base = tempfile.mkdtemp(prefix="cpch", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def ident():
    return f"t-{secrets.token_hex(4)}"


class Collector:
    def __init__(self) -> None:
        self.msgs: list[dict] = []
        self.lock = threading.Lock()

    def __call__(self, msg: dict) -> None:
        with self.lock:
            self.msgs.append(msg)

    def wait_for(self, n: int, timeout: float = 10.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.msgs) >= n:
                    return list(self.msgs)
            time.sleep(0.01)
        with self.lock:
            return list(self.msgs)


def _socket_inodes() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(target[len("socket:["):-1])
    return out


def _inet_inodes() -> set[str]:
    out = set()
    for name in ("tcp", "tcp6", "udp", "udp6"):
        try:
            with open(f"/proc/net/{name}") as f:
                next(f)
                for line in f:
                    out.add(line.split()[9])
        except OSError:
            pass
    return out


def test_round_trip_private_ipc_socket_and_no_inet(runtime_dir, ident):
    before = _socket_inodes()
    got = Collector()
    recv = channel.Receiver(ident, got).start()
    sender = channel.Sender(ident)
    try:
        d = os.path.dirname(recv.path)
        assert stat.S_IMODE(os.lstat(d).st_mode) == 0o700
        assert stat.S_ISSOCK(os.lstat(recv.path).st_mode)
        assert stat.S_IMODE(os.lstat(recv.path).st_mode) == 0o600
        assert recv._sock.getsockopt(zmq.LAST_ENDPOINT).decode() == f"ipc://{recv.path}"
        # Sender is in the same process but must be exercised over the socket here.
        channel._local_receivers.pop(ident)
        ids = [0xFFFF_FFFF_FFFF_FFFF, 1, 0xDEADBEEF]
        assert sender.send({"op": "evict_path", "ns": "n1", "path": channel.hex_ids(ids)})
        assert sender.send({"op": "evict", "rid": "r1", "from": 256})
        assert sender.send({"op": "reset"})
        msgs = got.wait_for(3)
        assert msgs == [
            {"op": "evict_path", "ns": "n1", "path": ids},
            {"op": "evict", "rid": "r1", "from": 256},
            {"op": "reset"},
        ]
        new = _socket_inodes() - before
        assert new and not (new & _inet_inodes())  # ipc only: no TCP/UDP socket opened
    finally:
        sender.close()
        recv.stop()
    assert not os.path.exists(recv.path)


def test_malformed_messages_are_ignored_and_counted(runtime_dir, ident):
    got = Collector()
    recv = channel.Receiver(ident, got).start()
    ctx = zmq.Context()
    raw = ctx.socket(zmq.PUSH)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(f"ipc://{recv.path}")
    bad = [
        b"not json",
        b"\xff\xfe",
        pickle.dumps({"v": 1, "op": "reset"}),  # never unpickled
        json.dumps([1, 2]).encode(),
        json.dumps({"v": 2, "op": "reset"}).encode(),
        json.dumps({"v": 1, "op": "rm -rf"}).encode(),
        json.dumps({"v": 1, "op": "evict_path", "ns": "x", "path": ["XYZ"]}).encode(),
        json.dumps({"v": 1, "op": "evict_path", "ns": "x", "path": []}).encode(),
        json.dumps({"v": 1, "op": "evict_path", "ns": 3, "path": ["00" * 8]}).encode(),
        json.dumps({"v": 1, "op": "evict_paths", "items": []}).encode(),
        json.dumps({"v": 1, "op": "evict_paths", "items": [["x", ["00" * 8]], ["y"]]}).encode(),
        json.dumps({"v": 1, "op": "evict_paths", "items": [["x", ["00" * 8]], ["y", ["XYZ"]]]}).encode(),
        json.dumps({"v": 1, "op": "evict_paths", "items": [["x", []], ["y", ["00" * 8]]]}).encode(),
        json.dumps({"v": 1, "op": "evict", "rid": "r", "from": -1}).encode(),
        json.dumps({"v": 1, "op": "evict", "rid": "r", "from": True}).encode(),
        json.dumps({"v": 1, "op": "metrics", "items": [["x", {}, "NaN"]]}).encode(),
    ]
    before = metrics.value("channel_malformed")
    try:
        for b in bad:
            raw.send(b)
        raw.send(channel.encode({"op": "reset"}))  # a good one after the garbage
        msgs = got.wait_for(1)
        deadline = time.monotonic() + 10
        while recv.received < len(bad) + 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert msgs == [{"op": "reset"}]
        assert metrics.value("channel_malformed") - before == len(bad)
    finally:
        raw.close(0)
        ctx.term()
        recv.stop()


def test_parse_limits_without_a_socket():
    big = b'{"v":1,"op":"reset","pad":"' + b"x" * channel.MAX_MESSAGE_BYTES + b'"}'
    assert channel.parse_message(big) is None
    too_deep = {"v": 1, "op": "evict_path", "ns": "", "path": ["0" * 16] * (channel.MAX_PATH + 1)}
    assert channel.parse_message(too_deep) is None
    too_many = {"v": 1, "op": "evict_paths", "items": [["", ["0" * 16]]] * (channel.MAX_BATCH_PATHS + 1)}
    assert channel.parse_message(too_many) is None
    too_long = {"v": 1, "op": "evict_paths", "items": [["", ["0" * 16] * (channel.MAX_PATH // 2 + 1)]] * 2}
    assert channel.parse_message(too_long) is None
    ok = channel.parse_message(channel.encode({"op": "metrics", "items": [["evictions_applied", {"a": "b"}, 2]]}))
    assert ok == {"op": "metrics", "items": [("evictions_applied", {"a": "b"}, 2)]}


def test_sender_never_blocks_without_or_with_a_stuck_receiver(runtime_dir, ident):
    sender = channel.Sender(ident, hwm=8)
    ctx = zmq.Context()
    stuck = ctx.socket(zmq.PULL)  # bound, never reading
    stuck.setsockopt(zmq.RCVHWM, 8)
    stuck.setsockopt(zmq.LINGER, 0)
    try:
        assert not any(sender.send({"op": "reset"}) for _ in range(100))  # no receiver at all
        assert sender.dropped == 100
        stuck.bind(f"ipc://{channel.socket_path(ident, '1')}")
        sender._next_refresh = 0.0  # look for receivers now
        results = [sender.send({"op": "reset"}) for _ in range(5000)]
        assert any(results) and not all(results)  # bounded buffers: the rest dropped
        assert sender.sent + sender.dropped == 5100
    finally:
        sender.close()
        stuck.close(0)
        ctx.term()


def test_late_and_multiple_receivers_are_found(runtime_dir, ident):
    sender = channel.Sender(ident, refresh_s=0.0)
    first, second = Collector(), Collector()
    recvs = []
    try:
        assert not sender.send({"op": "evict", "rid": "early", "from": 0})  # nobody yet: dropped
        # Tags name live processes: a receiver deletes files of dead ones.
        for tag, got in ((str(os.getpid()), first), (str(os.getppid()), second)):
            recvs.append(channel.Receiver(ident, got, tag=tag).start())
            channel._local_receivers.pop(ident)  # force the socket path
        assert sender.send({"op": "reset"})
        assert first.wait_for(1) == [{"op": "reset"}] and second.wait_for(1) == [{"op": "reset"}]
        # Counters go to one API server only, or /metrics would count them twice.
        assert sender.send({"op": "metrics", "items": [["x", {}, 1]]})
        deadline = time.monotonic() + 10
        while len(first.msgs) + len(second.msgs) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)  # a second copy, if any, would arrive by now
        assert sum(m["op"] == "metrics" for m in first.msgs + second.msgs) == 1
    finally:
        sender.close()
        for r in recvs:
            r.stop()


def test_receiver_removes_files_of_dead_receivers(runtime_dir, ident):
    dead = 4_000_000  # above the default pid_max: never a live process
    assert not channel._pid_alive(dead)
    stale = channel.socket_path(ident, str(dead))
    open(stale, "w").close()
    recv = channel.Receiver(ident, Collector()).start()
    try:
        assert not os.path.exists(stale) and os.path.exists(recv.path)
    finally:
        recv.stop()


def test_in_process_delivery_and_apply_failures_do_not_stop_the_thread(runtime_dir, ident):
    seen = Collector()

    def apply(msg):
        if msg["op"] == "evict":
            raise RuntimeError("index bug")
        seen(msg)

    recv = channel.Receiver(ident, apply).start()
    sender = channel.Sender(ident)
    try:
        assert sender.send({"op": "evict", "rid": "r", "from": 1})
        assert sender.send({"op": "evict_path", "ns": "", "path": channel.hex_ids([7])})
        assert seen.wait_for(1) == [{"op": "evict_path", "ns": "", "path": [7]}]
        assert recv.failed == 1 and sender._ctx is None  # never touched zmq
    finally:
        sender.close()
        recv.stop()


def test_unsafe_socket_directory_is_refused(runtime_dir, ident):
    elsewhere = tempfile.mkdtemp(prefix="cpx", dir="/tmp")
    try:
        os.symlink(elsewhere, os.path.join(runtime_dir, f"cp_engine-{os.getuid()}"))
        with pytest.raises(channel.ChannelError):
            channel.socket_path(ident)
        sender = channel.Sender(ident)
        assert not sender.send({"op": "reset"})  # fails open, never raises
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)
    with pytest.raises(channel.ChannelError):
        channel.socket_path("../escape")


def test_apply_to_pipeline_uses_the_pipeline_contract():
    from cp_engine.pipeline import ContextPipeline

    pipe = ContextPipeline()
    blocks = ["alpha " * 50, "beta " * 50, "gamma " * 50]
    prep = pipe.prepare(blocks, namespace="ns")
    pipe.commit("r1", prep)
    path = prep.index_path()
    assert pipe.index.match_length(path, namespace="ns") == 3
    apply = channel.apply_to_pipeline(pipe)
    apply(channel.parse_message(channel.encode({"op": "evict_path", "ns": "ns", "path": channel.hex_ids(path[:2])})))
    assert pipe.index.match_length(path, namespace="ns") == 1
    apply({"op": "reset"})
    assert pipe.index.match_length(path, namespace="ns") == 0


def test_eviction_messages_keep_order_and_caps():
    one = [("a", channel.hex_ids([1, 2]))]
    assert channel.eviction_messages(one) == [{"op": "evict_path", "ns": "a", "path": channel.hex_ids([1, 2])}]
    items = [(f"ns{i}", channel.hex_ids(range(i + 1))) for i in range(channel.MAX_BATCH_PATHS + 3)]
    msgs = channel.eviction_messages(items)
    got = []
    for m in msgs:  # every message is one a receiver accepts, and the pairs come back in order
        parsed = channel.parse_message(channel.encode(m))
        assert parsed is not None, m["op"]
        assert len(channel.encode(m)) <= channel.MAX_MESSAGE_BYTES
        got += parsed["items"] if parsed["op"] == "evict_paths" else [(parsed["ns"], parsed["path"])]
    assert got == [(ns, [int(h, 16) for h in path]) for ns, path in items]
    assert all(sum(len(p) for _, p in m.get("items", [])) <= channel.MAX_PATH for m in msgs)


def test_apply_evict_paths_removes_each_path():
    from cp_engine.pipeline import ContextPipeline

    pipe = ContextPipeline()
    preps = []
    for name in ("one", "two"):
        prep = pipe.prepare([f"{name} {i} " * 40 for i in range(3)], namespace="ns")
        pipe.commit(name, prep)
        preps.append(prep.index_path())
    before = metrics.value("evictions_applied")
    apply = channel.apply_to_pipeline(pipe)
    apply(channel.parse_message(channel.encode(
        {"op": "evict_paths", "items": [["ns", channel.hex_ids(preps[0][:2])], ["ns", channel.hex_ids(preps[1][:1])]]})))
    assert pipe.index.match_length(preps[0], namespace="ns") == 1
    assert pipe.index.match_length(preps[1], namespace="ns") == 0
    assert metrics.value("evictions_applied") - before == 2


class _HeldTimer:
    """A trailing-flush timer that never fires: the test drives every flush itself."""

    def __init__(self, delay, fn):
        self.daemon = False

    def start(self):
        pass


def test_metrics_forwarder_sends_deltas_at_most_once_per_interval(runtime_dir, ident):
    got = Collector()
    recv = channel.Receiver(ident, got).start()
    channel._local_receivers.pop(ident)  # as if the receiver lived in the API server process
    sender = channel.Sender(ident)
    now = [0.0]
    fwd = channel.MetricsForwarder(sender, interval_s=1.0, clock=lambda: now[0], timer=_HeldTimer)
    try:
        metrics.inc("fwd_test_counter", 3, hook="x")
        assert fwd.maybe_flush()
        assert not fwd.maybe_flush()  # inside the interval: nothing sent
        now[0] = 5.0
        assert not fwd.maybe_flush()  # nothing changed: nothing sent
        metrics.inc("fwd_test_counter", 2, hook="x")
        now[0] = 10.0
        assert fwd.maybe_flush()
        msgs = got.wait_for(2)
        sent = [(n, l, v) for m in msgs for (n, l, v) in m["items"] if n == "fwd_test_counter"]
        assert sent == [("fwd_test_counter", {"hook": "x"}, 3), ("fwd_test_counter", {"hook": "x"}, 2)]
        channel._local_receivers[ident] = recv  # same process: counters are shared, never forwarded
        metrics.inc("fwd_test_counter", 1, hook="x")
        now[0] = 20.0
        assert not fwd.maybe_flush()
    finally:
        sender.close()
        recv.stop()


def test_increments_inside_the_interval_reach_metrics_without_another_call(runtime_dir, ident):
    """Traffic that stops inside the interval: one trailing flush at its end sends what
    the last calls counted, with no further call (a scrape after a burst is not stale)."""
    got = Collector()
    recv = channel.Receiver(ident, got).start()
    channel._local_receivers.pop(ident)  # as if the receiver lived in the API server process
    sender = channel.Sender(ident)
    now, timers = [0.0], []

    class Timer:  # runs when the test says so
        def __init__(self, delay, fn):
            self.delay, self.fn, self.daemon = delay, fn, False
            timers.append(self)

        def start(self):
            assert self.daemon  # never keeps the engine process alive

    fwd = channel.MetricsForwarder(sender, interval_s=1.0, clock=lambda: now[0], timer=Timer)
    try:
        metrics.inc("fwd_trailing_counter", 1)
        assert fwd.maybe_flush() and not timers
        now[0] = 0.25
        metrics.inc("fwd_trailing_counter", 4)
        assert not fwd.maybe_flush()
        now[0] = 0.5
        assert not fwd.maybe_flush()  # one timer per interval, however many calls
        assert [t.delay for t in timers] == [0.75]
        now[0] = 1.0
        timers[0].fn()
        msgs = got.wait_for(2)
        sent = [v for m in msgs for (n, _, v) in m["items"] if n == "fwd_trailing_counter"]
        assert sent == [1, 4]
        now[0] = 1.5
        assert not fwd.maybe_flush() and len(timers) == 2  # the trailing flush opened a new interval
    finally:
        sender.close()
        recv.stop()


def test_receiver_applies_in_batches_after_a_wakeup(runtime_dir, ident):
    """After a wake-up that found messages the thread waits ``gap_ms`` before it looks
    again: what arrives meanwhile is applied together, one wake-up for all of it."""
    got = Collector()
    recv = channel.Receiver(ident, got, gap_ms=2000).start()
    channel._local_receivers.pop(ident)  # over the socket, as from EngineCore
    sender = channel.Sender(ident)
    try:
        assert sender.send({"op": "evict", "rid": "r0", "from": 0})
        assert len(got.wait_for(1)) == 1
        for i in range(1, 6):
            assert sender.send({"op": "evict", "rid": f"r{i}", "from": 0})
            time.sleep(0.05)
        # Inside the window nothing more is applied (r1 at most, had it come before
        # the first wake-up's drain ended).
        assert len(got.msgs) <= 2
        msgs = got.wait_for(6)
        assert [m["rid"] for m in msgs] == [f"r{i}" for i in range(6)]
        assert recv.wakeups == 2
    finally:
        sender.close()
        recv.stop()
    # Stopping does not wait out the window.
    t = time.monotonic()
    recv2 = channel.Receiver(ident, got, gap_ms=60_000).start()
    channel._local_receivers.pop(ident)
    sender = channel.Sender(ident)
    try:
        assert sender.send({"op": "reset"})
        assert len(got.wait_for(7)) == 7
    finally:
        sender.close()
        recv2.stop()
    assert time.monotonic() - t < 30 and not recv2._thread.is_alive()


def test_idle_receiver_sleeps_until_a_socket_or_in_process_message_wakes_it(runtime_dir, ident):
    """Between windows the thread waits without a timeout: an idle receiver makes no
    passes at all, and a message on the socket or in the in-process queue (which
    writes a wake-up byte) is applied at once."""
    got = Collector()
    recv = channel.Receiver(ident, got, gap_ms=0).start()
    local = channel._local_receivers.pop(ident)
    sender = channel.Sender(ident)
    try:
        time.sleep(0.2)
        idle_passes = recv.passes
        time.sleep(1.0)
        assert recv.passes == idle_passes  # no timed polls while nothing arrives
        t = time.monotonic()
        assert sender.send({"op": "evict", "rid": "socket", "from": 0})
        assert len(got.wait_for(1)) == 1 and time.monotonic() - t < 3.0
        channel._local_receivers[ident] = local  # an in-process sender from here on
        time.sleep(0.2)
        t = time.monotonic()
        assert sender.send({"op": "evict", "rid": "local", "from": 0})
        assert len(got.wait_for(2)) == 2 and time.monotonic() - t < 3.0
        assert [m["rid"] for m in got.msgs] == ["socket", "local"]
    finally:
        sender.close()
        recv.stop()
    assert not recv._thread.is_alive()
    with pytest.raises(OSError):  # the wake-up pair is closed with the receiver
        recv._wake_w.send(b"x")
    assert recv.deliver_local({"op": "reset"})  # a late in-process sender neither raises nor blocks


def test_stop_wakes_a_sleeping_receiver_at_once(runtime_dir, ident):
    recv = channel.Receiver(ident, Collector(), gap_ms=0).start()
    time.sleep(0.2)  # asleep in its untimed wait
    t = time.monotonic()
    recv.stop()
    assert not recv._thread.is_alive() and time.monotonic() - t < 1.5


def test_flush_ends_the_window_and_returns_once_held_messages_are_applied(runtime_dir, ident):
    got = Collector()
    recv = channel.Receiver(ident, got, gap_ms=60_000).start()
    channel._local_receivers.pop(ident)
    sender = channel.Sender(ident)
    try:
        recv.flush()  # nothing held back: returns at once
        assert sender.send({"op": "evict", "rid": "first", "from": 0})
        assert len(got.wait_for(1)) == 1
        deadline = time.monotonic() + 10
        while not recv._in_window and time.monotonic() < deadline:
            time.sleep(0.01)
        assert recv._in_window  # the thread now waits out a 60 s window
        assert sender.send({"op": "evict", "rid": "held", "from": 0})
        time.sleep(0.3)
        assert len(got.msgs) == 1
        t = time.monotonic()
        recv.flush()
        assert [m["rid"] for m in got.msgs] == ["first", "held"] and time.monotonic() - t < 5.0
    finally:
        sender.close()
        recv.stop()
