"""A ``vllm-router`` process on 127.0.0.1 for tests and benchmarks (docs/scale-out.md).

``Router(workers, policy)`` starts the router binary (``find_router()``: the
``CP_ENGINE_VLLM_ROUTER`` path, else ``vllm-router`` on PATH) in its own process group;
as a context manager it waits until it is ready (``ready()``: ``/health`` answers; at
most ``start_s``) and stops the whole group on exit, keeping its log only when it
failed to start. Its metrics exporter gets a free port, so it never collides with
another router's.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import requests

ROUTER_ENV = "CP_ENGINE_VLLM_ROUTER"


def find_router() -> str | None:
    return os.environ.get(ROUTER_ENV) or shutil.which("vllm-router")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Router:
    name = "vllm-router"

    def __init__(self, workers: list[str], policy: str, binary: str | None = None, start_s: float = 120.0):
        self.port, self.start_s, self.workers = _free_port(), start_s, list(workers)
        cmd = self.command(binary, workers, policy)
        fd, self.log_path = tempfile.mkstemp(prefix=f"cp_{self.name.replace('-', '_')}_", suffix=".log")
        with os.fdopen(fd, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def command(self, binary: str | None, workers: list[str], policy: str) -> list[str]:
        binary = binary or find_router()
        if not binary:
            raise RuntimeError(f"vllm-router not found: install it (`uv pip install vllm-router`) or set {ROUTER_ENV}")
        return [binary, "--host", "127.0.0.1", "--port", str(self.port), "--policy", policy,
                "--worker-urls", *workers, "--worker-startup-timeout-secs", "60", "--disable-retries",
                "--prometheus-port", str(_free_port())]  # not the shared default, 29000

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Router":
        deadline = time.monotonic() + self.start_s
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if self.ready():
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop(keep_log=True)
        raise RuntimeError(f"{self.name} did not become healthy; log {self.log_path}:\n"
                           + Path(self.log_path).read_text(errors="replace")[-3000:])

    def ready(self) -> bool:
        return requests.get(self.url + "/health", timeout=2).status_code == 200

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self, keep_log: bool = False) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)
        if not keep_log:
            Path(self.log_path).unlink(missing_ok=True)
