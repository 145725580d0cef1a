"""Row ``blend_config`` on a real ``EngineArgs.create_engine_config`` (tiny model, no engine
started): ``CP_ENGINE_BLEND=1`` sets the blend connector, keeps a user's connector, and the
row is not applied when the flag is off. The connector module imports without a worker or
scheduler module (the API server imports it while building its config)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from vllm_server import tiny_model_dir, vllm_available

pytestmark = [pytest.mark.vllm, pytest.mark.skipif(not vllm_available(), reason="vllm not installed")]


def _engine_args(**kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=tiny_model_dir(), dtype="float32", enforce_eager=True, max_model_len=4096,
                      enable_prefix_caching=True, **kw)


def _create(args):
    from cp_engine.hooks.vllm.blend_config import create_engine_config_wrapper
    from vllm.engine.arg_utils import EngineArgs

    return create_engine_config_wrapper(EngineArgs.create_engine_config.__get__(args), args, (), {})


def test_blend_on_sets_the_connector_with_the_recompute_policy():
    from cp_engine.hooks.vllm.blend_config import is_blend_config

    cfg = _create(_engine_args())
    kvt = cfg.kv_transfer_config
    assert is_blend_config(kvt) and kvt.kv_role == "kv_both" and kvt.kv_load_failure_policy == "recompute"
    # vLLM resolved the class from the module path while building the config
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    assert KVConnectorFactory.get_connector_class(kvt).__name__ == "BlendConnector"


def test_blend_leaves_async_scheduling_off_unless_asked_and_the_worker_refuses_it():
    from cp_engine.hooks.vllm.blend_worker import _refusal

    args = _engine_args()
    assert args.async_scheduling is None  # vLLM decides: on by default on a GPU
    cfg = _create(args)
    assert args.async_scheduling is False and cfg.scheduler_config.async_scheduling is False
    assert _refusal(cfg) == ""
    asked = _engine_args(async_scheduling=True)
    _create(asked)
    assert asked.async_scheduling is True  # a user's explicit choice is kept
    cfg.scheduler_config.async_scheduling = True  # as a GPU platform leaves it (the CPU one forces it off)
    assert _refusal(cfg) == "async_scheduling"


def test_a_users_connector_is_kept_and_counted():
    from cp_engine.hooks import metrics
    from vllm.config import KVTransferConfig

    before = metrics.value("blend_disabled", reason="user_connector")
    user = KVTransferConfig(kv_connector="ExampleConnector", kv_role="kv_both")
    cfg = _create(_engine_args(kv_transfer_config=user))
    assert cfg.kv_transfer_config.kv_connector == "ExampleConnector"
    assert cfg.kv_transfer_config.kv_connector_module_path is None
    assert metrics.value("blend_disabled", reason="user_connector") == before + 1


def test_the_row_is_gated_by_the_blend_flag():
    from cp_engine.config import load_config
    from cp_engine.hooks.vllm.table import TABLE

    row = TABLE.row("blend_config")
    assert row.features() == ("blend",) and row.signature == ("self",)
    assert not load_config({}).blend and load_config({"CP_ENGINE_BLEND": "1"}).blend
    assert not any(getattr(load_config({}), f) for f in row.features())


def test_the_connector_module_imports_neither_side():
    code = ("import sys, cp_engine.hooks.vllm.blend_connector as c; "
            "print(sorted(m for m in sys.modules if m.startswith('cp_engine.hooks.vllm.blend')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={"CP_ENGINE_DISABLE": "1", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['cp_engine.hooks.vllm.blend_connector']"
