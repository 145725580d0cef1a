"""benchmarks/RESULTS.md and the result files agree: its generated sections are what the
files say now, every result file names a command that still runs, and every table
beside a result file is that file's table."""
from __future__ import annotations

import importlib.util
import json
import shutil

from benchmarks.common import results_page
from benchmarks.common.results import PROVENANCE, RESULTS, provenance_line

# Written outside the shared writer: README's measured first-run timings (by hand) and
# the blend simulation's own JSON.
NO_PROVENANCE = {"first_run.json", "blend_sim.json"}


def test_results_md_matches_the_result_files():
    text = results_page.PAGE.read_text()
    assert results_page.refresh(text) == text, \
        "benchmarks/RESULTS.md is stale: run python -m benchmarks.common.results_page"


def test_a_changed_result_file_changes_the_page(tmp_path):
    for f in RESULTS.glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    exact = json.loads((tmp_path / "engine_targets_exact.json").read_text())
    exact["runs"][0]["arms"]["on+batch"]["recomputed_tokens"] //= 2
    (tmp_path / "engine_targets_exact.json").write_text(json.dumps(exact))
    text = results_page.PAGE.read_text()
    changed = results_page.refresh(text, tmp_path)
    assert changed != text
    assert f"({exact['runs'][0]['arms']['on+batch']['recomputed_tokens']:,} tok)" in changed


def test_every_result_file_names_a_command_that_exists():
    for path in sorted(RESULTS.glob("*.json")):
        if path.name in NO_PROVENANCE:
            continue
        prov = json.loads(path.read_text()).get(PROVENANCE)
        assert prov and prov.get("command") and prov.get("machine"), f"{path.name}: no provenance"
        words = prov["command"].split()
        module = words[words.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{path.name}: {module} does not exist"


def test_every_table_is_its_result_files_table():
    tables = sorted(RESULTS.glob("*.table.md"))
    assert tables
    for table in tables:
        source = table.with_name(table.name[: -len(".table.md")] + ".json")
        assert source.exists(), f"{table.name} has no result file"
        prov = json.loads(source.read_text())[PROVENANCE]
        assert table.read_text().startswith(provenance_line(prov)), f"{table.name} was not written from {source.name}"
