"""GPU prefill time of the engine benchmark's arms, on a real model's decoder shape.

Does serving a prefix from cache save prefill TIME in proportion to the tokens it
saves, on a real-sized model? ``token_sim --pairs-out`` gives, per arm, each prompt's
(length, tokens served from cache) in send order. This script recomputes exactly the
uncached positions of every prompt with a dense Llama/Qwen-style decoder of the given
shape (random bf16 weights; one layer's weights reused for every layer, which costs
the same time per layer without holding 28 copies), the way a vLLM step does it:
prompts packed into steps of at most ``--step-tokens`` new tokens (chunked prefill),
projections and MLP on the packed tokens, and each prompt's new tokens attending to
its whole prefix (cached part included) with causal masking aligned to the end.

It times GPU work only: no scheduler, no sampling, no KV-cache paging. It is the
measured counterpart of ``token_sim``'s FLOP column, not a substitute for running
``python -m benchmarks.engine`` against a GPU vLLM server (the command is in results/engine.md).

    python -m benchmarks.engine.token_sim --model QWEN_DIR --pairs-out pairs.json
    python -m benchmarks.engine.prefill_gpu pairs.json --dims 3584,18944,28,28,4,128   # Qwen2.5-7B
    python -m benchmarks.engine.prefill_gpu pairs.json --quick   # CPU smoke run: small shape, 16 prompts per arm

Results: each run is appended to benchmarks/results/prefill_gpu.json (``--quick``: a
fresh prefill_gpu_quick.json), with its table, by the shared results writer.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common.results import RESULTS, provenance, read_result, write_result
from benchmarks.engine.token_sim import Dims, prefill_flops

QUICK_DIMS = "64,128,2,4,2,16"


class DecoderStack:
    """One decoder layer's weights, applied ``dims.layers`` times per forward step."""

    def __init__(self, dims: Dims, max_context: int, device: str = "cuda"):
        import torch

        self.torch, self.d = torch, dims
        q, kv = dims.heads * dims.head_dim, dims.kv_heads * dims.head_dim
        self.q_width, self.kv_width = q, kv

        def weight(rows: int, cols: int):
            return torch.randn(rows, cols, device=device, dtype=torch.bfloat16) * rows ** -0.5

        self.w_qkv = weight(dims.hidden, q + 2 * kv)
        self.w_o = weight(q, dims.hidden)
        self.w_gate_up = weight(dims.hidden, 2 * dims.ffn)
        self.w_down = weight(dims.ffn, dims.hidden)
        # One K/V history buffer: every prompt's attention reads a prefix of it. The
        # values are irrelevant to the time; the lengths are what each prompt needs.
        self.k_hist = torch.randn(1, dims.heads, max_context, dims.head_dim, device=device, dtype=torch.bfloat16)
        self.v_hist = torch.randn_like(self.k_hist)

    def _attend(self, q_all, segments):
        """Each segment (offset in the step, new tokens, context length) attends lower-right causally."""
        torch, d = self.torch, self.d
        from torch.nn.attention.bias import causal_lower_right
        from torch.nn.functional import scaled_dot_product_attention as sdpa

        out = torch.empty_like(q_all)
        for at, n, ctx in segments:
            q = q_all[at:at + n].view(n, d.heads, d.head_dim).transpose(0, 1).unsqueeze(0)
            k, v = self.k_hist[:, :, :ctx], self.v_hist[:, :, :ctx]
            o = sdpa(q, k, v, attn_mask=causal_lower_right(n, ctx))
            out[at:at + n] = o.squeeze(0).transpose(0, 1).reshape(n, self.q_width)
        return out

    def step(self, x, segments) -> None:
        """Run every layer over the packed tokens ``x`` (tokens x hidden)."""
        torch, d = self.torch, self.d
        fn = torch.nn.functional
        for _ in range(d.layers):
            h = fn.rms_norm(x, (d.hidden,))
            qkv = h @ self.w_qkv
            # K/V projections are computed (their cost is real); the history buffer
            # already stands in for their values.
            attn = self._attend(qkv[:, :self.q_width].contiguous(), segments)
            x = x + attn @ self.w_o
            h = fn.rms_norm(x, (d.hidden,))
            gate, up = (h @ self.w_gate_up).chunk(2, dim=-1)
            x = x + (fn.silu(gate) * up) @ self.w_down


def plan_steps(pairs: list[list[int]], step_tokens: int) -> list[list[tuple[int, int, int]]]:
    """Pack prompts' uncached positions into steps, splitting a prompt across steps.

    Returns per step the segments (offset in the step, new tokens, context length
    after them). The last prompt token is always computed, so every prompt has one.
    """
    steps, cur, used = [], [], 0
    for length, cached in pairs:
        done = min(cached, length - 1)
        while done < length:
            n = min(length - done, step_tokens - used)
            cur.append((used, n, done + n))
            used += n
            done += n
            if used == step_tokens:
                steps.append(cur)
                cur, used = [], 0
    if cur:
        steps.append(cur)
    return steps


