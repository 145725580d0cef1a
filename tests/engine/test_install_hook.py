"""``install_hook.py status``: says which interpreter and folders it inspected, how to
fix a missing hook, and (``--deep``) the state of every row of vLLM's patch table.

Each ``--deep`` status imports vLLM in a child (~15 s of CPU), so both run in the
background from the start of the session (tests/early_runs.py) and the tests read
their output."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from early_runs import early_run
from vllm_server import vllm_available

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "install_hook.py")


def _status_command(python: str, *args: str, timeout: int = 120, **env: str) -> dict:
    """``subprocess.run`` keyword arguments of ``install_hook.py status ARGS`` under
    ``python``, with the caller's CP_ENGINE_* flags replaced by ``env``."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    return {"args": [python, TOOL, "status", *args], "timeout": timeout,
            "env": {**clean, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1", **env}}


def _parsed(out: subprocess.CompletedProcess) -> dict:
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout)


def _status(python: str, *args: str, timeout: int = 120, **env: str) -> dict:
    return _parsed(subprocess.run(capture_output=True, text=True, **_status_command(python, *args, timeout=timeout,
                                                                                  **env)))


def _deep(**env: str):
    """The early run of ``status --deep`` with ``env`` (none where vLLM is absent)."""
    return lambda: _status_command(sys.executable, "--deep", timeout=600, **env) if vllm_available() else None


deep_status_run = early_run("deep_status_run", _deep())
deep_status_no_eviction_sync_run = early_run("deep_status_no_eviction_sync_run", _deep(CP_ENGINE_EVICTION_SYNC="0"))


def test_status_without_cp_engine_names_the_interpreter_its_folders_and_the_fix(tmp_path):
    """An interpreter without cp_engine (a bare venv) still gets a useful answer."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    st = _status(python)
    assert st["python"] == python
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.realpath(site) in [os.path.realpath(d) for d in st["site_packages"]]
    assert st["pth_present"] is False and st["cp_engine_installed"] is False
    assert python in st["fix"] and "pip install cp-engine" in st["fix"]


def test_status_in_the_project_venv_needs_no_fix():
    st = _status(sys.executable)
    assert st["python"] == sys.executable and st["cp_engine_installed"]
    if st["pth_present"] and st["pth_current"]:
        assert "fix" not in st
        assert os.path.dirname(st["pth"]) in st["site_packages"]
    else:  # an editable install without the hook: the fix says to install it
        assert "install_hook.py install" in st["fix"]


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm not installed")
def test_deep_status_lists_every_patch_of_the_table_applied(deep_status_run):
    from cp_engine.hooks.vllm.table import TABLE

    probe = _parsed(deep_status_run)["vllm_probe"]
    assert "patches" in probe, probe
    assert [p["name"] for p in probe["patches"]] == [r.name for r in TABLE.rows]
    assert probe["import_failures"] == {}
    # Every row whose feature is on by default is applied, on the API server's modules
    # and on EngineCore's (scheduler, block pool) alike; a default-off feature (blend)
    # leaves its rows skipped, saying which feature.
    from cp_engine.config import Config

    defaults = Config()
    states = {p["name"]: p for p in probe["patches"]}
    for row in TABLE.rows:
        wanted = not row.features() or any(getattr(defaults, f, False) for f in row.features())
        if wanted and not row.optional:
            assert states[row.name]["state"] == "applied", probe["patches"]
        elif not wanted:
            assert states[row.name]["state"] == "skipped", probe["patches"]
            assert row.feature in states[row.name]["detail"], probe["patches"]
    assert any(not (not r.features() or any(getattr(defaults, f, False) for f in r.features()))
               for r in TABLE.rows), "the default-off branch is exercised by the blend rows"
    states = {name: p["state"] for name, p in states.items()}
    assert {"chat_rewrite", "completion_rewrite", "queue_factory", "block_evicted"} <= set(states)


@pytest.mark.vllm
@pytest.mark.skipif(not vllm_available(), reason="vllm not installed")
def test_deep_status_says_why_a_switched_off_patch_is_not_applied(deep_status_no_eviction_sync_run):
    probe = _parsed(deep_status_no_eviction_sync_run)["vllm_probe"]
    states = {p["name"]: p for p in probe["patches"]}
    assert states["block_evicted"]["state"] == "skipped" and "eviction_sync" in states["block_evicted"]["detail"]
    assert states["chat_rewrite"]["state"] == "applied"
