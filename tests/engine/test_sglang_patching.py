"""SGLang adapter plumbing: patch orderings and bootstrap paths in fresh subprocesses,
upstream drift guards on the installed SGLang, /metrics export.

Subprocess tests run the real SGLang modules (each costs an import of SGLang, ~10 s).
"""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import sysconfig

import pytest

from sglang_support import STANDIN_PRELUDE, require_sglang

require_sglang()

from cp_engine.hooks import metrics  # noqa: E402
from cp_engine.hooks.sglang import patch  # noqa: E402

pytestmark = pytest.mark.sglang
POLICY = "sglang.srt.managers.schedule_policy"
UNIFIED = "sglang.srt.mem_cache.unified_radix_cache"
CHAT = "sglang.srt.entrypoints.openai.serving_chat"


def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CP_ENGINE_")}
    env.update(extra)
    return env


def _run_json(code: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", STANDIN_PRELUDE + "\n" + code], capture_output=True,
                         text=True, timeout=300, env=_env(**env))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return json.loads(lines[-1])


_STATE = f"""
import json, sys, wrapt
def state():
    from cp_engine.hooks.wrapping import is_wrapped
    pol = sys.modules.get("{POLICY}")
    uni = sys.modules.get("{UNIFIED}")
    chat = sys.modules.get("{CHAT}")
    return {{
        "policy": bool(pol) and is_wrapped(pol.SchedulePolicy, "calc_priority"),
        "unified": bool(uni) and is_wrapped(uni.UnifiedRadixCache, "take_events"),
        "chat": bool(chat) and is_wrapped(chat.OpenAIServingChat, "_convert_to_internal_request"),
    }}
def nested():
    import {POLICY} as p
    inner = p.SchedulePolicy.__dict__["calc_priority"].__wrapped__
    return isinstance(inner, wrapt.ObjectProxy)
"""


def test_disabled_stays_unpatched_then_patch_twice_unpatch_repatch():
    # One interpreter (an SGLang import each): with CP_ENGINE_DISABLE the .pth hook, an
    # import of the targets and SGLang's plugin entry point leave SGLang unpatched; then
    # this test drives patch() itself (an explicit call patches despite the flag).
    r = _run_json(_STATE + f"""
from cp_engine.hooks import autoload
autoload.install()
import {POLICY}, {UNIFIED}, {CHAT}
from sglang.srt.plugins import load_plugins
load_plugins()
from cp_engine.hooks.sglang import patch
orig = {POLICY}.SchedulePolicy.__dict__["calc_priority"]
out = {{"before": state()}}
out["ok"] = patch.patch(); out["patched"] = state(); n = len(patch.installed())
patch.patch(); out["twice_same"] = len(patch.installed()) == n; out["nested"] = nested()
out["restored"] = patch.unpatch(); out["removed"] = state()
out["identity"] = {POLICY}.SchedulePolicy.__dict__["calc_priority"] is orig
patch.patch(); out["again"] = state()
print(json.dumps(out))
""", CP_ENGINE_DISABLE="1")
    assert r["before"] == {"policy": False, "unified": False, "chat": False}
    assert r["ok"] and all(r["patched"].values()) and r["twice_same"] and not r["nested"]
    assert r["restored"] >= 8 and not any(r["removed"].values()) and r["identity"]
    assert all(r["again"].values())


def test_pth_autoload_then_entry_point_patches_once():
    r = _run_json(_STATE + f"""
import logging
from cp_engine.hooks import autoload, bootstrap
lines = []
class _Keep(logging.Handler):
    def emit(self, record):
        lines.append(record.getMessage())
logging.getLogger("cp_engine.hooks").addHandler(_Keep())
autoload.install()                       # what the .pth line does at interpreter start
import sglang                            # patch() runs here, before any target module exists
assert "{POLICY}" not in sys.modules
boot = bootstrap.state("sglang")
import {POLICY}, {UNIFIED}, {CHAT}       # patch -> import: wrapped as each module loads
out = {{"after_import": state(), "boot": boot}}
from cp_engine.hooks.sglang import patch
n = len(patch.installed())
from sglang.srt.plugins import load_plugins
load_plugins()                           # the scheduler's entry-point path on top
out["after_plugins"] = state(); out["same"] = len(patch.installed()) == n; out["nested"] = nested()
out["startup"] = [ln for ln in lines if ln.startswith("cp_engine active in SGLang")]
print(json.dumps(out))
""")
    assert r["boot"] == "patched" and all(r["after_import"].values())
    assert all(r["after_plugins"].values()) and r["same"] and not r["nested"]
    assert len(r["startup"]) == 1 and "features reorder,dedup,annotate,schedule,eviction_sync" in r["startup"][0]


