#!/usr/bin/env python
"""Install, remove or inspect cp_engine's autoload ``.pth`` in this interpreter.

    python install_hook.py install   # write cp_engine_autoload.pth into site-packages
    python install_hook.py remove    # delete it
    python install_hook.py status    # interpreter, site-packages searched, .pth present?,
                                     # engine versions, plugin state, and a fix when needed
    python install_hook.py status --deep   # also import every module vLLM's patch table
                                           # touches in a child and list every patch's state

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


def _site_dirs() -> list[str]:
    """Every folder whose .pth files this interpreter runs at startup, plus the one
    ``install`` writes to."""
    import site

    dirs = list(site.getsitepackages()) if hasattr(site, "getsitepackages") else []
    if site.ENABLE_USER_SITE:
        dirs.append(site.getusersitepackages())
    dirs.append(sysconfig.get_paths()["purelib"])
    seen: dict[str, str] = {}  # real path -> first spelling (lib64 is often a link to lib)
    for d in dirs:
        seen.setdefault(os.path.realpath(d), d)
    return list(seen.values())


def _installed_location() -> str | None:
    """Where this interpreter finds cp_engine on its own, None when it does not.

    Asked in a child started outside this folder: here the source tree next to this
    script is importable (and even carries metadata), which says nothing about what
    vLLM or SGLang started by this interpreter would find.
    """
    code = ("import importlib.util as u; s = u.find_spec('cp_engine'); "
            "print(list(s.submodule_search_locations or [s.origin])[0] if s else '')")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                             cwd=os.path.dirname(os.path.abspath(sys.executable)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fix(installed: bool, present: bool, current: bool) -> str | None:
    """What to run when this interpreter would not load the plugin; None when it would."""
    here = os.path.abspath(__file__)
    if not installed:
        venv_py = os.path.join(os.path.dirname(here), ".venv", "bin", "python")
        example = f" (e.g. {venv_py} {here} status)" if os.path.exists(venv_py) else ""
        return (f"cp_engine is not installed in {sys.executable}: run this script with the Python "
                f"of the environment that runs vLLM/SGLang{example}, or install it into this one: "
                f"{sys.executable} -m pip install cp-engine")
    if not present:
        return (f"no {_autoload().PTH_NAME} in any folder above: run {sys.executable} {here} install "
                f"(an editable install does not ship it), or install cp-engine from a wheel")
    if not current:
        return f"the .pth line is outdated: run {sys.executable} {here} install"
    return None


def _probe_vllm() -> dict:
    """In a fresh interpreter: import every module a vLLM patch-table row waits for or
    changes, let vLLM load its plugins, and report each row's state."""
    import importlib

    from cp_engine.hooks.vllm.table import TABLE

    failed: dict[str, str] = {}
    import vllm  # noqa: F401 (the .pth hook, when present, activates here)

    # The API server's and EngineCore's modules: no single vLLM process imports both.
    wanted = [r.trigger_module for r in TABLE.rows if r.trigger_module] + [r.module for r in TABLE.rows]
    for name in dict.fromkeys(wanted):
        try:
            importlib.import_module(name)
        except Exception as exc:
            failed[name] = f"{type(exc).__name__}: {exc}"
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what vLLM itself does at startup (entry-point path)
    from cp_engine.hooks import bootstrap
    from cp_engine.hooks.vllm import patch

    st = patch.status()
    patches = []
    for row in TABLE.rows:
        entry = {"name": row.name, "target": row.target}
        if row.name in st["installed"]:
            entry["state"] = "applied"
        elif row.name in st["skipped"]:
            entry["state"], entry["detail"] = "skipped", st["skipped"][row.name]
        elif row.on_demand:
            entry["state"], entry["detail"] = "on demand", "applied by the adapter once its moment comes"
        elif row.trigger_module in failed:
            entry["state"], entry["detail"] = "not applied", f"{row.trigger_module}: {failed[row.trigger_module]}"
        else:
            entry["state"] = "not applied"
            entry["detail"] = "plugin not active in this process" if not st["enabled"] else "no reason recorded"
        patches.append(entry)
    return {"bootstrap": bootstrap.state("vllm"), "enabled": st["enabled"], "patches": patches,
            "import_failures": failed}


def status(deep: bool) -> int:
    dirs = _site_dirs()
    name = _autoload().PTH_NAME
    found = [os.path.join(d, name) for d in dirs if os.path.exists(os.path.join(d, name))]
    path = found[0] if found else pth_path()
    current = False
    if found:
        with open(path, encoding="utf-8") as f:
            current = f.read().strip() == _autoload().PTH_LINE
    import cp_engine
    from cp_engine.config import load_config

    cfg = load_config()
    location = _installed_location()
    info = {
        "python": sys.executable,
        "site_packages": dirs,
        "pth": path,
        "pth_present": bool(found),
        "pth_current": current,
        "cp_engine": cp_engine.__version__,
        "cp_engine_installed": location is not None,
        "cp_engine_location": location,
        "disabled": cfg.disable,
        "features": cfg.active_features(),
        "vllm": _engine_version("vllm"),
        "sglang": _engine_version("sglang"),
    }
    fix = _fix(location is not None, bool(found), current)
    if fix:
        info["fix"] = fix
    if deep and info["vllm"]:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--probe-vllm"],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        info["vllm_probe"] = json.loads(lines[-1]) if lines else {"error": out.stderr[-500:]}
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=["install", "remove", "status"])
    ap.add_argument("--deep", action="store_true",
                    help="status: import vLLM's patched modules in a child and report every patch")
    ap.add_argument("--probe-vllm", action="store_true", help=argparse.SUPPRESS)  # the --deep child
    args = ap.parse_args(argv)
    if args.probe_vllm:
        print(json.dumps(_probe_vllm()))
        return 0
    if args.action is None:
        ap.error("an action is required: install, remove or status")
    if args.action == "install":
        return install()
    if args.action == "remove":
        return remove()
    return status(args.deep)


if __name__ == "__main__":
    sys.exit(main())
