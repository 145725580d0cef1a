"""Patch ordering, upstream drift and wheel-install (.pth) tests against real vLLM modules.

Orderings run in fresh subprocesses (import state is process-wide), started in the
background when the session starts (tests/early_runs.py: each imports vLLM, ~15 s of
CPU); drift tests read the installed vLLM and fail loudly when a symbol or signature
the hooks bind moves.
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

from early_runs import early_run
from subproc import last_json, run_json, snippet_command
from vllm_server import vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CHAT_MOD = "vllm.entrypoints.openai.chat_completion.serving"
SCHED_MOD = "vllm.v1.core.sched.scheduler"


def _run_json(code: str, python: str = sys.executable, **env: str) -> dict:
    return run_json(code, python, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", **env)


def _ordering(code: str, **env: str):
    """An early run of ``code`` in this interpreter (none where vLLM is absent)."""
    return lambda: snippet_command(code, VLLM_NO_USAGE_STATS="1", HF_HUB_OFFLINE="1", **env) \
        if vllm_available() else None


_STATE = f"""
def state():
    import sys
    from cp_engine.hooks.wrapping import is_wrapped
    from cp_engine.hooks.vllm import patch
    chat = sys.modules.get("{CHAT_MOD}")
    sched = sys.modules.get("{SCHED_MOD}")
    return {{
        "chat_wrapped": bool(chat) and is_wrapped(chat.OpenAIServingChat, "create_chat_completion"),
        "queue_ours": bool(sched) and is_wrapped(sched, "create_request_queue"),
        **patch.status(),
    }}
"""


# One interpreter for both orderings that start with CP_ENGINE_DISABLE=1: the .pth
# hook, an import of the patched modules and vLLM's plugin entry point all leave vLLM
# unpatched; then the flag is dropped and the explicit patch() calls run on the
# already imported modules.
_DISABLED_THEN_PATCH = _STATE + f"""
import json, os, wrapt
from cp_engine.hooks import autoload, bootstrap, runtime
from cp_engine.hooks.vllm import patch
autoload.install()                      # what the .pth does
import {CHAT_MOD}, {SCHED_MOD}
from vllm.plugins import load_general_plugins
load_general_plugins()                  # the entry point path
out = {{"before": state(), "boot": bootstrap.state("vllm")}}
del os.environ["CP_ENGINE_DISABLE"]; runtime.reset_for_tests()
patch.patch(); out["patched"] = state()
patch.patch(); out["twice"] = state()
inner = {CHAT_MOD}.OpenAIServingChat.__dict__["create_chat_completion"].__wrapped__
out["not_nested"] = not isinstance(inner, wrapt.ObjectProxy)
patch.unpatch(); out["removed"] = state()
out["removed_is_function"] = type({CHAT_MOD}.OpenAIServingChat.__dict__["create_chat_completion"]).__name__ == "function"
patch.patch(); out["again"] = state()
print(json.dumps(out))
"""
disabled_then_patch_run = early_run("disabled_then_patch_run", _ordering(_DISABLED_THEN_PATCH, CP_ENGINE_DISABLE="1"))


def test_disabled_stays_unpatched_then_patch_double_patch_unpatch_repatch(disabled_then_patch_run):
    r = last_json(disabled_then_patch_run)
    assert r["boot"] is None and not r["before"]["chat_wrapped"] and not r["before"]["queue_ours"]
    assert r["patched"]["chat_wrapped"] and r["patched"]["queue_ours"]
    assert r["twice"]["installed"] == r["patched"]["installed"] and r["not_nested"]
    assert not r["removed"]["chat_wrapped"] and not r["removed"]["queue_ours"] and r["removed_is_function"]
    assert r["again"]["chat_wrapped"] and r["again"]["queue_ours"]


_AUTOLOAD_THEN_IMPORT = _STATE + f"""
import json, sys
from cp_engine.hooks import autoload, bootstrap
autoload.install()                      # what the .pth does
assert "vllm" not in sys.modules
import {CHAT_MOD}, {SCHED_MOD}          # import triggers the patch
out = {{"after_import": state(), "boot": bootstrap.state("vllm")}}
from vllm.plugins import load_general_plugins
load_general_plugins()                  # entry point path on top: still patched once
out["after_entry_point"] = state()
print(json.dumps(out))
"""
autoload_then_import_run = early_run("autoload_then_import_run", _ordering(_AUTOLOAD_THEN_IMPORT))


def test_patch_then_import_and_entry_point_after_autoload(autoload_then_import_run):
    r = last_json(autoload_then_import_run)
    assert r["boot"] == "patched"
    assert r["after_import"]["chat_wrapped"] and r["after_import"]["queue_ours"]
    assert r["after_entry_point"]["installed"] == r["after_import"]["installed"]


# -- drift: fail loudly when what the hooks bind moves upstream --------------------

def test_drift_chat_and_completion_entry_points():
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat
    from vllm.entrypoints.openai.completion.serving import OpenAIServingCompletion

    for cls, name in ((OpenAIServingChat, "create_chat_completion"), (OpenAIServingCompletion, "create_completion")):
        fn = cls.__dict__.get(name)
        assert fn is not None, f"{cls.__name__}.{name} moved"
        fn = getattr(fn, "__wrapped__", fn)
        params = list(inspect.signature(fn).parameters)
        assert params[:3] == ["self", "request", "raw_request"], f"{cls.__name__}.{name}{params}"
        assert inspect.iscoroutinefunction(fn)
        assert "message" in inspect.signature(cls.create_error_response).parameters


def test_drift_data_parallel_rank_header_and_size():
    """hooks/vllm/dp_rank.py pins a request through the header the serving classes read,
    and reads the size from the engine client's parallel config."""
    from starlette.requests import Request
    from vllm.config import ParallelConfig
    from vllm.entrypoints.openai.chat_completion.serving import OpenAIServingChat

    from cp_engine.hooks.vllm.dp_rank import route

    req = Request({"type": "http", "method": "POST", "path": "/", "headers": []})
    route(req, 3)
    assert OpenAIServingChat._get_data_parallel_rank(req) == 3, "vLLM no longer reads X-data-parallel-rank"
    assert ParallelConfig().data_parallel_size == 1
    import vllm.entrypoints.openai.chat_completion.serving as chat
    import vllm.entrypoints.openai.completion.serving as completion

    for mod in (chat, completion):
        assert "_get_data_parallel_rank(raw_request)" in inspect.getsource(mod), \
            f"{mod.__name__} stopped reading the rank from its request"


