"""EngineCore's echo of admitted block paths (hooks/vllm/share.py) on vLLM's real
Scheduler: with two API server receivers, a rewritten request that joins the waiting
queue lands in both indexes; with one, nothing extra is sent."""
from __future__ import annotations

import os
import shutil
import tempfile
import time

import pytest

pytest.importorskip("vllm")
pytest.importorskip("zmq")

import vllm_core as vc  # noqa: E402

from cp_engine import request_hints  # noqa: E402
from cp_engine.hooks import channel, runtime  # noqa: E402
from cp_engine.hooks.installer import Installer  # noqa: E402
from cp_engine.hooks.vllm import patch as vpatch  # noqa: E402
from cp_engine.hooks.vllm import queue as vq  # noqa: E402
from cp_engine.hooks.vllm import share  # noqa: E402
from cp_engine.hooks.vllm.table import TABLE  # noqa: E402
from cp_engine.pipeline import ContextPipeline  # noqa: E402

ROWS = ("queue_factory", "queue_factory_in_scheduler", "block_evicted", "prefix_cache_reset")
TEXTS = [f"shared document {i} " * 30 for i in range(3)]


@pytest.fixture
def engine_rows(monkeypatch):
    vpatch.unpatch()  # this process's .pth may have patched at import
    channel.stop_all()
    base = tempfile.mkdtemp(prefix="cpse", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    inst = Installer(TABLE, lambda row: row.name in ROWS)
    assert inst.patch(vpatch.vllm_version())
    yield
    inst.unpatch()
    channel.stop_all()
    shutil.rmtree(base, ignore_errors=True)


def _receivers(n: int) -> list[tuple[ContextPipeline, channel.Receiver]]:
    """``n`` API-server receivers of this instance on their own sockets (tags name live pids)."""
    out = []
    for tag in (str(os.getpid()), str(os.getppid()))[:n]:
        pipe = ContextPipeline()
        recv = channel.Receiver(runtime.instance_id(), channel.apply_to_pipeline(pipe), tag=tag).start()
        channel._local_receivers.pop(runtime.instance_id(), None)  # as separate processes would
        out.append((pipe, recv))
    return out


def _hinted_request(rid: str):
    origin = ContextPipeline()
    prep = origin.prepare(TEXTS, namespace="ns")
    hints = request_hints.build_xargs(prep, rid)
    return prep.index_path(), vc.make_request(rid, [7] * (4 * vc.BLOCK) + [8] * 4, hints)


def _wait(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.01)
    return cond()


def test_eviction_tracking_attaches_the_echo_and_detaches_it(engine_rows):
    assert share.share_request in vq.observers


def test_an_admitted_request_reaches_every_api_server_index(engine_rows):
    servers = _receivers(2)
    try:
        path, req = _hinted_request("r-shared")
        s = vc.make_scheduler(32)
        s.add_request(req)
        assert _wait(lambda: all(p.index.match_length(path, namespace="ns") == 3 for p, _ in servers))
        assert all(p.index.requests == 1 for p, _ in servers)
        # an engine-side evict by request id now reaches both copies
        for pipe, _ in servers:
            pipe.evict("r-shared")
            assert pipe.index.match_length(path, namespace="ns") == 0
    finally:
        for _, recv in servers:
            recv.stop()


def test_one_api_server_gets_no_echo(engine_rows):
    (pipe, recv), = _receivers(1)
    try:
        path, req = _hinted_request("r-alone")
        s = vc.make_scheduler(32)
        s.add_request(req)
        time.sleep(0.5)  # an echo, if any, would have arrived
        assert pipe.index.requests == 0
    finally:
        recv.stop()


def test_a_plain_request_is_not_echoed(engine_rows):
    servers = _receivers(2)
    try:
        s = vc.make_scheduler(32)
        s.add_request(vc.make_request("plain", [9] * (3 * vc.BLOCK)))
        time.sleep(0.5)
        assert all(pipe.index.requests == 0 for pipe, _ in servers)
    finally:
        for _, recv in servers:
            recv.stop()
