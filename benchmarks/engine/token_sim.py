"""Token-exact prefix-cache simulation of the engine benchmark's batched RAG arms.

Renders each arm's requests exactly as the engine benchmark sends them, applies the served
model's chat template and tokenizer, and counts what vLLM's prefix cache would serve
(whole KV blocks of ``--block-size`` tokens, hash-chained; unbounded cache; the last
prompt token is always computed). At N=400 it reproduced the live
engine's recomputed tokens exactly for the batch-planned arms (1,029,805 and 958,189)
and within 0.3% for off and peer, where two requests in flight together may both
compute a block; use it to try rendering or planner changes in about a minute instead
of a ten-minute live run. ``on-seq`` is the online "on" arm with requests arriving one
at a time (live, 64 in flight, it recomputed 2.0% more at N=400: arrival order and
timing).

    python -m benchmarks.engine.token_sim                 # Zipf k 10-20, N=400, tiny model
    python -m benchmarks.engine.token_sim --n 200 --k 10 --block-size 16
    python -m benchmarks.engine.token_sim --model DIR --pairs-out pairs.json   # for prefill_gpu
    python -m benchmarks.engine.token_sim --quick   # N=48, seconds: results/token_sim_quick.*

Results: benchmarks/results/token_sim.json and .table.md (the shared results writer).
"""
from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

ARMS = ("off", "on-seq", "on+batch", "on+batch-noannot", "peer")


