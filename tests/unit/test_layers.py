"""Dependencies point one way: cp_engine (core) <- cp_engine.kernels <- cp_engine.hooks.

Read from the sources (no import): a core module that imports the hooks, or the
kernels anywhere but the composition point ``api.py``, fails here.
"""
from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "cp_engine"
KERNELS_ALLOWED = {"api.py"}  # plugs the kernels' partner search into plan_batch


def _imports(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: inside the cp_engine package
                base = "cp_engine" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_core_modules_import_neither_hooks_nor_kernels():
    modules = sorted(CORE.glob("*.py"))
    assert {"queue_order.py", "eviction_mapping.py", "request_hints.py"} <= {p.name for p in modules}
    for path in modules:
        names = _imports(path)
        assert not any(n.startswith(("cp_engine.hooks", "hooks")) for n in names), path.name
        if path.name not in KERNELS_ALLOWED:
            assert not any(n.startswith(("cp_engine.kernels", "kernels")) for n in names), path.name
