"""The shared results writer: one call gives JSON (with provenance), table and PNG."""
import json

import pytest

from benchmarks.common.results import paths, provenance, read_result, write_result


def _table(data):
    return "| n |\n|---|\n" + "".join(f"| {n} |\n" for n in data["ns"])


def _plot(data, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot(data["ns"])
    fig.savefig(path)


def test_one_call_writes_json_table_and_png(tmp_path, capsys):
    prov = provenance("benchmarks.planner.sim", ["--quick"])
    files = write_result("demo", {"ns": [1, 2, 3]}, table=_table, plot=_plot, prov=prov, out_dir=tmp_path)
    doc = json.loads(files.json.read_text())
    assert doc["ns"] == [1, 2, 3]
    assert doc["provenance"]["command"] == "python -m benchmarks.planner.sim --quick"
    assert {"date", "machine", "versions", "commit"} <= set(doc["provenance"])
    assert "numpy" in doc["provenance"]["versions"]
    table = files.table.read_text()
    assert table.startswith("`python -m benchmarks.planner.sim --quick` on ") and "| 3 |" in table
    assert files.png is not None and files.png.read_bytes()[:4] == b"\x89PNG"
    assert "| 3 |" in capsys.readouterr().out
    assert read_result("demo", tmp_path) == ({"ns": [1, 2, 3]}, doc["provenance"])


def test_a_failing_plot_keeps_the_numbers(tmp_path, capsys):
    def broken(data, path):
        raise RuntimeError("no axes")

    files = write_result(tmp_path / "x.json", {"a": 1}, table="| a |", plot=broken, module="m", argv=[])
    assert files.png is None and json.loads(files.json.read_text())["a"] == 1
    assert "plot x.png failed" in capsys.readouterr().err


def test_bad_calls_are_refused(tmp_path):
    with pytest.raises(ValueError, match="provenance"):
        write_result("x", {"provenance": 1}, table="", module="m", out_dir=tmp_path)
    with pytest.raises(ValueError, match="prov=... or module="):
        write_result("x", {}, table="", out_dir=tmp_path)
    (tmp_path / "old.json").write_text("{}")
    with pytest.raises(ValueError, match="not written by write_result"):
        read_result("old", tmp_path)


def test_paths_take_a_stem_or_a_json_path(tmp_path):
    assert paths("sim", tmp_path).table == tmp_path / "sim.table.md"
    assert paths(tmp_path / "engine_quick.json").png == tmp_path / "engine_quick.png"
