"""``run_side`` reads the index view only where asked: the A/B must send both sides the
same requests, and the soak keeps its index samples."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cp_engine.devtools.reliability.soak import run_side


class _Handler(BaseHTTPRequestHandler):
    """A stand-in HTTP server (no engine): answers every completion, records each path."""

    seen: list[str] = []

    def _answer(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.seen.append(self.path)
        self._answer({"choices": [{"text": "ok"}]})

    def do_GET(self) -> None:  # noqa: N802
        self.seen.append(self.path)
        self._answer({"nodes": 0, "max_nodes": 10, "requests": 0, "refs_negative": 0, "unowned": 0})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def server():
    _Handler.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.seen
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("index_samples, reads", [(None, True), (True, True), (False, False)])
def test_index_view_is_read_only_where_asked(server, index_samples, reads):
    url, seen = server
    r = run_side(url, "m", None, clients=2, duration=0.3, plugin=True, sample_every=0.1,
                 index_samples=index_samples)
    assert r["requests"] > 0 and r["errors"] == 0
    assert any(p.startswith("/v1/") for p in seen)
    assert any(p.startswith("/cp_engine/index") for p in seen) is reads
    assert all(("nodes" in s) is reads for s in r["samples"][:-1])  # the last one is taken after the round


def test_plain_side_reads_no_index_by_default(server):
    url, seen = server
    run_side(url, "m", None, clients=1, duration=0.2, plugin=False, sample_every=0.1)
    assert not any(p.startswith("/cp_engine/index") for p in seen)
