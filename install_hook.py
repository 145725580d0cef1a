#!/usr/bin/env python
"""Install, remove or inspect cp_engine's autoload ``.pth`` in this interpreter.

    python install_hook.py install   # write cp_engine_autoload.pth into site-packages
    python install_hook.py remove    # delete it
    python install_hook.py status    # .pth present?, engine versions, plugin state
    python install_hook.py status --deep   # also import vLLM in a child and report patches

A wheel install (``pip install cp-engine``) already ships the ``.pth``; this script is
for editable installs (which do not) and for checking an environment.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig


def _autoload():
    from cp_engine.hooks import autoload

    return autoload


def pth_path() -> str:
    return os.path.join(sysconfig.get_paths()["purelib"], _autoload().PTH_NAME)


def install() -> int:
    path = pth_path()
    with open(path, "w", encoding="utf-8") as f:
        f.write(_autoload().PTH_LINE + "\n")
    print(f"installed {path}")
    return 0


def remove() -> int:
    path = pth_path()
    if os.path.exists(path):
        os.remove(path)
        print(f"removed {path}")
    else:
        print(f"not present: {path}")
    return 0


def _engine_version(name: str) -> str | None:
    """Version of an engine without importing it (importing vLLM takes seconds)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for fname in ("_version.py", "version.py"):
            try:
                with open(os.path.join(base, fname), encoding="utf-8") as f:
                    text = f.read()
            except OSError:
                continue
            m = re.search(r"""(?:__version__|version)\s*(?::\s*\w+\s*)?=\s*['"]([^'"]+)['"]""", text)
            if m:
                return m.group(1)
    return "unknown"


_PROBE = r"""
import json, sys
import vllm
import vllm.entrypoints.openai.chat_completion.serving  # noqa: F401 (API server module)
import vllm.v1.core.sched.request_queue  # noqa: F401 (EngineCore module)
from vllm.plugins import load_general_plugins
load_general_plugins()  # what vLLM itself does at startup (entry-point path)
from cp_engine.hooks import bootstrap
from cp_engine.hooks.vllm import patch
print(json.dumps({"bootstrap": bootstrap.state("vllm"), **patch.status()}))
"""


def status(deep: bool) -> int:
    path = pth_path()
    present = os.path.exists(path)
    current = False
    if present:
        with open(path, encoding="utf-8") as f:
            current = f.read().strip() == _autoload().PTH_LINE
    import cp_engine
    from cp_engine.config import load_config

    cfg = load_config()
    info = {
        "python": sys.executable,
        "pth": path,
        "pth_present": present,
        "pth_current": current,
        "cp_engine": cp_engine.__version__,
        "disabled": cfg.disable,
        "features": cfg.active_features(),
        "vllm": _engine_version("vllm"),
        "sglang": _engine_version("sglang"),
    }
    if deep and info["vllm"]:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        info["vllm_probe"] = json.loads(lines[-1]) if lines else {"error": out.stderr[-500:]}
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["install", "remove", "status"])
    ap.add_argument("--deep", action="store_true", help="status: import vLLM in a child and report patches")
    args = ap.parse_args(argv)
    if args.action == "install":
        return install()
    if args.action == "remove":
        return remove()
    return status(args.deep)


if __name__ == "__main__":
    sys.exit(main())
