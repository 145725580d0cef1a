"""Every engine-free benchmark's ``--quick`` path, end to end, at its smallest size: it
runs, and the shared writer leaves JSON (with the command that reproduces it), table
and plot. The live-server benchmarks' ``--quick`` runs need a server (their parts are
tested in test_bench_engine.py and test_bench_quality.py)."""
from __future__ import annotations

import json

import pytest

from benchmarks.common.results import RESULTS, read_result
from benchmarks.common.workloads import hotpotqa_available


def _run(main, module: str, argv: list[str], out) -> dict:
    assert main(argv) == 0
    data, prov = read_result(out)
    assert prov["command"] == " ".join(["python", "-m", module, *argv])
    table = out.with_name(out.stem + ".table.md").read_text()
    assert table.startswith(f"`{prov['command']}` on ") and "|---" in table
    return data


def _png(out) -> bool:
    return out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


def test_planner_sim_quick(tmp_path):
    from benchmarks.planner import sim

    out = tmp_path / "sim.json"
    data = _run(sim.main, "benchmarks.planner.sim", ["--quick", "--families", "synthetic", "--no-peer", "--index-requests", "500",
                                                      "--measure-requests", "50", "--out", str(out)], out)
    synthetic = data["workloads"]
    assert [(w["family"], w["requests"]) for w in synthetic] == [("synthetic", 100), ("synthetic", 1000)]
    for w in synthetic:
        ours, arrival = w["methods"]["cp_engine"]["hit"]["inf"], w["methods"]["arrival"]["hit"]["inf"]
        assert arrival <= ours <= w["bound"]
        assert w["methods"]["contextpilot"] == {"skipped": "--no-peer"}
    assert data["online"]["indexed_requests"] == 500 and data["meta"]["quick"]
    assert _png(out)


def test_planner_scaling_quick(tmp_path):
    from benchmarks.planner import scaling

    out = tmp_path / "scaling.json"
    data = _run(scaling.main, "benchmarks.planner.scaling", ["--quick", "--out", str(out)], out)
    points = data["families"]["synthetic"]["points"]
    assert [p["requests"] for p in points] == list(scaling.QUICK_NS) and all(p["seconds"] > 0 for p in points)
    assert _png(out)


def test_planner_scaling_with_token_lengths(tmp_path):
    from benchmarks.planner import scaling

    out = tmp_path / "scaling_weighted.json"
    argv = ["--quick", "--ns", "200", "--token-lengths", "--out", str(out)]
    data = _run(scaling.main, "benchmarks.planner.scaling", argv, out)
    assert data["meta"]["token_lengths"] and data["meta"]["peer_ns"] == []
    (point,) = data["families"]["synthetic"]["points"]
    assert point["requests"] == 200 and point["ours"]["tree_nodes"] > 0
    table = out.with_name(out.stem + ".table.md").read_text()
    assert "token length" in table


def test_planner_optimality_quick(tmp_path):
    from benchmarks.planner import optimality

    out = tmp_path / "opt.json"
    data = _run(optimality.main, "benchmarks.planner.optimality", ["--quick", "--n", "10", "--out", str(out)], out)
    assert data["workload"].startswith("synthetic_10")
    assert data["ours_hits"] <= data["max_hits_upper_bound"] <= data["total_blocks"]


def test_planner_partners_quick(tmp_path):
    from benchmarks.planner import partners

    out = tmp_path / "partners.json"
    data = _run(partners.main, "benchmarks.planner.partners", ["--quick", "--repeat", "1", "--out", str(out)], out)
    assert [r["workload"] for r in data["rows"]] == ["synthetic_1000"]
    assert 0 < data["rows"][0]["postings"]["hit"] < 1


def test_micro_online_quick(tmp_path):
    from benchmarks.micro import online

    out = tmp_path / "online.json"
    data = _run(online.main, "benchmarks.micro.online",
                ["--quick", "--indexed", "500", "--measured", "50", "--out", str(out)], out)
    assert {r["workload"] for r in data["runs"]} == {"zipf"}
    assert {r["config"] for r in data["runs"]} == {"all indexed", "shipped bound"}
    assert all(0 < r["query"]["p50_ms"] <= r["query"]["p99_ms"] for r in data["runs"])


