"""README's generated sections match the code (scripts/readme_sections.py)."""
import importlib.util
from pathlib import Path

from cp_engine.config import markdown_table

ROOT = Path(__file__).resolve().parents[2]


def _sections():
    spec = importlib.util.spec_from_file_location("readme_sections", ROOT / "scripts" / "readme_sections.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_flag_table_matches_config():
    text = (ROOT / "README.md").read_text()
    assert _sections().replace_section(text, "flags", markdown_table()) == text, \
        "README flag table is stale: run python scripts/readme_sections.py"


def test_results_and_reliability_figures_match_the_result_files():
    sections = _sections()
    text = (ROOT / "README.md").read_text()
    for name in ("results", "reliability", "first-run"):
        body = sections.generated_sections()[name]
        assert sections.replace_section(text, name, body) == text, \
            f"README {name} section differs from benchmarks/results: run python scripts/readme_sections.py"


def test_results_section_changes_when_a_result_file_changes(tmp_path, monkeypatch):
    """The generator reads the files (no figure is written into it): a changed count in a
    result file changes the README row."""
    import json
    import shutil
    import sys

    sys.path.insert(0, str(ROOT / "scripts"))
    import readme_results

    for f in (ROOT / "benchmarks" / "results").glob("*.json"):
        shutil.copy(f, tmp_path / f.name)
    exact = json.loads((tmp_path / "engine_targets_exact.json").read_text())
    exact["runs"][0]["arms"]["on+batch"]["recomputed_tokens"] //= 2
    (tmp_path / "engine_targets_exact.json").write_text(json.dumps(exact))
    before = readme_results.results_table()
    monkeypatch.setattr(readme_results, "RESULTS", tmp_path)
    after = readme_results.results_table()
    assert before != after and "batch plan" in after


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "scripts/demo.sh" in first_block and "scripts/test.sh" in first_block
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
