"""The patch tables without any engine: readable, well formed, documented as they are."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cp_engine.hooks.ledger import KINDS, Row
from cp_engine.hooks.sglang.table import TABLE as SGLANG
from cp_engine.hooks.vllm.table import TABLE as VLLM

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

import patch_tables  # noqa: E402

FEATURES = {"reorder", "dedup", "annotate", "schedule", "eviction_sync", "blend"}


def test_tables_load_without_any_engine():
    code = ("import sys; from cp_engine.hooks.vllm.table import TABLE as V; "
            "from cp_engine.hooks.sglang.table import TABLE as S; "
            "from cp_engine.hooks.vllm import patch; from cp_engine.hooks.sglang import patch as sp; "
            "print(len(V.rows), len(S.rows), sorted(m for m in sys.modules "
            "if m.split('.')[0] in ('vllm', 'sglang', 'prometheus_client')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={"CP_ENGINE_DISABLE": "1", "PATH": "/usr/bin:/bin"}, check=True).stdout
    assert out.strip() == f"{len(VLLM.rows)} {len(SGLANG.rows)} []"


@pytest.mark.parametrize("table", [VLLM, SGLANG], ids=["vllm", "sglang"])
def test_every_row_is_well_formed(table):
    assert table.versions.admits(table.versions.low) and table.versions.admits(table.versions.high)
    for row in table.rows:
        assert isinstance(row, Row) and row.kind in KINDS
        assert set(row.features()) <= FEATURES, row
        assert row.handler.startswith("cp_engine.hooks."), row
        assert row.why and row.remove_when, row
        assert row.on_demand or row.trigger_module, row
        if row.kind in ("method", "factory"):
            assert row.signature, f"{row.name}: a wrapped callable declares what it binds"


def test_only_run_releases_are_declared():
    # vllm_matrix.sh / CI ran 0.27.0-0.32.0 (docs/vllm-version-matrix.md); SGLang CI runs 0.5.23.
    assert not VLLM.versions.admits("0.33.0") and VLLM.versions.admits("0.27.0")
    assert VLLM.versions.admits("0.32.0") and not VLLM.versions.admits("0.26.9")
    assert SGLANG.versions.admits("0.5.23") and not SGLANG.versions.admits("0.5.22")


def test_every_host_change_kind_is_in_a_table():
    kinds = {r.kind for r in VLLM.rows} | {r.kind for r in SGLANG.rows}
    assert kinds == set(KINDS)


def test_docs_patch_tables_match_the_code():
    for path, table in patch_tables.documents().items():
        text = path.read_text()
        assert table in text, f"{path.name} is stale: run python scripts/patch_tables.py"
    assert patch_tables.main(["--check"]) == 0