def test_micro_kernels_quick(tmp_path):
    from benchmarks.micro import kernels

    out = tmp_path / "kernels.json"
    data = _run(kernels.main, "benchmarks.micro.kernels",
                ["--quick", "--sizes", "200", "--workloads", "uniform", "--out", str(out)], out)
    (row,) = data["rows"]
    assert row["n"] == 200 and row["numpy_s"] > 0 and row["peer_dense_s"] > 0  # the peer runs up to 1k
    assert _png(out)


def test_micro_queue_order_quick(tmp_path):
    from benchmarks.micro import queue_order

    out = tmp_path / "queue.json"
    data = _run(queue_order.main, "benchmarks.micro.queue_order", ["--quick", "--sizes", "300", "--out", str(out)],
                out)
    assert [r["n"] for r in data["rows"]] == [300] and data["rows"][0]["add_us"] > 0
    assert _png(out)


@pytest.mark.skipif(not hotpotqa_available(), reason="HotpotQA not fetched (benchmarks/setup_bench.sh)")
def test_engine_token_sim_and_prefill_quick(tmp_path):
    pytest.importorskip("transformers")  # the tiny model's tokenizer and chat template
    pytest.importorskip("torch")
    from benchmarks.engine import prefill_gpu, token_sim

    out, pairs = tmp_path / "token_sim.json", tmp_path / "pairs.json"
    data = _run(token_sim.main, "benchmarks.engine.token_sim",
                ["--quick", "--n", "4", "--arms", "off,on+batch", "--out", str(out), "--pairs-out", str(pairs)], out)
    off, batch = data["arms"]
    assert off["cached_tokens"] <= batch["cached_tokens"] and off["prompt_tokens"] == off["recomputed_tokens"]
    assert len(json.loads(pairs.read_text())["arms"]["off"]) == 4
    out = tmp_path / "prefill.json"
    data = _run(prefill_gpu.main, "benchmarks.engine.prefill_gpu",
                [str(pairs), "--quick", "--limit", "1", "--out", str(out)], out)
    (run,) = data["runs"]
    assert run["device"] == "cpu" and [r["arm"] for r in run["rows"]] == ["off", "on+batch"]


def test_blend_gpu_quick_on_cpu(tmp_path):
    """The GPU timing's smoke run on the CPU: the plugin's recompute accepts the torch
    stand-in decoder, the exactness checks pass, and every row is timed."""
    pytest.importorskip("torch")
    from benchmarks.blend import bench_blend_gpu

    out = tmp_path / "blend_gpu.json"
    data = _run(bench_blend_gpu.main, "benchmarks.blend.bench_blend_gpu",
                ["--quick", "--device", "cpu", "--out", str(out), "--project",
                 str(RESULTS / "blend_engine_qwen_bf16_rag400.json")], out)
    assert [a["arm"] for a in data["projection"]["arms"]] == ["plain", "blend-order", "blend-order"]
    assert data["projection"]["arms"][0]["projected_plain_over_arm"] == pytest.approx(1.0)
    assert data["checks"]["moved_block_rel_err"] < 1e-4 and data["checks"]["full_recompute_rel_err"] < 5e-4
    assert [(r["length"], r["batch"]) for r in data["rows"]] == [(256, 1), (256, 2)]
    assert all(r["prefill_ms_per_token"] > 0 and r["recompute_ms_per_token"] > 0 for r in data["rows"])


def test_blend_gpu_projects_from_earlier_timings(tmp_path):
    """``--timings`` re-projects a RAG result onto stored timings without running the model."""
    from benchmarks.blend import bench_blend_gpu

    out = tmp_path / "projected.json"
    rag = str(RESULTS / "blend_engine_qwen_bf16_rag400_r005.json")
    data = _run(bench_blend_gpu.main, "benchmarks.blend.bench_blend_gpu",
                ["--timings", str(RESULTS / "blend_gpu_h200.json"), "--project", rag, "--out", str(out)], out)
    arms = data["projection"]["arms"]
    assert [(a["arm"], a["ratio"]) for a in arms] == [("plain", None), ("blend-order", 0.05), ("blend-order", 0.15)]
    # fewer computed tokens project to less time with the same timings
    assert arms[1]["projected_s"] < arms[2]["projected_s"] < arms[0]["projected_s"]
