"""Token-exact prefix-cache simulation of the engine benchmark's batched RAG arms.

Renders each arm's requests exactly as ``bench_engine`` sends them, applies the served
model's chat template and tokenizer, and counts what vLLM's prefix cache would serve
(whole KV blocks of ``--block-size`` tokens, hash-chained; unbounded cache; the last
prompt token is always computed). At N=400 (2026-11-24) it reproduced the live
engine's recomputed tokens exactly for the batch-planned arms (1,029,805 and 958,189)
and within 0.3% for off and peer, where two requests in flight together may both
compute a block; use it to try rendering or planner changes in about a minute instead
of a ten-minute live run. The online "on" arm is not simulated (its order depends on
arrival timing in the server).

    python -m benchmarks.token_sim                 # Zipf k 10-20, N=400, tiny model
    python -m benchmarks.token_sim --n 200 --k 10 --block-size 16
"""
from __future__ import annotations

import argparse
import hashlib
from typing import Callable, Iterable, Sequence

ARMS = ("off", "on+batch", "on+batch-noannot", "peer")


def prefix_cache_counts(prompts: Iterable[Sequence[int]], block_size: int = 128) -> tuple[int, int]:
    """(prompt tokens, tokens served from cache) for prompts served in this order.

    A prompt's KV block j is served when blocks 0..j are all known (hash chain) and j
    ends before the prompt's last token; every full block is remembered afterwards.
    """
    seen: set[bytes] = set()
    total = served = 0
    for ids in prompts:
        total += len(ids)
        chain, hit = b"", True
        servable = (len(ids) - 1) // block_size  # the last token is always computed
        for j in range(len(ids) // block_size):
            chunk = ",".join(map(str, ids[j * block_size:(j + 1) * block_size])).encode()
            chain = hashlib.blake2b(chain + chunk, digest_size=16).digest()
            if hit and j < servable and chain in seen:
                served += block_size
            else:
                hit = False
            seen.add(chain)
    return total, served


def arm_prompts(arm: str, rag, encode: Callable[[list], list[int]]) -> list[list[int]] | None:
    """Token ids of ``arm``'s requests in the order bench_engine sends them."""
    from benchmarks import bench_engine as be

    if arm == "off":
        return [encode(be.plain(d, q)) for d, q in zip(rag.docs, rag.queries)]
    reqs, _ = be.rag_requests(arm, rag)
    return [encode(r.messages) for r in reqs] if reqs else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--k", type=int, help="blocks per request (default: 10-20)")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--model", help="tokenizer/chat template directory (default: the tiny test model)")
    ap.add_argument("--arms", default=",".join(ARMS))
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from benchmarks import bench_engine as be
    from cp_engine.devtools.vllm_server import tiny_model_dir

    tok = AutoTokenizer.from_pretrained(args.model or tiny_model_dir())

    def encode(messages: list) -> list[int]:
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tok(text, add_special_tokens=False)["input_ids"]

    rag = be.rag_zipf(args.n, args.k)
    base = None
    print(f"{rag.name}, {args.block_size}-token KV blocks, unbounded cache")
    for arm in [a for a in args.arms.split(",") if a]:
        prompts = arm_prompts(arm, rag, encode)
        if prompts is None:
            print(f"{arm:18s} skipped (peer unavailable)")
            continue
        total, served = prefix_cache_counts(prompts, args.block_size)
        recomputed = total - served
        base = base or (recomputed if arm == "off" else None)
        ratio = f"  off/arm {base / recomputed:.3f}x" if base else ""
        print(f"{arm:18s} prompt {total:>10,}  cached {served:>9,}  recomputed {recomputed:>10,}{ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