def prefix_cache_served(prompts: Iterable[Sequence[int]], block_size: int = 128) -> list[tuple[int, int]]:
    """(prompt tokens, tokens served from cache) per prompt, served in this order.

    A prompt's KV block j is served when blocks 0..j are all known (hash chain) and j
    ends before the prompt's last token; every full block is remembered afterwards.
    """
    seen: set[bytes] = set()
    out = []
    for ids in prompts:
        chain, hit, served = b"", True, 0
        servable = (len(ids) - 1) // block_size  # the last token is always computed
        for j in range(len(ids) // block_size):
            chunk = ",".join(map(str, ids[j * block_size:(j + 1) * block_size])).encode()
            chain = hashlib.blake2b(chain + chunk, digest_size=16).digest()
            if hit and j < servable and chain in seen:
                served += block_size
            else:
                hit = False
            seen.add(chain)
        out.append((len(ids), served))
    return out


def prefix_cache_counts(prompts: Iterable[Sequence[int]], block_size: int = 128) -> tuple[int, int]:
    """(prompt tokens, tokens served from cache) summed over ``prefix_cache_served``."""
    per = prefix_cache_served(prompts, block_size)
    return sum(n for n, _ in per), sum(c for _, c in per)


@dataclass(frozen=True)
class Dims:
    """Decoder shape: what one prefill token costs (dense Llama-style layers)."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_config(cls, cfg: dict) -> "Dims":
        heads = cfg["num_attention_heads"]
        return cls(cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], heads,
                   cfg.get("num_key_value_heads", heads), cfg.get("head_dim") or cfg["hidden_size"] // heads)


def prefill_flops(length: int, cached: int, d: Dims) -> float:
    """FLOPs to compute positions ``cached .. length-1`` of one prompt.

    Per token and layer: the projections and the MLP (fixed), plus attention to every
    earlier position (QK^T and AV: 4 * heads * head_dim FLOPs per position). A token
    behind a long cached prefix still attends to all of it, so when attention is a
    large share (small models, long prompts) serving a prefix from cache saves a
    smaller share of the work than of the tokens.
    """
    q, kv = d.heads * d.head_dim, d.kv_heads * d.head_dim
    fixed = 2 * (d.hidden * (q + 2 * kv) + q * d.hidden) + 2 * 3 * d.hidden * d.ffn
    positions = (length * (length - 1) - cached * (cached - 1)) / 2  # sum of p over computed p
    return d.layers * (fixed * (length - cached) + 4 * q * positions)


def arm_prompts(arm: str, rag, encode: Callable[[list], list[int]],
                count_tokens: Callable[[str], int] | None = None) -> list[list[int]] | None:
    """Token ids of ``arm``'s requests in the order the engine benchmark sends them
    (``count_tokens``: the batch plan's block token counts, as the engine benchmark passes them)."""
    from benchmarks.engine.arms import plain, rag_requests

    if arm == "off":
        return [encode(plain(d, q)) for d, q in zip(rag.docs, rag.queries)]
    if arm == "on-seq":
        return [encode(m) for m in online_messages(rag)]
    reqs, _ = rag_requests(arm, rag, count_tokens)
    return [encode(r.messages) for r in reqs] if reqs else None


def online_messages(rag) -> list[list[dict]]:
    """The "on" arm's requests as the in-server rewrite renders them when they arrive
    one at a time in send order (the live arm has 64 in flight; its order and what is
    cached when each runs then depend on timing)."""
    from benchmarks.engine.arms import rag_requests
    from cp_engine import Config
    from cp_engine.pipeline import ContextPipeline

    pipe = ContextPipeline(Config())
    out = []
    for i, req in enumerate(rag_requests("on", rag)[0]):
        messages, prep = pipe.rewrite_messages(req.messages, req.extra["context_blocks"])
        pipe.commit(i, prep)
        out.append(messages)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=48 (seconds)")
    ap.add_argument("--n", type=int, default=None, help="requests (default 400, 48 with --quick)")
    ap.add_argument("--k", type=int, help="blocks per request (default: 10-20)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--model", help="tokenizer/chat template directory (default: the tiny test model)")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--dims", help="decoder shape for the prefill-work column, as hidden,ffn,layers,heads,"
                                   "kv_heads,head_dim (default: the --model's config.json)")
    ap.add_argument("--estimate-tokens", action="store_true",
                    help="plan the batch with characters/4 block lengths instead of the tokenizer's counts")
    ap.add_argument("--pairs-out", help="write each arm's per-prompt (prompt tokens, served from cache) "
                                        "pairs, in send order, to this JSON file (input of benchmarks.engine.prefill_gpu)")
    ap.add_argument("--out", help="results JSON (default: results/token_sim[_quick].json)")
    args = ap.parse_args(argv)

    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from benchmarks.common.results import RESULTS, provenance, write_result
    from benchmarks.engine.workloads import rag_zipf
    from cp_engine.devtools.vllm_server import tiny_model_dir

    prov = provenance("benchmarks.engine.token_sim", argv)
    args.n = args.n or (48 if args.quick else 400)

    model = args.model or tiny_model_dir()
    tok = AutoTokenizer.from_pretrained(model)
    dims = (Dims(*map(int, args.dims.split(","))) if args.dims
            else Dims.from_config(json.loads((Path(model) / "config.json").read_text())))

    def count_tokens(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    def encode(messages: list) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    rag = rag_zipf(args.n, args.k)
    pairs, rows, skipped = {}, [], []
    for arm in [a for a in args.arms.split(",") if a]:
        prompts = arm_prompts(arm, rag, encode, None if args.estimate_tokens else count_tokens)
        if prompts is None:
            skipped.append(arm)
            continue
        per = prefix_cache_served(prompts, args.block_size)
        pairs[arm] = per
        total, served = sum(n for n, _ in per), sum(c for _, c in per)
        rows.append({"arm": arm, "prompt_tokens": total, "cached_tokens": served, "recomputed_tokens": total - served,
                     "prefill_tflop": sum(prefill_flops(n, c, dims) for n, c in per) / 1e12})
    data = {"workload": rag.name, "block_size": args.block_size, "tokenizer": Path(model).name,
            "dims": dims.__dict__, "block_weights": "estimate" if args.estimate_tokens else "tokenizer",
            "arms": rows, "skipped": skipped}
    out = args.out or RESULTS / ("token_sim_quick.json" if args.quick else "token_sim.json")
    write_result(out, data, table=markdown, prov=prov)
    if args.pairs_out:
        meta = {"workload": rag.name, "tokenizer": Path(model).name, "block_size": args.block_size}
        Path(args.pairs_out).write_text(json.dumps({"config": meta, "arms": pairs}) + "\n")
    return 0


def markdown(data: dict) -> str:
    """Per arm: prompt, cached and recomputed tokens and prefill work, as off / arm ratios."""
    lines = [f"{data['workload']}, {data['block_size']}-token KV blocks, unbounded cache, tokenizer "
             f"{data['tokenizer']} (batch plan block weights: {data['block_weights']}); prefill work for "
             + ",".join(str(v) for v in data["dims"].values()) + " (hidden, ffn, layers, heads, kv heads, head dim).",
             "", "| arm | prompt tok | cached tok | recomputed tok | recomputed off/arm | prefill TFLOP | work off/arm |",
             "|---|---|---|---|---|---|---|"]
    off = next((r for r in data["arms"] if r["arm"] == "off"), None)
    for r in data["arms"]:
        tok = f"{off['recomputed_tokens'] / r['recomputed_tokens']:.3f}×" if off else "–"
        work = f"{off['prefill_tflop'] / r['prefill_tflop']:.3f}×" if off else "–"
        lines.append(f"| {r['arm']} | {r['prompt_tokens']:,} | {r['cached_tokens']:,} | {r['recomputed_tokens']:,} | "
                     f"{tok} | {r['prefill_tflop']:.2f} | {work} |")
    if data["skipped"]:
        lines += ["", "Skipped (peer unavailable): " + ", ".join(data["skipped"]) + "."]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
