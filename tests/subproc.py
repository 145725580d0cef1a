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


def run_json(code: str, python: str = sys.executable, timeout: float = 300, **env: str) -> dict:
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=timeout,
                         env=clean_env(**env))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return json.loads(lines[-1])