_SPAWN = """
import json, multiprocessing as mp, sys
def child(q, use_entry_point):
    import sglang_support; sglang_support.install_torchvision_standin()
    if use_entry_point:
        from sglang.srt.plugins import load_plugins
        load_plugins()  # what SGLang's scheduler process calls first
    import POLICY as p
    from cp_engine.hooks.wrapping import is_wrapped
    from cp_engine.hooks import bootstrap
    q.put({"wrapped": is_wrapped(p.SchedulePolicy, "calc_priority"), "boot": bootstrap.state("sglang")})
if __name__ == "__main__":
    ctx = mp.get_context("spawn")  # how SGLang starts its scheduler
    q = ctx.Queue(); proc = ctx.Process(target=child, args=(q, USE_EP)); proc.start()
    res = q.get(timeout=240); proc.join(60)
    print(json.dumps(res))
"""


def _spawn(tmp_path, use_entry_point: bool, no_site: bool) -> dict:
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    head = ""
    if no_site:  # site off: no .pth runs, here or in the spawned child (spawn passes -S on)
        head = (f"import sys; sys.path[:0] = [{root!r}, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}]; "
                f"sys.path.append({sysconfig.get_paths()['purelib']!r})\n")
    else:
        head = f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r})\n"
    script = tmp_path / "spawn_check.py"
    script.write_text(head + _SPAWN.replace("POLICY", POLICY).replace("USE_EP", str(use_entry_point)))
    cmd = [sys.executable] + (["-S"] if no_site else []) + [str(script)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert out.returncode == 0 and lines, f"rc={out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return json.loads(lines[-1])


def test_entry_point_alone_patches_a_spawned_child(tmp_path):
    """No .pth at all (site disabled): the sglang.srt.plugins entry point alone patches."""
    assert _spawn(tmp_path, use_entry_point=True, no_site=True) == {"wrapped": True, "boot": "patched"}


def test_pth_in_site_packages_patches_a_spawned_child(tmp_path):
    pth = os.path.join(sysconfig.get_paths()["purelib"], "cp_engine_autoload.pth")
    if not os.path.isfile(pth):
        pytest.skip("no cp_engine_autoload.pth in this venv (scripts/setup_sglang_env.sh writes it)")
    # No plugin call in the child: only the .pth can have patched it.
    assert _spawn(tmp_path, use_entry_point=False, no_site=False) == {"wrapped": True, "boot": "patched"}


# -- drift guards: fail loudly when a symbol or signature the adapter relies on moves --
def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_drift_version_in_supported_range():
    assert patch.engine_version() is not None
    from cp_engine.hooks.sglang.table import TABLE

    assert TABLE.versions.admits(patch.engine_version())


def test_drift_every_target_is_a_plain_function_defined_on_its_class():
    from cp_engine.hooks.installer import target_of
    from cp_engine.hooks.sglang.table import TABLE

    for row in TABLE.rows:
        if row.kind != "method":
            continue
        owner, attr = target_of(row)
        raw = owner.__dict__.get(attr)
        raw = getattr(raw, "_self_cp_engine_original", raw)  # when the .pth patched it already
        assert inspect.isfunction(raw), f"{row.target} moved or changed kind"


def test_drift_signatures_the_wrappers_bind():
    from sglang.srt.entrypoints.openai.serving_base import OpenAIServingBase
    from sglang.srt.entrypoints.openai.serving_chat import OpenAIServingChat
    from sglang.srt.managers.schedule_policy import SchedulePolicy
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache

    assert _params(SchedulePolicy.calc_priority)[:2] == ["self", "waiting_queue"]
    assert _params(OpenAIServingBase.handle_request)[:3] == ["self", "request", "raw_request"]
    assert _params(OpenAIServingChat._convert_to_internal_request)[:3] == ["self", "request", "raw_request"]
    assert "handle_request" not in OpenAIServingChat.__dict__  # else wrap the subclass too
    assert _params(RadixCache.__init__)[:2] == ["self", "params"]
    assert _params(UnifiedRadixCache.__init__)[:2] == ["self", "params"]
    for name in ("priority_sign", "tree_cache", "enable_priority_scheduling"):
        assert f"self.{name}" in inspect.getsource(SchedulePolicy.__init__)
    assert "enable_priority_scheduling" in _params(SchedulePolicy.__init__)


def test_drift_fields_and_events():
    import dataclasses

    from sglang.srt.disaggregation.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
    from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
    from sglang.srt.managers.scheduler_components.kv_events_publisher import SchedulerKvEventsPublisher
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams

    names = {f.name for f in dataclasses.fields(CacheInitParams)}
    assert {"enable_kv_cache_events", "disable", "page_size"} <= names
    pub = {f.name for f in dataclasses.fields(SchedulerKvEventsPublisher)}
    assert {"enable_kv_cache_events", "tree_cache"} <= pub
    assert {"block_hashes", "token_ids", "parent_block_hash"} <= set(BlockStored.__struct_fields__)
    assert "block_hashes" in BlockRemoved.__struct_fields__ and AllBlocksCleared is not None
    fields = ChatCompletionRequest.model_fields
    assert {"messages", "custom_params", "input_ids", "chat_template_kwargs"} <= set(fields)
    # Why the raw body is read: the request model drops unknown top-level fields.
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "q"}],
                                                "context_blocks": ["a"]})
    assert not hasattr(req, "context_blocks") and "context_blocks" not in (req.model_extra or {})


