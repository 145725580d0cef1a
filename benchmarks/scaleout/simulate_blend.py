"""Scale-out simulation with blend: R replicas behind a router, each an engine with its
own prefix cache and its own bounded block store, on the scale-out simulation's workloads.

With blend a block's KV is reused at any position, but only on the replica that stored
it, so where a block set goes decides whether its blocks' KV is already there. Each
replica is a ``benchmarks.blend.engine_model.BlendEngine`` (the blend simulation's model:
the engine's prefix hit, then ``plan_reuse`` against a ``BlockKVStore`` with its own
value policy, new blocks stored within the store depth); the router policies are
``cp_engine.scaleout.routing`` as in ``benchmarks.scaleout.simulate``:

- ``round_robin``: no look at the request;
- ``block_affinity``: consistent hashing of the block-set key with ``LoadBound``;
- ``prefix_canonical``: a cache-aware router on the canonical rendering of the block
  set (``prefix_aware`` with ``cp_engine.scaleout.key.canonical_order``);
- ``block_overlap``: a model of a store-aware router (``BlockOverlap``, here only): the
  replica already holding the most of the request's block tokens, order ignored.

Each policy runs without blend (prefix caching alone, ``+prefix``) and with blend at
each ``--ratios`` value and ``--depths`` store depth (``+blend@r`` or ``+blend@r:dD``).
Prompts are system prompt, blocks in retrieval order, question. Token ids are
synthetic: a block is its own run of ids (as many as the workload's estimate of its
tokens), so block boundaries never merge and blocks carry no separators; the system
prompt is the same ids everywhere; a question's ids are its own. At one replica every
policy is the same, so only ``round_robin`` runs there.

Per arm and replica count: computed prompt tokens (the engine's uncached tokens plus
what blend recomputes, check-layer pass included, in whole-model tokens), hit ratio
(prompt tokens served from the prefix cache or reused from the store), the hottest
replica's share of requests and of computed tokens.

    python -m benchmarks.scaleout.simulate_blend                 # both workloads, R=1,4,8,16,64
    python -m benchmarks.scaleout.simulate_blend --quick         # N=400, R=1,4: results/scaleout_sim_blend_quick.*
"""
from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.blend.engine_model import BlendEngine
from cp_engine.blend.keys import KVLayout
from cp_engine.blend.selection import MODES
from cp_engine.blend.spans import Rendered
from cp_engine.blocks import estimate_tokens
from cp_engine.scaleout.routing import LoadBound, RouteRequest, hottest_share, make_policy

from .simulate import WORKLOADS, SimRequest, load_workload, requests_of, router_view

# name -> (routing policy, what the router sees)
POLICIES = {"round_robin": ("round_robin", "blind"), "block_affinity": ("block_affinity", "blind"),
            "prefix_canonical": ("prefix_aware", "canonical"), "block_overlap": ("block_overlap", "canonical")}
ROUTERS = [p for p in POLICIES if p != "round_robin"]
SIZES = {"rag_zipf": 8000, "hotpot_kb": 5000}  # the scale-out simulation's documented runs


@dataclass(frozen=True)
class Arm:
    policy: str  # a POLICIES name
    ratio: float | None  # None: prefix caching alone
    depth: int | None = 0  # store depth (None: any)

    @property
    def name(self) -> str:
        if self.ratio is None:
            return f"{self.policy}+prefix"
        return f"{self.policy}+blend@{self.ratio:g}" + ("" if self.depth == 0 else f":d{self.depth}")