def time_arm(stack: DecoderStack, steps, hidden: int, device: str = "cuda") -> float:
    """Seconds for every step of one arm (the GPU synchronised at both ends)."""
    torch = stack.torch
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    xs = {}
    sync()
    t0 = time.perf_counter()
    for segs in steps:
        tokens = segs[-1][0] + segs[-1][1]
        x = xs.get(tokens)
        if x is None:
            x = xs[tokens] = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
        stack.step(x, segs)
    sync()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pairs", help="JSON written by token_sim --pairs-out")
    ap.add_argument("--quick", action="store_true",
                    help=f"smoke run on the CPU: shape {QUICK_DIMS}, 16 prompts per arm, one round")
    ap.add_argument("--dims", help="hidden,ffn,layers,heads,kv_heads,head_dim (required without --quick)")
    ap.add_argument("--step-tokens", type=int, default=8192, help="new tokens per step (vLLM's max_num_batched_tokens)")
    ap.add_argument("--rounds", type=int, default=2, help="each round times every arm; order alternates")
    ap.add_argument("--out", help="results JSON this run is appended to (default: results/prefill_gpu.json)")
    ap.add_argument("--device", default="cuda", help="cpu only for a smoke run of small shapes")
    ap.add_argument("--limit", type=int, help="first N prompts of each arm only (smoke runs)")
    args = ap.parse_args(argv)
    prov = provenance("benchmarks.engine.prefill_gpu", argv)
    if args.quick:
        args.dims, args.device = args.dims or QUICK_DIMS, "cpu"
        args.limit, args.rounds = args.limit or 16, 1
    if not args.dims:
        ap.error("--dims is required (or --quick)")

    import torch

    data = json.loads(Path(args.pairs).read_text())
    dims = Dims(*map(int, args.dims.split(",")))
    arms = {arm: per[:args.limit] for arm, per in data["arms"].items()}
    max_len = max(n for per in arms.values() for n, _ in per)
    stack = DecoderStack(dims, max_len, args.device)
    steps = {arm: plan_steps(per, args.step_tokens) for arm, per in arms.items()}
    # Warm-up: one untimed pass of the longest arm (kernel selection, allocator, clocks;
    # a first round measured 40% slow with only a few warm-up steps).
    time_arm(stack, max(steps.values(), key=len), dims.hidden, args.device)

    times: dict[str, list[float]] = {arm: [] for arm in arms}
    for r in range(args.rounds):
        for arm in (list(arms) if r % 2 == 0 else list(arms)[::-1]):
            times[arm].append(time_arm(stack, steps[arm], dims.hidden, args.device))

    device = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{device}; {data['config']}; {dims}; steps of {args.step_tokens} tokens; {args.rounds} rounds")
    rows = []
    base = None
    for arm, per in arms.items():
        recomputed = sum(n - min(c, n - 1) for n, c in per)
        flops = sum(prefill_flops(n, min(c, n - 1), dims) for n, c in per)
        best = min(times[arm])
        base = base or (recomputed, flops, best)
        row = {"arm": arm, "recomputed": recomputed, "tflop": flops / 1e12, "seconds": times[arm],
               "token_ratio": base[0] / recomputed, "work_ratio": base[1] / flops, "time_ratio": base[2] / best,
               "achieved_tflops": flops / best / 1e12}
        rows.append(row)
        print(f"{arm:18s} recomputed {recomputed:>9,}  tokens {row['token_ratio']:.3f}x  work {row['work_ratio']:.3f}x"
              f"  time {best:7.2f} s {row['time_ratio']:.3f}x  ({row['achieved_tflops']:.0f} TFLOP/s; rounds "
              + " ".join(f"{t:.2f}" for t in times[arm]) + ")")
    out = Path(args.out) if args.out else RESULTS / ("prefill_gpu_quick.json" if args.quick else "prefill_gpu.json")
    runs = read_result(out)[0]["runs"] if out.exists() and not args.quick else []
    runs.append({"device": device, "config": data["config"], "dims": dims.__dict__,
                 "step_tokens": args.step_tokens, "rows": rows})
    write_result(out, {"runs": runs}, table=markdown, prov=prov)
    return 0


def markdown(data: dict) -> str:
    """One table per run: each arm's recomputed tokens, work and best time, as off / arm ratios."""
    lines = []
    for run in data["runs"]:
        d = run["dims"]
        lines += [f"{run['device']}; {run['config']['workload']}, tokenizer {run['config']['tokenizer']}; "
                  f"shape {','.join(str(v) for v in d.values())}; steps of {run['step_tokens']} tokens.", "",
                  "| arm | recomputed tok | tokens off/arm | work off/arm | best s | time off/arm | TFLOP/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['arm']} | {r['recomputed']:,} | {r['token_ratio']:.3f}× | {r['work_ratio']:.3f}× | "
                  f"{min(r['seconds']):.2f} | {r['time_ratio']:.3f}× | {r['achieved_tflops']:.0f} |"
                  for r in run["rows"]]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
