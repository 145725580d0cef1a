#!/usr/bin/env python
"""Refresh the generated README sections between their markers.

    python scripts/readme_sections.py          # rewrite README.md in place
    python scripts/readme_sections.py --check  # exit 1 when README.md is out of date

Section ``flags``: the table from ``cp_engine.config.markdown_table()``, so README's
flag table cannot drift from the code. Sections ``results`` and ``reliability``: the
figures read from ``benchmarks/results/*.json`` (``scripts/readme_results.py``), so
README cannot drift from what the benchmarks last wrote.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n)(.*?)(<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- {name}:start/end --> markers")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(3), text)


def generated_sections() -> dict[str, str]:
    """Every generated section's body, by marker name."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]
    from cp_engine.config import markdown_table
    from readme_results import SECTIONS

    return {"flags": markdown_table(), **{name: make() for name, make in SECTIONS.items()}}


def refresh(text: str) -> str:
    for name, body in generated_sections().items():
        text = replace_section(text, name, body)
    return text


def main(argv=None) -> int:
    old = README.read_text()
    new = refresh(old)
    if "--check" in (argv or sys.argv[1:]):
        return 0 if new == old else 1
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