@dataclass(frozen=True)
class Setup:
    """Per-replica engine: KV block size, prefix-cache and store budgets in tokens, the
    layout (its layer count prices the check pass) and the blend selection settings."""

    block_size: int = 16
    cache_tokens: int = 65536
    store_tokens: int = 65536
    layers: int = 24
    mode: str = "both"
    first_tokens: int = 16
    check_layers: int = 1
    factor: float = 1.25
    threshold: float = 0.5

    def layout(self) -> KVLayout:
        return KVLayout.make(model="scaleout-sim", fingerprint="sim", dtype="float32", num_layers=self.layers,
                             num_kv_heads=1, head_dim=1, block_size=self.block_size, rope="sim")

    def engine(self, arm: Arm) -> BlendEngine:
        layout = self.layout()
        bytes_per_token = 2 * layout.num_layers * 4  # K and V, one head of one float32 per layer
        return BlendEngine(arm.ratio, self.block_size, max(1, self.cache_tokens // self.block_size),
                           self.store_tokens * bytes_per_token, layout, mode=self.mode,
                           first_tokens=self.first_tokens, check_layers=self.check_layers, store_depth=arm.depth)


class BlockOverlap:
    """Store-aware routing, modelled: per replica an LRU of the blocks (int units) sent
    there, bounded by ``store_tokens`` (the router's belief of that replica's store).
    A request goes to the admissible replica (``LoadBound``) holding the most of its
    block tokens; with no overlap anywhere, to the least loaded. Order plays no part,
    as it plays none in blend's reuse. What a router fed the replicas' store events
    could do; no router here does it."""

    name = "block_overlap"

    def __init__(self, replicas: int, store_tokens: int, factor: float = 1.25):
        self.bound = LoadBound(replicas, factor)
        self.store_tokens = store_tokens
        self.held: list[OrderedDict[int, int]] = [OrderedDict() for _ in range(replicas)]
        self.used = [0] * replicas

    def route(self, request: RouteRequest) -> int:
        blocks = [(u, n) for u, n in zip(request.units, request.tokens) if isinstance(u, int)]
        loads = self.bound.loads

        def overlap(r: int) -> int:
            held = self.held[r]
            return sum(n for u, n in blocks if u in held)

        best = max(self.bound.admissible(), key=lambda r: (overlap(r), -loads[r], -r))
        held = self.held[best]
        for u, n in blocks:
            if u in held:
                held.move_to_end(u)
            else:
                held[u] = n
                self.used[best] += n
        while self.used[best] > self.store_tokens and held:
            self.used[best] -= held.popitem(last=False)[1]
        self.bound.assign(best)
        return best


class Renderer:
    """Synthetic token ids: block ``b`` is ``n`` consecutive ids from a base taken from
    its id, the system prompt ids 1..s, question ``i`` negative ids of its own."""

    def __init__(self, system_tokens: int):
        self.head = list(range(1, system_tokens + 1))
        self._blocks: dict[int, list[int]] = {}

    def block(self, b: int, n: int) -> list[int]:
        ids = self._blocks.get(b)
        if ids is None:
            base = ((b & ((1 << 40) - 1)) | 1) << 12  # never the system prompt's ids
            ids = self._blocks[b] = list(range(base, base + n))
        return ids

    def render(self, req: SimRequest, i: int) -> Rendered:
        ids, spans = list(self.head), []
        for b, n in zip(req.blocks, req.tokens):
            spans.append((len(ids), len(ids) + n))
            ids += self.block(b, n)
        ids += [-((i << 12) + j + 1) for j in range(req.question)]
        return Rendered(ids, spans)


def run_arm(arm: Arm, reqs: list[SimRequest], replicas: int, setup: Setup, system_tokens: int) -> dict:
    policy_name, view = POLICIES[arm.policy]
    if policy_name == "block_overlap":
        policy = BlockOverlap(replicas, setup.store_tokens, setup.factor)
    else:
        policy = make_policy(policy_name, replicas, tree_tokens=setup.cache_tokens, factor=setup.factor,
                             threshold=setup.threshold)
    pool = [setup.engine(arm) for _ in range(replicas)]
    render = Renderer(system_tokens)
    chosen, computed = [], [0.0] * replicas
    t0 = time.perf_counter()
    for i, req in enumerate(reqs):
        r = policy.route(router_view(req, i, view, system_tokens))
        c = pool[r].serve(render.render(req, i))
        chosen.append(r)
        computed[r] += c["computed_tokens"]
    each = [e.totals() for e in pool]
    tot = {k: sum(t[k] for t in each) for k in ("prompt_tokens", "engine_cached_tokens", "reused_tokens",
                                                "recomputed_tokens", "check_layer_tokens", "computed_tokens",
                                                "requests_blended")}
    stored = sum(t["store"]["blend_stored_tokens"] for t in each)
    share = hottest_share(chosen, replicas)
    prompt = tot["prompt_tokens"]
    return {"arm": arm.name, "policy": arm.policy, "ratio": arm.ratio, "depth": arm.depth, "replicas": replicas,
            **tot, "stored_tokens": stored,
            "hit_ratio": (tot["engine_cached_tokens"] + tot["reused_tokens"]) / prompt if prompt else 0.0,
            "prefix_hit_ratio": tot["engine_cached_tokens"] / prompt if prompt else 0.0,
            "hottest_share": share, "hottest_share_x_even": share * replicas,
            "hottest_computed_share": max(computed) / max(1.0, sum(computed)),
            "seconds": round(time.perf_counter() - t0, 2)}


def arms_for(replicas: int, ratios: list[float], depths: list[int | None], policies: list[str]) -> list[Arm]:
    names = ["round_robin"] if replicas == 1 else policies
    return [Arm(p, r, d) for p in names for r, d in [(None, 0)] + [(r, d) for r in ratios for d in depths]]


def _depth(s: str) -> int | None:
    return None if s in ("any", "inf") else int(s)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="N=400 per workload, R=1,4")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--n", type=int, help="requests per workload (default: rag_zipf 8,000, hotpot_kb 5,000)")
    ap.add_argument("--replicas", help="comma-separated replica counts (default 1,4,8,16,64)")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--ratios", default="0,0.15", help="blend ratios (share of reused tokens recomputed)")
    ap.add_argument("--depths", default="0", help="store depths ('any': unbounded); CP_ENGINE_BLEND_STORE_DEPTH")
    ap.add_argument("--block-size", type=int, default=16, help="engine KV block (vLLM's GPU default)")
    ap.add_argument("--cache-tokens", type=int, default=65536, help="prefix-cache tokens per replica")
    ap.add_argument("--store-tokens", type=int, default=65536, help="block-store tokens per replica")
    ap.add_argument("--layers", type=int, default=24, help="model layers (prices the check-layer pass)")
    ap.add_argument("--mode", choices=MODES, help="blend selection mode (default: CP_ENGINE_BLEND_MODE's default)")
    ap.add_argument("--factor", type=float, default=1.25, help="load bound: at most factor x the even share")
    ap.add_argument("--threshold", type=float, default=0.5, help="prefix_canonical: least match share to follow")
    ap.add_argument("--out", help="results JSON (default results/scaleout_sim_blend[_quick].json)")
    ap.add_argument("--plot", action="store_true", help="redraw table and PNG from the JSON only")
    args = ap.parse_args(argv)

    from benchmarks.common.results import RESULTS, provenance, redraw, write_result
    from benchmarks.engine.arms import SYSTEM
    from cp_engine import Config

    out = Path(args.out) if args.out else RESULTS / (
        "scaleout_sim_blend_quick.json" if args.quick else "scaleout_sim_blend.json")
    if args.plot:
        redraw(out, table=markdown, plot=plot)
        return 0
    prov = provenance("benchmarks.scaleout.simulate_blend", argv)
    cfg = Config()
    setup = Setup(args.block_size, args.cache_tokens, args.store_tokens, args.layers, args.mode or cfg.blend_mode,
                  cfg.blend_first_tokens, cfg.blend_check_layers, args.factor, args.threshold)
    counts = [int(x) for x in (args.replicas or ("1,4" if args.quick else "1,4,8,16,64")).split(",")]
    policies = args.policies.split(",")
    unknown = set(policies) - set(POLICIES)
    if unknown:
        ap.error(f"unknown policies: {', '.join(sorted(unknown))}")
    ratios = [float(x) for x in args.ratios.split(",")]
    depths = [_depth(x) for x in args.depths.split(",")]
    system_tokens = estimate_tokens(SYSTEM)
    workloads = []
    for wname in args.workloads.split(","):
        n = args.n or (400 if args.quick else SIZES[wname])
        rag = load_workload(wname, n)
        reqs = requests_of(rag)
        rows = []
        for replicas in counts:
            for arm in arms_for(replicas, ratios, depths, policies):
                row = run_arm(arm, reqs, replicas, setup, system_tokens)
                rows.append(row)
                print(f"{wname} R={replicas:>3} {arm.name:<32} computed {row['computed_tokens']:>12,.0f} "
                      f"hit {row['hit_ratio']:.3f} hottest {row['hottest_share_x_even']:.2f}x even "
                      f"{row['seconds']}s", flush=True)
        workloads.append({"workload": rag.name, "requests": n, "rows": rows})
    data = {"setup": asdict(setup) | {"system_tokens": system_tokens}, "workloads": workloads}
    write_result(out, data, table=markdown, plot=plot, prov=prov)
    return 0


