"""Compile vLLM's bytecode once, before many fresh interpreters import it at the same time.

uv installs packages without ``.pyc`` files, so in a fresh venv each interpreter that
imports vLLM compiles what it imports from source (about as much CPU again as the
import itself) and writes the ``.pyc`` files. When the session starts, the server
pool's starts and the background runs (tests/early_runs.py) all import vLLM at once,
and each of them would pay that compile. ``start`` imports the modules a vLLM server's
processes (API server, EngineCore, worker) need in one child, in the background, when
their bytecode is missing and Python writes bytecode; ``wait`` (called by the pool's
start threads and the background runs before they launch anything) returns once that
child is done, at once when none was needed.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import threading

MODULES = ("vllm.entrypoints.openai.api_server", "vllm.v1.engine.core", "vllm.v1.worker.cpu_worker",
           "vllm.model_executor.models.llama")
TIMEOUT_S = 900

_done = threading.Event()
_done.set()  # nothing to wait for until start() launches a compile


def missing_bytecode(modules: tuple[str, ...] = MODULES) -> bool:
    """Whether any of ``modules``' own ``.pyc`` is missing (found without importing
    them: only the top-level package's location is looked up)."""
    top = importlib.util.find_spec(modules[0].split(".")[0])
    if top is None or not top.submodule_search_locations:
        return False
    root = os.path.dirname(list(top.submodule_search_locations)[0])
    for name in modules:
        source = os.path.join(root, *name.split(".")) + ".py"
        if os.path.exists(source) and not os.path.exists(importlib.util.cache_from_source(source)):
            return True
    return False


def start() -> bool:
    """Begin the one compile in the background when it is needed; returns whether it was."""
    if sys.dont_write_bytecode or not missing_bytecode():
        return False
    _done.clear()

    def _compile() -> None:
        try:
            subprocess.run([sys.executable, "-c", "import " + ", ".join(MODULES)], capture_output=True,
                           timeout=TIMEOUT_S, env={**os.environ, "VLLM_NO_USAGE_STATS": "1", "CP_ENGINE_DISABLE": "1"})
        except (OSError, subprocess.SubprocessError):
            pass  # each interpreter then compiles for itself, as without this step
        finally:
            _done.set()

    threading.Thread(target=_compile, daemon=True).start()
    return True


def wait() -> None:
    _done.wait(TIMEOUT_S)
