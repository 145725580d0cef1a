"""The reliability runs share one result file: each run records its own section with
its own provenance and keeps the others'."""
from benchmarks.common.results import read_result
from benchmarks.reliability import report

STORM = {"requests": 100, "kv_blocks": 40, "elapsed_s": 3.0, "errors": 0, "claims": 5, "claimed_tokens_total": 640,
         "cached_tokens_total": 700, "stale_claims": 0, "max_deficit_tokens": 0, "stale_bound_tokens": 128,
         "over_bound": [], "invariant_violation_count": 0, "min_refs_seen": 1, "max_nodes_seen": 9,
         "evictions_applied": 12.0, "evicted_nodes": 7, "ok": True}
FUZZ = {"payloads": 200, "seed": 0, "workers": 4, "elapsed_s": 20.0, "verdicts": {"ok": 120, "error": 80},
        "statuses": {"200": 120, "400": 80}, "crashes": [], "unhealthy_at": [], "healthy_at_end": True,
        "index_consistent": True, "index": {"nodes": 3}, "ok": False}


def test_each_run_keeps_its_section_and_provenance(tmp_path):
    storm = report.start("storm", ["--quick"])
    report.record("storm", STORM, storm, name="rel", out_dir=tmp_path)
    fuzz = report.start("fuzz_live", ["--quick"])
    report.record("fuzz_live", FUZZ, fuzz, name="rel", out_dir=tmp_path)
    data, prov = read_result("rel", tmp_path)
    assert prov == fuzz and data["storm"]["provenance"] == storm and data["fuzz_live"]["provenance"] == fuzz
    assert {k: v for k, v in data["storm"].items() if k != "provenance"} == STORM
    table = (tmp_path / "rel.table.md").read_text()
    assert "## Eviction storm: 100 requests" in table and "## Live fuzzer: 200 payloads" in table
    assert "`python -m benchmarks.reliability.storm --quick`" in table and "Verdict: **FAIL**" in table
    assert not (tmp_path / "rel.png").exists()  # the plot is the soak's timelines
