#!/usr/bin/env python
"""Refresh the generated patch tables in the engine docs between their markers.

    python scripts/patch_tables.py          # rewrite the docs in place
    python scripts/patch_tables.py --check  # exit 1 when a doc is out of date

``docs/vllm-plugin.md`` holds ``hooks/vllm/table.py`` and ``docs/sglang-plugin.md``
holds ``hooks/sglang/table.py`` (``Table.as_markdown()``), each between
``<!-- patches:start -->`` / ``<!-- patches:end -->``, so the docs cannot drift from
what the plugin applies. Reads the tables only: no engine needs to be installed.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from readme_sections import replace_section  # noqa: E402


def documents() -> dict[Path, str]:
    """Each doc holding a patch table, with the table it must hold."""
    from cp_engine.hooks.sglang.table import TABLE as SGLANG
    from cp_engine.hooks.vllm.table import TABLE as VLLM

    return {ROOT / "docs" / "vllm-plugin.md": VLLM.as_markdown(),
            ROOT / "docs" / "sglang-plugin.md": SGLANG.as_markdown()}


def main(argv=None) -> int:
    stale = 0
    for path, table in documents().items():
        old = path.read_text()
        new = replace_section(old, "patches", table)
        if new != old:
            stale += 1
            if "--check" not in (argv or sys.argv[1:]):
                path.write_text(new)
    return 1 if stale and "--check" in (argv or sys.argv[1:]) else 0


if __name__ == "__main__":
    sys.exit(main())
