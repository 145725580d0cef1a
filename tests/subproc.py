"""Run a snippet in a fresh interpreter and read back its last JSON line (patch tests)."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def clean_env(**extra: str) -> dict:
    """The caller's environment minus every CP_ENGINE_* flag, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    env.update(extra)
    return env


def snippet_command(code: str, python: str = sys.executable, timeout: float = 300, **env: str) -> dict:
    """``subprocess.run`` keyword arguments (``args``, ``env``, ``timeout``) that run
    ``code`` under ``python`` with ``clean_env(**env)``; also what ``early_run`` takes."""
    return {"args": [python, "-c", code], "env": clean_env(**env), "timeout": timeout}


def last_json(out: subprocess.CompletedProcess) -> dict:
    """The last line of ``out``'s stdout that is a JSON object; asserts a clean exit."""
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return json.loads(lines[-1])


def run_json(code: str, python: str = sys.executable, timeout: float = 300, **env: str) -> dict:
    return last_json(subprocess.run(capture_output=True, text=True, **snippet_command(code, python, timeout, **env)))
