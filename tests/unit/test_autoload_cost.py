"""What the autoload ``.pth`` line costs every interpreter in the environment, and that
the cheap engine watch it installs still hands vLLM / SGLang imports to bootstrap.

Cost is measured in fresh interpreters under ``-X importtime``: both start with
``CP_ENGINE_DISABLE=1`` (so an installed ``.pth`` is a no-op), clear it, and only the
measured one then executes ``PTH_LINE``; the difference between the two is the hook.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import textwrap

import pytest

from cp_engine.hooks import autoload

# The line needs exactly these: the package and its lazy-export helper, the hooks
# package, the module itself.
HOOK_MODULES = {"cp_engine", "cp_engine.lazy", "cp_engine.hooks", "cp_engine.hooks.autoload"}
# Four needed, plus headroom for a few small stdlib modules that another layout (a wheel
# install without setuptools' editable finder) may not have loaded before the line runs.
# Any real import blows it: numpy alone adds ~100 modules, wrapt ~50, the eager core ~176.
MAX_ADDED_MODULES = 10
MAX_HOOK_SELF_US = 5000  # the hook's modules' own import time (median), microseconds
FORBIDDEN = ("numpy", "torch", "vllm", "sglang", "wrapt", "triton")
RUNS = 5

_PROBE = """
import os, sys
os.environ.pop("CP_ENGINE_DISABLE", None)
{line}
print(any(type(f).__name__ == "_EngineImportWatch" for f in sys.meta_path))
"""


def _start(line: str) -> tuple[dict[str, int], str]:
    """One fresh interpreter: ({module: self microseconds}, stdout)."""
    env = dict(os.environ, CP_ENGINE_DISABLE="1")
    # Time the modules as installed (pip compiles bytecode), not the compiler.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", _PROBE.format(line=line)],
                          env=env, capture_output=True, text=True, timeout=60, check=True)
    modules = {}
    for row in proc.stderr.splitlines():
        if row.startswith("import time:") and "self [us]" not in row:
            self_us, _cumulative, name = row[len("import time:"):].split("|")
            modules[name.strip()] = int(self_us)
    return modules, proc.stdout.strip()


@pytest.fixture(scope="module")
def starts():
    _start(autoload.PTH_LINE)  # warm-up: bytecode written, file cache filled
    bare = [_start("pass") for _ in range(RUNS)]
    hooked = [_start(autoload.PTH_LINE) for _ in range(RUNS)]
    return bare, hooked


def test_hook_line_is_active_in_the_measured_interpreter(starts):
    bare, hooked = starts
    # Guards the other tests: the line swallows errors, so a broken import would look cheap.
    assert all(out == "False" for _, out in bare)
    assert all(out == "True" and "cp_engine.hooks.autoload" in mods for mods, out in hooked)


def test_hook_imports_no_engine_numpy_wrapt_or_core(starts):
    bare, hooked = starts
    added = set().union(*(set(m) for m, _ in hooked)) - set().union(*(set(m) for m, _ in bare))
    heavy = sorted(m for m in added if m.split(".")[0] in FORBIDDEN)
    assert not heavy, heavy
    ours = sorted(m for m in added if m.split(".")[0] == "cp_engine" and m not in HOOK_MODULES)
    assert not ours, ours


def test_hook_adds_a_handful_of_modules(starts):
    bare, hooked = starts
    base = set().union(*(set(m) for m, _ in bare))
    added = max(len(set(m) - base) for m, _ in hooked)
    assert added <= MAX_ADDED_MODULES, sorted(set(hooked[0][0]) - base)


def _hook_self_us(bare, hooked) -> tuple[float, list[dict[str, int]]]:
    """Median over the runs of the hooked interpreter's own microseconds in the modules
    the bare one never loads, and those modules per run (for the failure message)."""
    base = set().union(*(set(m) for m, _ in bare))
    per_run = [{name: us for name, us in mods.items() if name not in base} for mods, _ in hooked]
    return statistics.median(sum(run.values()) for run in per_run), per_run


def test_hook_modules_import_time_is_a_few_milliseconds(starts):
    # Other work on a busy machine can only make a start slower, so a median over the
    # bound is measured again (two more rounds at most) and the best round counts.
    bare, hooked = starts
    rounds = [_hook_self_us(bare, hooked)]
    while rounds[-1][0] > MAX_HOOK_SELF_US and len(rounds) < 3:
        rounds.append(_hook_self_us(bare, [_start(autoload.PTH_LINE) for _ in range(RUNS)]))
    best, per_run = min(rounds, key=lambda r: r[0])
    assert best <= MAX_HOOK_SELF_US, per_run


# -- the watch still does its job (a stand-in top-level ``sglang`` package; the real
#    engines go through the same path in tests/engine/test_*_patching.py) -------------

_WATCH = """
import importlib.resources, importlib.util, json, os, sys
if not {disabled}:
    os.environ.pop("CP_ENGINE_DISABLE")      # set only so an installed .pth stayed idle
from cp_engine.hooks import autoload, bootstrap
seen = []
bootstrap.register_adapter("sglang", lambda: seen.append(sys.modules["sglang"].EXECUTED) or True)
if {install_first}:
    installed = autoload.install()
    importlib.util.find_spec("sglang")       # a probe alone is no import: no hook yet
    probe = list(seen)
    import sglang
else:
    import sglang
    probe = list(seen)
    installed = autoload.install()
autoload.install()                           # idempotent
print(json.dumps({{
    "installed": installed, "probe": probe, "seen": seen, "state": bootstrap.state("sglang"),
    "loader": type(sglang.__loader__).__name__, "spec_loader": type(sglang.__spec__.loader).__name__,
    "resource": importlib.resources.files("sglang").joinpath("data.txt").read_text(),
    "still_watching": [type(f).__name__ for f in sys.meta_path].count("_EngineImportWatch"),
}}))
"""


def _watch_run(tmp_path, install_first: bool, disabled: bool = False) -> dict:
    pkg = tmp_path / "sglang"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("EXECUTED = True\n")
    (pkg / "data.txt").write_text("payload")
    env = dict(os.environ, CP_ENGINE_DISABLE="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    code = textwrap.dedent(_WATCH).format(install_first=install_first, disabled=disabled)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.parametrize("install_first", [True, False], ids=["install-then-import", "import-then-install"])
def test_watch_hands_the_engine_to_bootstrap_once_after_it_executed(tmp_path, install_first):
    r = _watch_run(tmp_path, install_first)
    assert r["installed"] is True and r["state"] == "patched"
    assert r["seen"] == [True]  # once, with the module body already run
    assert r["probe"] == []  # find_spec alone (install first) / nothing installed yet
    # The module names its real loader, so importlib.resources and friends keep working.
    assert r["loader"] == r["spec_loader"] == "SourceFileLoader" and r["resource"] == "payload"
    assert r["still_watching"] == 1  # vllm is still pending; sglang is done


def test_watch_stays_out_when_disabled(tmp_path):
    r = _watch_run(tmp_path, install_first=True, disabled=True)
    assert r["installed"] is False and r["seen"] == [] and r["state"] is None
    assert r["still_watching"] == 0
