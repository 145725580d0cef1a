"""scripts/demo_vllm.py's results: the off/on table and the files it writes (no server)."""
import importlib.util
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_spec = importlib.util.spec_from_file_location("demo_vllm", os.path.join(ROOT, "scripts", "demo_vllm.py"))
demo = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(demo)

OFF = {"hit_ratio": 0.25, "prompt": 1000, "computed": 750, "wall_s": 30.0}
ON = {"hit_ratio": 0.5, "prompt": 900, "computed": 450, "wall_s": 24.0}


def test_table_shows_gains_as_better_than_one_and_only_finished_arms():
    lines = demo.table({"plugin off": OFF, "plugin on": ON})
    assert lines[0].split() == ["plugin", "off", "plugin", "on", "gain"]
    gains = {ln[:28].strip(): ln.split()[-1] for ln in lines[1:]}
    assert gains == {"prefix-cache hit ratio": "2.00x", "prompt tokens": "1.11x",
                     "prompt tokens computed": "1.67x", "wall time (s)": "1.25x"}
    half = demo.table({"plugin off": OFF})
    assert "gain" not in half[0] and half[3].split()[-1] == "750"


def test_results_files_hold_the_table_numbers_and_log_paths(tmp_path):
    meta = {"finished_at": "2026-12-03 12:00:00", "logs": {"plugin off": "/l/off.log"}, "demo_wall_s": 99.0}
    md_path, json_path = demo.write_results(str(tmp_path / "out"), "RAG: summary", {"plugin off": OFF}, meta)
    text = open(md_path).read()
    assert "RAG: summary" in text and "\n".join(demo.table({"plugin off": OFF})) in text and "/l/off.log" in text
    saved = json.load(open(json_path))
    assert saved["results"] == {"plugin off": OFF} and saved["demo_wall_s"] == 99.0
