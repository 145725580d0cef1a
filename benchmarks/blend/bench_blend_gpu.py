"""Blend's load and recompute path timed with torch on a GPU, beside a full prefill of the same model.

    python -m benchmarks.blend.bench_blend_gpu                         # Qwen2.5-7B's shapes, bf16, CUDA
    python -m benchmarks.blend.bench_blend_gpu --quick --device cpu    # tiny shapes on the CPU: a smoke run

The GPU machine has torch but no vLLM, so the model is ``benchmarks.blend.torch_decoder``:
Qwen2's modules with vLLM's interface and random weights, over a paged cache in
flash-attention's layout. What runs on it is the plugin's own code:
``DecoderRecompute.from_model`` (its architecture and RoPE checks), ``run_batch`` (the
recompute the worker runs before each forward) and ``shift_k`` (the re-rotation of a
stored block's K). Per prompt length ``L`` and batch ``B``:

- **checks** (the run stops if one fails): the re-rotation on the device against the
  NumPy reference; a block's layer-0 K prefilled behind one prefix, moved by ``shift_k``,
  against the same block prefilled behind another (exact up to the cache dtype);
  recomputing every position of a prefilled prompt writes back the prefill's K/V.
- **prefill**: the full causal forward of ``B`` prompts of ``L`` random tokens, s/token.
- **recompute**: ``run_batch`` over those prompts' cache at ``--ratio`` (the first 16
  tokens of every 256 plus random others), with no check layer and with
  ``--check-layers`` (mode ``both``: every claimed token runs the check layers, then the
  selection alone), s per full-depth token; cost = that over prefill s/token, the
  ``CP_ENGINE_BLEND_RECOMPUTE_COST`` such an engine should run with.
- **load**: what the worker does per stored block: host K/V to the device, ``shift_k``,
  one cache write per layer; from pageable and from pinned host memory, s/token.

With ``--project RESULT.json`` (a ``bench_blend_engine`` batched RAG result) the row
nearest its mean prompt length gives each arm's GPU time from its exact token counts:
vLLM-computed x prefill + blend-recomputed x recompute + claimed x load; a projection,
not a served run. ``--timings GPU_RESULT.json --project RESULT.json`` projects another
RAG result onto timings measured before, without running anything.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common.results import provenance, write_result

from .bench_recompute_cost import _selection as cpu_selection
from .torch_decoder import QWEN25_7B, Dims, FlashPagedKV, build, prefill

BLOCK_SIZE = 16
STORED_BLOCK = 256  # tokens per stored block in the load timing (a typical RAG passage)
ATTENTION_BACKENDS = {"efficient": "EFFICIENT_ATTENTION", "math": "MATH", "cudnn": "CUDNN_ATTENTION"}
LOAD_TOKENS = 8192  # at most this many tokens loaded per timing


def _selection(length: int, ratio: float, rng: random.Random) -> np.ndarray:
    return np.asarray(cpu_selection(length, ratio, rng), dtype=np.int64)


class Clock:
    """Wall time of a callable, the device drained before and after."""

    def __init__(self, torch, device):
        self.torch, self.cuda = torch, torch.device(device).type == "cuda"

    def __call__(self, fn) -> float:
        if self.cuda:
            self.torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter() - t0


def _rel_err(got, want) -> float:
    got, want = got.float(), want.float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def run_checks(torch, model, paged, rec, device, rng) -> dict:
    """The three exactness checks; raises ``AssertionError`` naming the one that failed."""
    from cp_engine.blend.rope import shift_k, shift_k_numpy

    d = model.dims
    k = torch.randn(d.layers, 64, d.kv_heads, d.head_dim, device=device)
    moved = shift_k(k, 1234, rec.rope).cpu().numpy()
    ref = shift_k_numpy(k.cpu().numpy(), 1234, rec.rope)
    shift_err = float(np.abs(moved - ref).max())
    assert shift_err < 1e-4, f"shift_k on {device} differs from the NumPy reference by {shift_err}"

    block = torch.randint(100, d.vocab, (128,), device=device)
    a, b = 48, 300  # the block behind 48 tokens, then behind 300 others
    first = torch.cat([torch.randint(100, d.vocab, (a,), device=device), block])[None]
    second = torch.cat([torch.randint(100, d.vocab, (b,), device=device), block])[None]
    s1 = paged.slots(range(0, 64), 0, first.shape[1]).to(device)[None]
    s2 = paged.slots(range(64, 128), 0, second.shape[1]).to(device)[None]
    prefill(model, paged, first, s1)
    prefill(model, paged, second, s2)
    name0 = paged.layer_names[0]
    k1, _ = paged.read(name0, s1[0, a:])
    k2, _ = paged.read(name0, s2[0, b:])
    rotate_err = _rel_err(shift_k(k1, b - a, rec.rope), k2)
    tolerance = 2e-2 if paged.dtype in (torch.bfloat16, torch.float16) else 1e-4
    assert rotate_err < tolerance, f"a moved block's layer-0 K is {rotate_err:.2e} from a fresh prefill's"

    before = [paged.read(n, s2[0]) for n in paged.layer_names]
    rec.run(second[0].tolist(), s2[0], torch.arange(second.shape[1]))
    after = [paged.read(n, s2[0]) for n in paged.layer_names]
    full_err = max(max(_rel_err(ka, kb), _rel_err(va, vb)) for (kb, vb), (ka, va) in zip(before, after))
    assert full_err < 5 * tolerance, f"recomputing every position left K/V {full_err:.2e} from the prefill's"
    return {"shift_max_abs_err": shift_err, "moved_block_rel_err": rotate_err, "full_recompute_rel_err": full_err}


def _load_seconds(torch, paged, rec, clock, device, tokens: int, pinned: bool) -> float:
    """The worker's stitch (``write_moved``) of ``tokens`` tokens in stored blocks."""
    from cp_engine.hooks.vllm.blend_stitch import write_moved

    d_layers = len(paged.layer_names)
    n_blocks = max(1, tokens // STORED_BLOCK)
    # The values do not change the time: every block is the same constant.
    stored = [torch.full((d_layers, 2, STORED_BLOCK, paged.num_kv_heads, paged.head_dim), 0.5, dtype=paged.dtype)
              for _ in range(n_blocks)]
    if pinned:
        stored = [kv.pin_memory() for kv in stored]
    slots = paged.slots(range(paged.num_blocks), 0, n_blocks * STORED_BLOCK).to(device)
    moves = [(kv, 0, i * STORED_BLOCK, STORED_BLOCK) for i, kv in enumerate(stored)]
    write_moved(paged, rec.rope, slots, moves)  # warm-up
    return clock(lambda: write_moved(paged, rec.rope, slots, moves)) / (n_blocks * STORED_BLOCK)


def time_shape(torch, model, paged, rec, clock, device, length, batch, args, rng) -> dict:
    from cp_engine.hooks.vllm.blend_recompute import RecomputeJob

    d = model.dims
    per_prompt = -(-length // BLOCK_SIZE)
    slots = torch.stack([paged.slots(range(i * per_prompt, (i + 1) * per_prompt), 0, length)
                         for i in range(batch)]).to(device)
    prefill_s, plain_s, again_s, checked_s = [], [], [], []
    for rep in range(args.repeats + 1):  # the first round warms up and is dropped
        ids = torch.randint(100, d.vocab, (batch, length), device=device)
        t = clock(lambda: prefill(model, paged, ids, slots))
        chosen = [_selection(length, args.ratio, rng) for _ in range(batch)]
        token_lists = [row.tolist() for row in ids]
        plain = [RecomputeJob(token_lists[i], slots[i], torch.from_numpy(chosen[i])) for i in range(batch)]
        reports = []
        with attention(torch, args.attention):
            t_plain = clock(lambda: reports.extend(rec.run_batch(plain)))
            t_again = clock(lambda: rec.run_batch(plain))  # the same shapes a second time
        n_plain = sum(r.full_depth_tokens() for r in reports)
        checked = [RecomputeJob(token_lists[i], slots[i], torch.arange(length), args.check_layers,
                                lambda _dev, keep=chosen[i]: keep) for i in range(batch)]
        reports = []
        with attention(torch, args.attention):
            t_checked = clock(lambda: reports.extend(rec.run_batch(checked)))
        n_checked = sum(r.full_depth_tokens() for r in reports)
        if rep:
            prefill_s.append(t / (batch * length))
            plain_s.append(t_plain / n_plain)
            again_s.append(t_again / n_plain)
            checked_s.append(t_checked / n_checked)
    if args.profile:
        _profile(torch, rec, plain, args)
    p, r0, r_again, r1 = (statistics.median(x) for x in (prefill_s, plain_s, again_s, checked_s))
    tokens = batch * length
    load_tokens = min(tokens, LOAD_TOKENS)  # the cost per token does not depend on the batch
    pageable = _load_seconds(torch, paged, rec, clock, device, load_tokens, pinned=False)
    pinned = _load_seconds(torch, paged, rec, clock, device, load_tokens, pinned=device != "cpu")
    row = {"length": length, "batch": batch, "ratio": args.ratio, "check_layers": args.check_layers,
           "prefill_ms_per_token": p * 1e3, "recompute_ms_per_token": r0 * 1e3,
           "recompute_same_shapes_ms_per_token": r_again * 1e3,
           "recompute_checked_ms_per_token": r1 * 1e3, "cost": r0 / p, "cost_checked": r1 / p,
           "load_pageable_ms_per_token": pageable * 1e3, "load_pinned_ms_per_token": pinned * 1e3,
           "load_cost": min(pageable, pinned) / p}
    print(f"L={length:5d} B={batch:2d}  prefill {p * 1e3:.4f} ms/tok  recompute {r0 * 1e3:.4f} "
          f"(same shapes again {r_again * 1e3:.4f}) "
          f"(checked {r1 * 1e3:.4f}) ms/tok  cost {r0 / p:.2f} / {r1 / p:.2f}  load {pageable * 1e3:.4f} "
          f"(pinned {pinned * 1e3:.4f}) ms/tok", flush=True)
    return row


def _profile(torch, rec, jobs, args) -> None:
    """Print the ops that dominate one recompute pass (torch's profiler, CPU and device time)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with attention(torch, args.attention), profile(activities=acts) as prof:
        rec.run_batch(jobs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "cuda_time_total" if torch.cuda.is_available() else "cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18), flush=True)
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12), flush=True)


@contextlib.contextmanager
def attention(torch, backend: str):
    """The recompute's attention inside the block: the plugin's choice (``default``),
    torch's own (``torch``), or torch's with one backend allowed. The plugin's setting
    is restored on the way out."""
    from cp_engine.hooks.vllm import blend_recompute

    saved = blend_recompute.CUDA_ATTENTION
    blend_recompute.CUDA_ATTENTION = "efficient" if backend == "default" else "auto"
    try:
        if backend in ("default", "torch"):
            yield
        else:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(getattr(SDPBackend, ATTENTION_BACKENDS[backend])):
                yield
    finally:
        blend_recompute.CUDA_ATTENTION = saved


def project(rows: list[dict], result: Path) -> dict:
    """Each arm's projected GPU time from a batched RAG result's exact counts (see module doc)."""
    doc = json.loads(result.read_text())
    work = next(w for w in doc["workloads"] if w["kind"] == "rag")
    arms = work["arms"]
    plain = next(a for a in arms if a["arm"] == "plain")
    mean_len = plain["prompt_tokens"] / plain["requests"]
    length = min({r["length"] for r in rows}, key=lambda x: abs(x - mean_len))
    row = max((r for r in rows if r["length"] == length), key=lambda r: r["batch"])
    pf = row["prefill_ms_per_token"]
    rc = row["recompute_checked_ms_per_token"]
    load = min(row["load_pageable_ms_per_token"], row["load_pinned_ms_per_token"])
    base = plain["computed_tokens"] * pf
    out = []
    for a in arms:
        ms = a["vllm_local_compute"] * pf + a["blend_recomputed"] * rc + a["claimed_external"] * load
        out.append({"arm": a["arm"], "ratio": a["ratio"], "store_depth": a.get("store_depth", 0),
                    "tokens_plain_over_arm": plain["computed_tokens"] / a["computed_tokens"],
                    "projected_s": ms / 1e3, "projected_plain_over_arm": base / ms})
    return {"source": str(result), "mean_prompt_tokens": round(mean_len), "row": {"length": length, "batch": row["batch"]},
            "arms": out}


def table(data: dict) -> str:
    lines = [f"{data['device']}, recompute attention {data.get('attention', 'default')}; dims {data['dims']} (hidden, MLP, layers, heads, KV heads, head dim), "
             f"{data['dtype']}, random weights; cost = recompute s per full-depth token over prefill s/token "
             "(medians)", "",
             "Checks: " + ", ".join(f"{k} {v:.2e}" for k, v in data["checks"].items()), "",
             "| L | B | ratio | prefill ms/tok | recompute ms/tok | cost | checked ({c}) ms/tok | cost | "
             "load ms/tok (pageable / pinned) | load cost |".format(c=data["rows"][0]["check_layers"] if data["rows"] else "-"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['length']} | {r['batch']} | {r['ratio']} | {r['prefill_ms_per_token']:.4f} | "
                     f"{r['recompute_ms_per_token']:.4f} | {r['cost']:.2f} | {r['recompute_checked_ms_per_token']:.4f} | "
                     f"{r['cost_checked']:.2f} | {r['load_pageable_ms_per_token']:.4f} / "
                     f"{r['load_pinned_ms_per_token']:.4f} | {r['load_cost']:.2f} |")
    proj = data.get("projection")
    if proj:
        lines += ["", f"Projection from `{proj['source']}` (mean prompt {proj['mean_prompt_tokens']} tokens, "
                  f"row L={proj['row']['length']} B={proj['row']['batch']}): vLLM-computed x prefill + "
                  "blend-recomputed x checked recompute + claimed x load.", "",
                  "| arm | ratio | depth | computed tokens plain/arm | projected s | projected plain/arm |",
                  "|---|---:|---:|---:|---:|---:|"]
        for a in proj["arms"]:
            lines.append(f"| {a['arm']} | {a['ratio'] if a['ratio'] is not None else '-'} | {a['store_depth']} | "
                         f"{a['tokens_plain_over_arm']:.2f}x | {a['projected_s']:.1f} | "
                         f"{a['projected_plain_over_arm']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    prov = provenance("benchmarks.blend.bench_blend_gpu", argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dims", default=QWEN25_7B, help="hidden,intermediate,layers,heads,kv_heads,head_dim")
    ap.add_argument("--dtype", default=None, help="bfloat16 on CUDA, float32 on the CPU unless given")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[2048, 8192])
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--check-layers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--attention", default="default", choices=["default", "torch", *ATTENTION_BACKENDS],
                    help="the recompute's attention backend on CUDA: the plugin's choice (default), torch's "
                         "(torch), or torch's with one backend allowed")
    ap.add_argument("--project", type=Path, help="a bench_blend_engine RAG result to project onto this device")
    ap.add_argument("--profile", action="store_true", help="print a torch profile of one recompute per shape")
    ap.add_argument("--timings", type=Path, help="a result of this benchmark to project from (no run)")
    ap.add_argument("--quick", action="store_true", help="tiny dims, L=256, B=1,2, one repeat")
    ap.add_argument("--out", default="blend_gpu")
    args = ap.parse_args(argv)
    if args.timings:
        if not args.project:
            raise SystemExit("--timings needs --project")
        data = {k: v for k, v in json.loads(args.timings.read_text()).items() if k != "provenance"}
        data["projection"] = project(data["rows"], args.project)
        write_result(args.out, data, table=table, prov=prov)
        return 0
    import torch

    extra = {}
    if args.quick:
        args.dims, args.lengths, args.batches, args.repeats = "64,128,2,4,2,16", [256], [1, 2], 1
        extra = {"vocab": 1000, "max_positions": 4096}
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: pass --device cpu (with --quick for a smoke run)")
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    dims = Dims.parse(args.dims, **extra)
    from cp_engine.hooks.vllm.blend_recompute import DecoderRecompute

    model = build(dims, args.device, dtype)
    per_shape = max(b * -(-length // BLOCK_SIZE) for b in args.batches for length in args.lengths)
    paged = FlashPagedKV([layer.self_attn.attn.layer_name for layer in model.model.layers],
                         max(per_shape, 256), BLOCK_SIZE, dims.kv_heads, dims.head_dim, dtype, args.device)
    rec = DecoderRecompute.from_model(model, paged)
    clock, rng = Clock(torch, args.device), random.Random(0)
    checks = run_checks(torch, model, paged, rec, args.device, rng)
    print("checks passed:", checks, flush=True)
    rows = [time_shape(torch, model, paged, rec, clock, args.device, length, batch, args, rng)
            for length in args.lengths for batch in args.batches]
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    data = {"device": device_name, "torch": torch.__version__, "attention": args.attention, "dims": args.dims, "dtype": str(dtype).removeprefix("torch."),
            "checks": checks, "rows": rows}
    if args.project:
        data["projection"] = project(rows, args.project)
    name = args.out if "/" in args.out or not args.quick else f"{args.out}_quick"
    write_result(name, data, table=table, prov=prov)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