def test_drift_request_fields_reach_sampling_params():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    req = ChatCompletionRequest.model_validate({
        "model": "m", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "d", "cp_block": True}, {"type": "text", "text": "q"}]}],
        "context_blocks": ["a"], "conversation_id": "c"})
    assert req.model_extra == {"context_blocks": ["a"], "conversation_id": "c"}
    assert req.messages[0]["content"][0].get("cp_block") is True  # part markers survive
    assert isinstance(req.request_id, str) and hasattr(req, "cache_salt")
    # Marks a rebuilding router forwards: a declared field, read from the request itself.
    kw = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                               "chat_template_kwargs": {"cp_context_blocks": ["a"]}})
    assert kw.chat_template_kwargs == {"cp_context_blocks": ["a"]} and not kw.model_extra
    req.vllm_xargs = {"cp_path": ["00000000000000ff"], "cp_ends": [5], "cp_ns": "n", "cp_group": "g", "cp_rid": "r"}
    sp = req.to_sampling_params(16, {})
    assert sp.extra_args["cp_path"] == ["00000000000000ff"] and sp.extra_args["cp_rid"] == "r"
    creq = CompletionRequest.model_validate({"model": "m", "prompt": "p", "context_blocks": ["a"]})
    assert creq.model_extra == {"context_blocks": ["a"]} and hasattr(creq, "vllm_xargs")


def test_drift_version_in_supported_range():
    import importlib.util

    import vllm

    from cp_engine.hooks.vllm.table import TABLE

    assert TABLE.versions.admits(vllm.__version__), vllm.__version__
    for row in TABLE.rows:  # every row's trigger module exists in this release
        assert row.on_demand or importlib.util.find_spec(row.trigger_module), row


# -- a real wheel install puts the .pth in site-packages --------------------------

@pytest.mark.skipif(shutil.which("uv") is None, reason="needs uv to build the wheel and venv")
def test_wheel_install_places_pth_in_purelib_and_patches(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run(["uv", "build", "--wheel", "-o", str(dist), ROOT], check=True, capture_output=True, timeout=300)
    (wheel,) = dist.glob("cp_engine-*.whl")
    venv = tmp_path / "venv"
    subprocess.run(["uv", "venv", "-q", "-p", sys.executable, str(venv)], check=True, capture_output=True, timeout=120)
    py = str(venv / "bin" / "python")
    subprocess.run(["uv", "pip", "install", "-q", "-p", py, "--no-deps", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.isfile(os.path.join(purelib, "cp_engine_autoload.pth"))
    # vLLM, wrapt and numpy come from this test's environment, appended to the fresh
    # venv's path by a .pth that sorts before ours; cp_engine itself only from the wheel.
    shared = sysconfig.get_paths()["purelib"]
    with open(os.path.join(purelib, "aaa_shared_site.pth"), "w") as f:
        f.write(shared + "\n")
    probe = ("import json, sys\n"
             "quiet = {'vllm': 'vllm' in sys.modules, 'patch': 'cp_engine.hooks.vllm.patch' in sys.modules}\n"
             f"import {CHAT_MOD}\n"
             "import cp_engine\n"
             "from cp_engine.hooks import bootstrap\n"
             "from cp_engine.hooks.wrapping import is_wrapped\n"
             f"m = sys.modules['{CHAT_MOD}']\n"
             "print(json.dumps({'quiet': quiet, 'boot': bootstrap.state('vllm'), 'file': cp_engine.__file__, "
             "'wrapped': is_wrapped(m.OpenAIServingChat, 'create_chat_completion')}))")
    r = _run_json(probe, python=py)
    assert r["file"].startswith(str(venv)), r["file"]
    assert r["quiet"] == {"vllm": False, "patch": False}  # nothing engine-side at startup
    assert r["boot"] == "patched" and r["wrapped"]
    off = _run_json(probe, python=py, CP_ENGINE_DISABLE="1")
    assert off["boot"] is None and not off["wrapped"]
    # install_hook.py manages the same file (editable installs) in that interpreter.
    tool = os.path.join(ROOT, "install_hook.py")
    pth = os.path.join(purelib, "cp_engine_autoload.pth")
    subprocess.run([py, tool, "remove"], check=True, capture_output=True, timeout=60)
    assert not os.path.exists(pth)
    st = json.loads(subprocess.run([py, tool, "status"], check=True, capture_output=True, text=True,
                                   timeout=60).stdout)
    assert st["pth_present"] is False and st["vllm"] and st["pth"] == pth
    subprocess.run([py, tool, "install"], check=True, capture_output=True, timeout=60)
    st = json.loads(subprocess.run([py, tool, "status"], check=True, capture_output=True, text=True,
                                   timeout=60).stdout)
    assert st["pth_present"] and st["pth_current"]
