"""tests/warm_bytecode.py: a module's missing bytecode is found without importing it,
nothing is compiled where none is missing or Python writes none, and waiting without a
compile in flight returns at once."""
from __future__ import annotations

import py_compile
import sys

import warm_bytecode


def test_missing_bytecode_is_seen_without_importing(tmp_path, monkeypatch):
    pkg = tmp_path / "cp_warm_pkg"
    (pkg / "sub").mkdir(parents=True)
    for path in (pkg / "__init__.py", pkg / "sub" / "__init__.py", pkg / "sub" / "mod.py"):
        path.write_text("raise RuntimeError('imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert warm_bytecode.missing_bytecode(("cp_warm_pkg.sub.mod",))
    py_compile.compile(str(pkg / "sub" / "mod.py"), doraise=True)
    assert not warm_bytecode.missing_bytecode(("cp_warm_pkg.sub.mod",))
    assert "cp_warm_pkg" not in sys.modules
    assert not warm_bytecode.missing_bytecode(("cp_warm_absent_pkg.mod",))


def test_no_compile_where_python_writes_no_bytecode(monkeypatch):
    monkeypatch.setattr(warm_bytecode, "missing_bytecode", lambda modules=(): True)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    assert warm_bytecode.start() is False
    warm_bytecode.wait()  # returns at once: nothing in flight
