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


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    assert "scripts/demo.sh" in first_block and "scripts/test.sh" in first_block
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