def ratio_at(w: dict, replicas: int, arm_suffix: str, policy: str) -> float | None:
    """Computed tokens of round_robin over ``policy``'s, same blend setting, at ``replicas``."""
    rows = {r["arm"]: r for r in w["rows"] if r["replicas"] == replicas}
    rr, other = rows.get("round_robin" + arm_suffix), rows.get(policy + arm_suffix)
    if not rr or not other or not other["computed_tokens"]:
        return None
    return rr["computed_tokens"] / other["computed_tokens"]


def _suffix(arm: str) -> str:
    return arm[arm.index("+"):]


def markdown(data: dict) -> str:
    s = data["setup"]
    lines = [f"Per replica: {s['cache_tokens']:,}-token prefix cache ({s['block_size']}-token KV blocks, LRU) and a "
             f"{s['store_tokens']:,}-token blend block store (its own value policy); blend mode {s['mode']}, "
             f"{s['first_tokens']} first tokens, check pass over {s['check_layers']} of {s['layers']} layers; load "
             f"bound {s['factor']}x the even share (block_affinity, prefix_canonical). Computed: prompt tokens the "
             "model computed (engine's uncached + blend's recomputed + check pass). Hit: prompt tokens from the "
             "prefix cache or the store. vs round-robin: round_robin's computed tokens / the arm's, same blend "
             "setting; vs prefix-only round-robin: round_robin+prefix's / the arm's.", ""]
    for w in data["workloads"]:
        lines += [f"**{w['workload']}**, {w['requests']:,} requests in order", "",
                  "| replicas | arm | hit ratio | computed tok | vs round-robin | vs prefix-only round-robin "
                  "| hottest share (x even) | hottest computed share |", "|---|---|---|---|---|---|---|---|"]
        base = {r["replicas"]: r for r in w["rows"] if r["arm"] == "round_robin+prefix"}
        for r in w["rows"]:
            same = ratio_at(w, r["replicas"], _suffix(r["arm"]), r["policy"])
            b = base.get(r["replicas"])
            vs_base = f"{b['computed_tokens'] / r['computed_tokens']:.2f}×" if b and r["computed_tokens"] else "–"
            lines.append(f"| {r['replicas']} | {r['arm']} | {r['hit_ratio']:.3f} | {r['computed_tokens']:,.0f} | "
                         f"{f'{same:.2f}×' if same else '–'} | {vs_base} | {r['hottest_share']:.3f} "
                         f"({r['hottest_share_x_even']:.2f}×) | {r['hottest_computed_share']:.3f} |")
        lines.append("")
    lines += ["Round-robin's computed tokens / the router's, same setting (the issue's 1.5× target at 4 replicas):",
              "", "| workload | replicas | setting | " + " | ".join(f"round_robin / {p}" for p in ROUTERS) + " |",
              "|---|---|---|" + "---|" * len(ROUTERS)]
    for w in data["workloads"]:
        for replicas in sorted({r["replicas"] for r in w["rows"]} - {1}):
            for suffix in dict.fromkeys(_suffix(r["arm"]) for r in w["rows"] if r["replicas"] == replicas):
                cells = [ratio_at(w, replicas, suffix, p) for p in ROUTERS]
                lines.append(f"| {w['workload']} | {replicas} | {suffix[1:]} | "
                             + " | ".join(f"{c:.2f}×" if c else "–" for c in cells) + " |")
    return "\n".join(lines)


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = data["workloads"]
    fig, axes = plt.subplots(2, len(ws), figsize=(5.5 * len(ws), 7.5), squeeze=False)
    colors = {"round_robin": "#888888", "block_affinity": "#3366aa", "prefix_canonical": "#cc7733",
              "block_overlap": "#33aa66"}
    for col, w in enumerate(ws):
        top, bottom = axes[0][col], axes[1][col]
        for arm in dict.fromkeys(r["arm"] for r in w["rows"]):
            rows = sorted((r for r in w["rows"] if r["arm"] == arm), key=lambda r: r["replicas"])
            if rows[0]["policy"] != "round_robin":
                one = [r for r in w["rows"] if r["replicas"] == 1 and r["arm"] == "round_robin" + _suffix(arm)]
                rows = one + rows  # at one replica every policy is round-robin
            style = ":" if rows[0]["ratio"] is None else ("-" if rows[0]["ratio"] == 0 else "--")
            xs = [r["replicas"] for r in rows]
            kw = dict(ls=style, marker="o", color=colors.get(rows[-1]["policy"]), label=arm)
            top.plot(xs, [r["computed_tokens"] for r in rows], **kw)
            bottom.plot(xs, [r["hottest_share_x_even"] for r in rows], **kw)
        top.set(xscale="log", xlabel="replicas", ylabel="prompt tokens computed", title=w["workload"])
        top.set_ylim(bottom=0)
        bottom.set(xscale="log", xlabel="replicas", ylabel="hottest replica's share x replicas",
                   title="load skew (1 = even)")
        for ax in (top, bottom):
            xs = sorted({r["replicas"] for r in w["rows"]})
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.grid(alpha=0.3)
        top.legend(fontsize=6)
    s = data["setup"]
    fig.suptitle(f"per replica: {s['cache_tokens']:,}-token prefix cache, {s['store_tokens']:,}-token block store\n"
                 "dotted: prefix only; solid: blend ratio 0; dashed: ratio > 0", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
