"""llama.cpp's OpenAI server (``llama_cpp.server``) on 127.0.0.1, and what it says it computed.

``scripts/setup_llamacpp.sh`` builds the venv and fetches the model; ``locate()`` finds
them (``LLAMACPP_PYTHON`` / ``LLAMACPP_MODEL`` or the script's default paths) or
returns None. ``LlamaServer(python, model).start()`` runs the server with its
stderr in a log file (verbose, as by default) and waits until it answers
``/v1/models``; ``stop()`` ends it.

The server keeps one llama context: its prompt cache is the previous request's
tokens, of which a new prompt reuses the longest common prefix. For each request,
llama.cpp prints how many prompt tokens it evaluated (``llama_perf_context_print:
prompt eval time = T ms / N tokens``) and llama-cpp-python how many it reused
(``Llama.generate: P prefix-match hit, remaining N prompt tokens to eval``).
``LlamaServer.chat(body)`` sends one request (requests are serialized by the
server anyway) and returns the answer with those numbers read from the log
(``Processed``).
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PYTHON = ROOT / ".venv-llamacpp" / "bin" / "python"
DEFAULT_MODEL = ROOT / "build" / "llamacpp" / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"

_EVAL = re.compile(r"prompt eval time =\s*([\d.]+) ms /\s*(\d+) tokens")
_REUSED = re.compile(r"Llama\.generate: (\d+) prefix-match hit")


def locate() -> tuple[str, str] | None:
    """(python, model) of the llama.cpp venv and GGUF model, or None when either is missing."""
    python = Path(os.environ.get("LLAMACPP_PYTHON", DEFAULT_PYTHON))
    model = Path(os.environ.get("LLAMACPP_MODEL", DEFAULT_MODEL))
    return (str(python), str(model)) if python.exists() and model.exists() else None


@dataclass(frozen=True)
class Processed:
    """One request as llama.cpp reports it."""
    prompt_tokens: int  # usage.prompt_tokens of the answer
    evaluated_tokens: int  # prompt tokens llama.cpp computed (its perf counter)
    reused_tokens: int  # prompt tokens taken from the previous request's context
    eval_ms: float  # llama.cpp's prompt eval time


def parse_processed(log: str) -> tuple[int, int, float] | None:
    """(evaluated, reused, eval ms) from one request's log lines; None without a timing line."""
    evals = _EVAL.findall(log)
    if not evals:
        return None
    ms, n = evals[-1]
    reused = _REUSED.findall(log)
    return int(n), int(reused[-1]) if reused else 0, float(ms)


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class LlamaServer:
    def __init__(self, python: str, model: str, n_ctx: int = 4096, threads: int = 2,
                 log_dir: str | Path | None = None):
        self.python, self.model_path, self.n_ctx, self.threads = python, model, n_ctx, threads
        self.port = _free_port()
        self.model = "smollm2"
        folder = Path(log_dir or ROOT / "build" / "logs")
        folder.mkdir(parents=True, exist_ok=True)
        self.log_path = folder / f"llamacpp-{time.strftime('%Y%m%d-%H%M%S')}-p{self.port}.log"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 300) -> "LlamaServer":
        cmd = [self.python, "-m", "llama_cpp.server", "--model", self.model_path, "--model_alias", self.model,
               "--host", "127.0.0.1", "--port", str(self.port), "--n_ctx", str(self.n_ctx),
               "--n_threads", str(self.threads), "--n_threads_batch", str(self.threads), "--seed", "0"]
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited ({self._proc.returncode}):\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/v1/models", timeout=5).status_code == 200:
                    return self
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"llama_cpp.server not ready in {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.5)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=30)
        self._proc = None

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def chat(self, body: dict, url: str | None = None, timeout: float = 600) -> tuple[dict, Processed]:
        """POST ``body`` to ``url`` (default: this server; e.g. a proxy in front of it) +
        ``/v1/chat/completions``; the answer and what llama.cpp reported for it."""
        start = self.log_path.stat().st_size
        r = requests.post((url or self.url) + "/v1/chat/completions", json=body, timeout=timeout)
        r.raise_for_status()
        answer = r.json()
        deadline = time.monotonic() + 30  # the timing line is printed before the answer; allow a flush
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                got = parse_processed(f.read().decode("utf-8", errors="replace"))
            if got is not None or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if got is None:
            raise RuntimeError(f"no prompt eval timing in llama.cpp's log for this request:\n{self.log_tail()}")
        evaluated, reused, ms = got
        return answer, Processed(answer["usage"]["prompt_tokens"], evaluated, reused, ms)
