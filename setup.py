"""setuptools shim: all metadata lives in pyproject.toml.

Its one job: ship ``cp_engine_autoload.pth`` at the *root* of the wheel's purelib, so
``pip install cp-engine`` puts it directly in site-packages, where ``site`` executes
it at every interpreter start (``data_files`` would land under ``<prefix>/``, outside
site-packages, and never load). The line itself is defined once, in
``hooks/autoload.py`` (read here without importing the package).
"""
from __future__ import annotations

import ast
import os

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = os.path.dirname(os.path.abspath(__file__))


def _autoload_constants() -> dict[str, str]:
    with open(os.path.join(HERE, "hooks", "autoload.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            if node.targets[0].id in ("PTH_NAME", "PTH_LINE"):
                out[node.targets[0].id] = ast.literal_eval(node.value)
    return out


class build_py_with_pth(build_py):
    """build_py that also writes the autoload .pth at the build root."""

    def run(self):
        super().run()
        consts = _autoload_constants()
        self.mkpath(self.build_lib)
        with open(os.path.join(self.build_lib, consts["PTH_NAME"]), "w", encoding="utf-8") as f:
            f.write(consts["PTH_LINE"] + "\n")

    def get_outputs(self, include_bytecode=True):
        return list(super().get_outputs(include_bytecode)) + [
            os.path.join(self.build_lib, _autoload_constants()["PTH_NAME"])
        ]


setup(cmdclass={"build_py": build_py_with_pth})