def test_drift_hints_survive_sampling_params_and_ipc(scheduler_ctx_once):
    import msgspec
    from sglang.srt.sampling.sampling_params import SamplingParams

    from cp_engine.hooks.sglang import hints
    from cp_engine.request_hints import build_xargs
    from cp_engine.pipeline import ContextPipeline

    prep = ContextPipeline().prepare(["a " * 50, "b " * 50], namespace="ns")
    custom = build_xargs(prep, "cp-1", 12)
    sp = SamplingParams(max_new_tokens=2, custom_params=dict(custom))
    sp.normalize(None)
    sp.verify(1000)  # SGLang validates custom_params; ours must pass
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(sp.custom_params))
    assert back == custom

    class _Req:  # only the attribute path hints.of_request reads
        sampling_params = sp

    h = hints.of_request(_Req())
    assert h is not None and h.request_id == "cp-1" and len(h.path) == 2


@pytest.fixture(scope="module")
def scheduler_ctx_once(tmp_path_factory):
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs

    from sglang_support import build_tiny_model

    args = ServerArgs(model_path=build_tiny_model(str(tmp_path_factory.mktemp("m"))), device="cpu")
    publish(args, role="scheduler")
    return args


# -- /metrics ------------------------------------------------------------------------
def test_counters_on_sglangs_metrics_route(tmp_path, monkeypatch):
    from fastapi import FastAPI
    from sglang.srt.utils.common import add_prometheus_middleware
    from starlette.testclient import TestClient

    from cp_engine.hooks.sglang import promexport

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = FastAPI()
    add_prometheus_middleware(app)  # SGLang's own /metrics mount (private registry)
    metrics.reset()
    metrics.inc("requests_rewritten", 3)
    with TestClient(app) as client:
        before = client.get("/metrics").text
        assert "cp_engine_requests_rewritten" not in before  # SGLang alone does not show it
        assert promexport.attach_to_server(app) and promexport.attach_to_server(app)
        text = client.get("/metrics").text
    assert "cp_engine_requests_rewritten_total 3.0" in text


@pytest.mark.parametrize("version", ["0.5.16", "0.6.0", "garbage"])
def test_unsupported_version_is_left_unpatched(version, monkeypatch):
    patch.unpatch()
    monkeypatch.setattr(patch, "engine_version", lambda: version)
    assert patch.patch() is False
    assert patch.installed() == []
