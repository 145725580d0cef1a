"""Every row of both patch tables against the real engine modules: no drift, applied by
the installer, undone exactly (the host object is the one it shipped with again).

vLLM rows run on this venv's vLLM; SGLang rows need ``.venv-sglang``
(``scripts/setup_sglang_env.sh``) and are skipped, saying so, elsewhere.
"""
from __future__ import annotations

import importlib
import importlib.util
import shutil
import tempfile

import pytest
import wrapt

from cp_engine.hooks import channel, metrics, runtime
from cp_engine.hooks.installer import Installer, drift, target_of
from cp_engine.hooks.ledger import Row, Table
from cp_engine.hooks.sglang.table import TABLE as SGLANG
from cp_engine.hooks.vllm.table import TABLE as VLLM
from cp_engine.hooks.wrapping import is_wrapped


@pytest.fixture
def runtime_dir(monkeypatch):
    base = tempfile.mkdtemp(prefix="cpt", dir="/tmp")
    monkeypatch.setenv("XDG_RUNTIME_DIR", base)
    monkeypatch.delenv(runtime.INSTANCE_ENV, raising=False)
    yield base
    channel.stop_all()
    shutil.rmtree(base, ignore_errors=True)


def _ours_on_registry() -> bool:
    from prometheus_client import REGISTRY

    return any(fam.name.startswith("cp_engine_") for fam in REGISTRY.collect())


def _state(row: Row):
    """What the row changes, read from the host (compared before/after)."""
    owner, attr = target_of(row)
    if row.kind in ("method", "factory"):
        return vars(owner)[attr]
    if row.kind == "registry":
        return _ours_on_registry()
    if row.kind == "service":
        return channel._receiver is not None
    if row.kind == "route":
        app = getattr(owner, attr)  # a route row's target is the server's app
        return [(getattr(r, "path", None), getattr(r, "app", None)) for r in app.routes]
    raise AssertionError(row.kind)


def _assert_changed(row: Row, before) -> None:
    owner, attr = target_of(row)
    if row.kind in ("method", "factory"):
        assert is_wrapped(owner, attr), row.target
        assert not isinstance(vars(owner)[attr].__wrapped__, wrapt.ObjectProxy)  # wrapped once
    elif row.kind in ("registry", "service"):
        assert _state(row) is True and before is False, row.target
    else:
        assert _state(row) != before, row.target


def _drift_patch_unpatch(table: Table, row: Row, version: str) -> None:
    assert drift(row) is None, drift(row)
    if row.kind == "registry":
        metrics.unexport_prometheus()  # registered by an earlier test of this process
    if row.trigger_module:
        importlib.import_module(row.trigger_module)
    before = _state(row)
    inst = Installer(table, lambda r: r is row)
    assert inst.patch(version)
    if row.on_demand:
        assert not inst.applied(row.name)  # only its adapter applies it
        assert inst.apply(row.name)
    assert inst.applied(row.name), inst.status()
    _assert_changed(row, before)
    assert inst.patch(version) and inst.apply(row.name)  # again: nothing nested, still one row
    _assert_changed(row, before)
    assert inst.unpatch() == 1
    after = _state(row)
    if row.kind in ("method", "factory"):
        assert after is before  # the very object the engine shipped
    else:
        assert after == before


def _ids(table: Table) -> list[str]:
    return [r.name for r in table.rows]


# ---------------------------------------------------------------------------- vLLM
@pytest.mark.vllm
@pytest.mark.parametrize("row", VLLM.rows, ids=_ids(VLLM))
def test_vllm_row_drift_patch_unpatch(row, runtime_dir):
    pytest.importorskip("vllm")
    from cp_engine.hooks.vllm import patch

    patch.unpatch()  # this process's .pth may have applied the table at import
    _drift_patch_unpatch(VLLM, row, patch.vllm_version())


# ---------------------------------------------------------------------------- SGLang
@pytest.fixture
def sglang_ready():
    if importlib.util.find_spec("sglang") is None:  # before any stand-in import machinery
        pytest.skip("SGLang not installed: these rows run under .venv-sglang (scripts/setup_sglang_env.sh)")
    from sglang_support import require_sglang

    require_sglang()
    from cp_engine.hooks.sglang import patch

    patch.unpatch()
    return patch


@pytest.mark.sglang
@pytest.mark.parametrize("row", SGLANG.rows, ids=_ids(SGLANG))
def test_sglang_row_drift_patch_unpatch(row, sglang_ready, runtime_dir, monkeypatch, tmp_path):
    if row.kind == "route":  # SGLang's /metrics mount exists once its server adds it
        from fastapi import FastAPI
        from sglang.srt.entrypoints import http_server
        from sglang.srt.utils.common import add_prometheus_middleware

        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
        app = FastAPI()
        add_prometheus_middleware(app)
        monkeypatch.setattr(http_server, "app", app)
        metrics.export_prometheus()
    if row.optional and drift(row) is not None:
        pytest.skip(f"{row.target} absent in this SGLang: {drift(row)}")
    _drift_patch_unpatch(SGLANG, row, sglang_ready.engine_version())
