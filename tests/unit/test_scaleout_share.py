"""The ``record`` message that shares admitted block paths among the API servers of one
instance (hooks/channel.py), over real ZeroMQ ipc; no engine."""
from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import threading
import time

import pytest

pytest.importorskip("zmq")

from cp_engine.hooks import channel  # noqa: E402
from cp_engine.pipeline import ContextPipeline  # noqa: E402

PATH = [0x1234, 0xFFFFFFFFFFFFFFFF, 7]
RECORD = {"op": "record", "ns": "ns", "rid": "r-1", "path": channel.hex_ids(PATH), "ends": [40, 90, 90]}


@pytest.fixture
def runtime_dir(monkeypatch):
    base = tempfile.mkdtemp(prefix="cpsh", dir="/tmp")  # ipc paths are short
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def test_a_record_message_round_trips():
    msg = channel.parse_message(channel.encode(RECORD))
    assert msg == {"op": "record", "ns": "ns", "rid": "r-1", "path": PATH, "ends": [40, 90, 90]}


@pytest.mark.parametrize("change", [
    {"ends": [40, 90]},  # one end per block
    {"ends": [90, 40, 100]},  # ends never decrease
    {"ends": [-1, 2, 3]},
    {"ends": [1.5, 2, 3]},
    {"path": []},
    {"path": ["xyz", "0", "1"]},
    {"rid": ""},
    {"ns": 5},
])
def test_malformed_record_messages_are_dropped(change):
    assert channel.parse_message(channel.encode({**RECORD, **change})) is None


def test_a_record_lands_in_the_index_under_its_request_id():
    pipe = ContextPipeline()
    apply = channel.apply_to_pipeline(pipe)
    apply(channel.parse_message(channel.encode(RECORD)))
    assert pipe.index.match_length(PATH, namespace="ns") == 3
    assert pipe.index.requests == 1
    apply(channel.parse_message(channel.encode(RECORD)))  # the same request again: replaced, not doubled
    assert pipe.index.requests == 1
    pipe.evict("r-1")  # the engine's later evict by request id reaches the shared record too
    assert pipe.index.match_length(PATH, namespace="ns") == 0


def test_a_record_is_ignored_when_reordering_is_off():
    from cp_engine.config import Config

    pipe = ContextPipeline(Config(reorder=False))
    channel.apply_to_pipeline(pipe)(channel.parse_message(channel.encode(RECORD)))
    assert pipe.index.requests == 0


class _Collect(list):
    def __init__(self):
        super().__init__()
        self.lock = threading.Lock()

    def __call__(self, msg):
        with self.lock:
            self.append(msg)


def test_min_receivers_keeps_a_record_off_an_instance_with_one_api_server(runtime_dir):
    ident = f"t-{secrets.token_hex(4)}"
    sender = channel.Sender(ident, refresh_s=0.0)
    got_a, got_b = _Collect(), _Collect()
    recvs = []
    try:
        recvs.append(channel.Receiver(ident, got_a, tag=str(os.getpid())).start())
        channel._local_receivers.pop(ident)  # force the socket path, as two processes would
        sent_before, dropped_before = sender.sent, sender.dropped
        assert not sender.send(RECORD, min_receivers=2)
        assert (sender.sent, sender.dropped) == (sent_before, dropped_before)  # nothing counted
        recvs.append(channel.Receiver(ident, got_b, tag=str(os.getppid())).start())
        channel._local_receivers.pop(ident)
        assert sender.send(RECORD, min_receivers=2)
        deadline = time.monotonic() + 10
        while (len(got_a) < 1 or len(got_b) < 1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [m["op"] for m in got_a] == ["record"] and [m["op"] for m in got_b] == ["record"]
    finally:
        sender.close()
        for r in recvs:
            r.stop()


def test_one_process_never_echoes_to_itself(runtime_dir):
    ident = f"t-{secrets.token_hex(4)}"
    got = _Collect()
    recv = channel.Receiver(ident, got).start()  # in-process receiver (offline LLM)
    sender = channel.Sender(ident)
    try:
        assert not sender.send(RECORD, min_receivers=2)
        assert sender.send({"op": "reset"})
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert [m["op"] for m in got] == ["reset"]
    finally:
        sender.close()
        recv.stop()
