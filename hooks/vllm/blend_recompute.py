"""Recompute selected prompt tokens layer by layer through the model's own modules.

Contract:
- ``DecoderRecompute.from_model(model, paged)`` accepts the decoder classes in
  ``ACCEPTED`` (Llama, Mistral, Qwen2: embedding, fused-residual RMSNorm, ``qkv_proj``,
  optional per-head q/k norm, ``rotary_emb``, ``o_proj``, MLP) with full causal attention,
  one fixed-frequency RoPE shared by every layer, tensor and pipeline parallel size 1 and
  attention layer names equal to ``paged.layer_names``. Anything else raises
  ``UnsupportedModel`` with a short ``reason`` label (``architecture``, ``sliding_window``,
  ``rope_<why>``, ``layer_names``, ...). ``rope`` is the ``RopeSpec`` built from the
  engine's own rotary embedding, checked against its cos/sin cache.
- ``run(token_ids, slots, select, check_layers, narrow)`` recomputes the positions in
  ``select`` (sorted, inside ``[0, len(token_ids))``) at every layer: fresh q, k, v from
  the model's modules, fresh k, v written to their slots through ``paged``, then exact
  causal attention (key position <= query position, GQA) over the K/V that the cache
  holds for ``[0, end)``, ``o_proj`` and the MLP (the last layer stops once its K/V are
  written). Precondition: every position in ``[0, end)`` already holds K/V. vLLM's
  ``Attention`` module is never called (it reads the forward context). Attention runs in
  the activations' dtype through torch's fused ``scaled_dot_product_attention`` (float
  accumulation, no score matrix held), as the engine's own kernel does; queries go in
  runs of consecutive positions and each run reads only the keys up to its last one.
  It runs where the model's weights are (CPU or CUDA): ids, positions and slots move
  there; run bounds come from a host copy of the positions, so no step waits on the
  device, and each job's causal masks are built once for all layers.
- ``run_batch(jobs)`` runs several requests' ``RecomputeJob``s in one pass (the loads
  of one engine step): fewer, larger operations, the same K/V as one by one.
- With ``narrow`` and ``check_layers > 0`` (fewer than the model has): every selected
  token runs in full through the first ``check_layers`` layers; at the next layer its K
  is computed and written, and its deviation (mean squared difference between that fresh
  K and the K the cache held before) goes to ``narrow(deviation)``, which returns the
  indices into ``select`` to keep; attention and MLP of that layer and every later one
  run for those rows only. Layer 0's K depends on the token and its position alone, so a
  stitched block shows no deviation there: the first layer that can show one is layer 1.
  ``check_layers <= 0`` or ``narrow=None``: no narrowing. ``tokens_per_layer`` counts the
  narrowing layer at its rows before narrowing.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cp_engine.blend.rope import RopeSpec, UnsupportedRope

from .blend_layout import PagedKV

__all__ = ["ACCEPTED", "UnsupportedModel", "RecomputeReport", "RecomputeJob", "DecoderRecompute"]

# Model class -> (decoder layer class, attention class) whose forward this module mirrors.
ACCEPTED = {
    "LlamaForCausalLM": ("LlamaDecoderLayer", "LlamaAttention"),
    "MistralForCausalLM": ("MistralDecoderLayer", "MistralAttention"),
    "Qwen2ForCausalLM": ("Qwen2DecoderLayer", "Qwen2Attention"),
}
# Rotary classes with fixed per-pair frequencies (a stored K moves by one more rotation).
_FIXED_ROPE = ("RotaryEmbedding", "LinearScalingRotaryEmbedding", "Llama3RotaryEmbedding",
               "YaRNScalingRotaryEmbedding")
_ROPE_REASONS = {
    "DynamicNTKScalingRotaryEmbedding": "rope_dynamic", "DynamicNTKAlphaRotaryEmbedding": "rope_dynamic",
    "NTKScalingRotaryEmbedding": "rope_dynamic", "Phi3LongRoPEScaledRotaryEmbedding": "rope_longrope",
    "MRotaryEmbedding": "rope_mrope", "MRotaryEmbeddingInterleaved": "rope_mrope",
}
QUERY_RUNS = 4       # at most this many query runs per attention call (each reads keys up to its end)
RUN_MIN_QUERIES = 64  # a run shorter than this costs more in call overhead than it saves in keys
MASK_CACHE_BYTES = 64 << 20  # causal masks a pass keeps for every layer, all its jobs together
# On CUDA the masked attention runs on the memory-efficient kernel with K/V heads expanded
# to the query heads: it takes any mask with no per-shape setup, where torch's own choice
# (cuDNN) plans every new (queries, keys) shape, and every request brings new ones.
# "auto" leaves the choice to torch.
CUDA_ATTENTION = "efficient"


class UnsupportedModel(RuntimeError):
    """The model cannot be recomputed here; ``reason`` is a metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RecomputeReport:
    tokens_per_layer: list[int]
    kept: torch.LongTensor

    def full_depth_tokens(self) -> float:
        """Recomputed tokens summed over layers, divided by the number of layers."""
        return sum(self.tokens_per_layer) / len(self.tokens_per_layer) if self.tokens_per_layer else 0.0


def _engine_inv_freq(rot: torch.nn.Module) -> torch.Tensor:
    """The per-pair frequencies the engine's rotary class rotates by (float32, as it computes them)."""
    name = type(rot).__name__
    if name == "YaRNScalingRotaryEmbedding":
        return rot._compute_inv_freq(rot.scaling_factor)
    inv = rot._compute_inv_freq(rot.base)
    if name == "LinearScalingRotaryEmbedding":
        if len(rot.scaling_factors) != 1:
            raise UnsupportedModel("rope_linear_multi", "several linear scaling factors share one cache")
        inv = inv / float(rot.scaling_factors[0])
    return inv


def rope_spec(rot: torch.nn.Module, hf_config=None) -> RopeSpec:
    """``RopeSpec`` of an engine rotary embedding; ``UnsupportedModel`` when it cannot be moved."""
    name = type(rot).__name__
    if name not in _FIXED_ROPE:
        detail = f"rotary class {name}"
        if hf_config is not None:
            try:
                RopeSpec.from_hf_config(hf_config)
            except UnsupportedRope as exc:
                detail = f"{detail}: {exc}"
        raise UnsupportedModel(_ROPE_REASONS.get(name, "rope_unknown"), detail)
    style = "neox" if rot.is_neox_style else "gptj"
    spec = RopeSpec.from_inv_freq(_engine_inv_freq(rot), style, int(rot.head_size), label=name)
    # The class's frequencies must be what its cos/sin cache rotates by (scale factors cancel in atan2).
    cache = rot.cos_sin_cache.float().cpu()
    rows = sorted({1, 7, min(cache.shape[0] - 1, 1000)})
    cos, sin = cache[rows].chunk(2, dim=-1)
    got = torch.atan2(sin, cos).double()
    want = torch.tensor(rows, dtype=torch.float64)[:, None] * torch.tensor(spec.inv_freq, dtype=torch.float64)
    err = torch.remainder(got - want + math.pi, 2 * math.pi) - math.pi
    # vLLM casts the cache to the activations' dtype on first use: allow that dtype's rounding.
    tolerance = max(1e-3, 4 * torch.finfo(rot.cos_sin_cache.dtype).eps)
    if float(err.abs().max()) > tolerance:
        raise UnsupportedModel("rope_mismatch", f"{name}: frequencies differ from its cos/sin cache")
    return spec


def _check_parallel() -> None:
    try:
        from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size

        tp, pp = get_tensor_model_parallel_world_size(), get_pp_group().world_size
    except (ImportError, AssertionError, AttributeError):  # no parallel state: a single process
        return
    if tp > 1:
        raise UnsupportedModel("tensor_parallel", f"tensor parallel size {tp}")
    if pp > 1:
        raise UnsupportedModel("pipeline_parallel", f"pipeline parallel size {pp}")


def _check_layer(i: int, layer: torch.nn.Module, want: tuple[str, str], paged: PagedKV) -> None:
    if (type(layer).__name__, type(layer.self_attn).__name__) != want:
        raise UnsupportedModel("architecture", f"layer {i} is {type(layer).__name__}/{type(layer.self_attn).__name__}")
    sa, attn = layer.self_attn, layer.self_attn.attn
    if type(attn).__name__ != "Attention" or getattr(attn, "attn_type", "decoder") != "decoder":  # a str enum
        raise UnsupportedModel("attention_type", f"layer {i}: {type(attn).__name__} ({getattr(attn, 'attn_type', '?')})")
    if getattr(attn, "sliding_window", None) is not None:
        raise UnsupportedModel("sliding_window", f"layer {i}: window {attn.sliding_window}")
    impl = getattr(attn, "impl", None)
    if getattr(attn, "has_sink", False) or getattr(impl, "alibi_slopes", None) is not None \
            or getattr(impl, "logits_soft_cap", 0) or getattr(impl, "sinks", None) is not None:
        raise UnsupportedModel("attention_variant", f"layer {i}: sinks, ALiBi or a logit soft cap")
    if getattr(sa, "do_llama_4_scaling", False):
        raise UnsupportedModel("attention_variant", f"layer {i}: position-dependent query scaling")
    if getattr(layer, "ada_rms_norm_t_cond", None) is not None:
        raise UnsupportedModel("architecture", f"layer {i}: time-conditioned RMSNorm")
    if (int(sa.num_kv_heads), int(sa.head_dim)) != (paged.num_kv_heads, paged.head_dim):
        raise UnsupportedModel("layout_mismatch", f"layer {i}: {sa.num_kv_heads} KV heads x {sa.head_dim} vs the cache")


class DecoderRecompute:
    """Layer-by-layer recompute of selected prompt positions over the paged cache."""

    def __init__(self, model: torch.nn.Module, paged: PagedKV, rope: RopeSpec):
        self.model, self.paged, self.rope = model, paged, rope
        self.layers = list(model.model.layers)
        self.num_layers = len(self.layers)
        # Token ids, positions and slots move here, where the weights and the cache live.
        self.device = next(model.parameters()).device

    @classmethod
    def from_model(cls, model: torch.nn.Module, paged: PagedKV) -> "DecoderRecompute":
        want = ACCEPTED.get(type(model).__name__)
        if want is None:
            raise UnsupportedModel("architecture", f"{type(model).__name__} (accepted: {', '.join(ACCEPTED)})")
        _check_parallel()
        body = model.model
        layers = list(body.layers)
        if getattr(body, "start_layer", 0) != 0 or getattr(body, "end_layer", len(layers)) != len(layers):
            raise UnsupportedModel("pipeline_parallel", "the model holds only part of its layers")
        for i, layer in enumerate(layers):
            _check_layer(i, layer, want, paged)
        names = tuple(layer.self_attn.attn.layer_name for layer in layers)
        if names != tuple(paged.layer_names):
            raise UnsupportedModel("layer_names", f"model layers {names[:2]}... vs cache layers {paged.layer_names[:2]}...")
        hf_config = getattr(model, "config", None)
        specs = {rope_spec(layer.self_attn.rotary_emb, hf_config) for layer in layers}
        if len(specs) != 1:
            raise UnsupportedModel("rope_per_layer", f"{len(specs)} different rotations across layers")
        spec = specs.pop()
        if spec.head_dim != paged.head_dim:
            raise UnsupportedModel("layout_mismatch", f"RoPE head dim {spec.head_dim} vs cache {paged.head_dim}")
        return cls(model, paged, spec)

    def run(self, token_ids: Sequence[int], slots: torch.LongTensor, select: torch.LongTensor,
            check_layers: int = 0, narrow: Callable[[np.ndarray], np.ndarray] | None = None) -> RecomputeReport:
        """See the module docstring. Returns the tokens recomputed per layer and the kept positions."""
        return self.run_batch([RecomputeJob(token_ids, slots, select, check_layers, narrow)])[0]

    @torch.inference_mode()
    def run_batch(self, jobs: Sequence["RecomputeJob"]) -> list[RecomputeReport]:
        """``run`` for several requests in one pass (the loads of one engine step): the rows
        of every job go through each projection and MLP together, attention and narrowing
        stay per job. Results equal running the jobs one by one (up to float rounding of
        the larger matrix products); a job with bad arguments raises ``ValueError``
        before anything is written. The jobs' slots must not overlap."""
        rows = [_JobRows.prepare(job, self) for job in jobs]
        budget = [MASK_CACHE_BYTES]
        for r in rows:
            r.mask_budget = budget
        live = [r for r in rows if r.sel.numel()]
        if live:
            h = self.model.model.embed_input_ids(torch.cat([r.ids[r.sel] for r in live]))
            residual = None
            for i, layer in enumerate(self.layers):
                for r in live:
                    r.report.tokens_per_layer.append(int(r.sel.numel()))
                if sum(int(r.sel.numel()) for r in live):
                    h, residual = self._layer(layer, live, h, residual, i, last=i == self.num_layers - 1)
        for r in rows:
            if not r.report.tokens_per_layer:
                r.report.tokens_per_layer = [0] * self.num_layers
            r.report.kept = r.sel
        return [r.report for r in rows]

    def _narrow_rows(self, live: list["_JobRows"], gaps: Sequence[torch.Tensor], ranking: list[bool]) -> torch.Tensor:
        """Narrow the ranking jobs by their deviation; returns the kept rows of the batch."""
        kept, at = [], 0
        for r, gap, ranks in zip(live, gaps, ranking):
            rows = torch.arange(at, at + gap.numel(), device=gap.device)
            at += gap.numel()
            if ranks:
                keep = self._narrowed(r.narrow, gap, gap.numel())
                r.narrow_to(keep)
                rows = rows[keep.to(rows.device)]
            kept.append(rows)
        return torch.cat(kept)

    @staticmethod
    def _narrowed(narrow, deviation: torch.Tensor, n: int) -> torch.Tensor:
        keep = np.asarray(narrow(deviation.cpu().numpy().copy()))
        if keep.ndim != 1 or (keep.size and not np.issubdtype(keep.dtype, np.integer)):
            raise ValueError("narrow must return a 1-D array of indices into select")
        keep = np.unique(keep)
        if keep.size and (keep[0] < 0 or keep[-1] >= n):
            raise ValueError(f"narrow returned indices outside [0, {n})")
        return torch.from_numpy(keep.astype(np.int64))

    def _context_reader(self, slots: torch.LongTensor) -> Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]:
        """``read(layer, end)``: K, V of positions ``[0, end)``, each ``[Hkv, end, D]``. Whole
        blocks when the slots are those of a block table from position 0 (as the engine
        assigns them), slot by slot otherwise."""
        bs = self.paged.block_size
        blocks = slots[::bs] // bs
        if slots.numel() and torch.equal(self.paged.slots(blocks.tolist(), 0, slots.numel()).to(slots.device), slots):
            return lambda name, end: self.paged.read_blocks(name, blocks, end)
        return self._slot_reader(slots)

    def _slot_reader(self, slots: torch.LongTensor) -> Callable[[str, int], tuple[torch.Tensor, torch.Tensor]]:
        def read(name: str, end: int) -> tuple[torch.Tensor, torch.Tensor]:
            k, v = self.paged.read(name, slots[:end])
            return k.transpose(0, 1), v.transpose(0, 1)

        return read

    def _layer(self, layer, live: list["_JobRows"], h, residual, index: int, last: bool = False):
        """One decoder layer for every job's rows ``sel`` (concatenated in job order); returns
        the next (hidden, residual). The last layer stops once its K/V are written: nothing
        reads its attention or MLP output."""
        sa, name = layer.self_attn, layer.self_attn.attn.layer_name
        if residual is None:  # the first layer, as the model's own forward does it
            residual = h
            x = layer.input_layernorm(h)
        else:
            x, residual = layer.input_layernorm(h, residual)
        positions = torch.cat([r.sel for r in live])
        n, heads, kv_heads, dim = positions.numel(), int(sa.num_heads), int(sa.num_kv_heads), int(sa.head_dim)
        qkv, _ = sa.qkv_proj(x)
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        if getattr(sa, "qk_norm", False):
            q = sa.q_norm(q.reshape(n, heads, dim)).reshape(n, sa.q_size)
            k = sa.k_norm(k.reshape(n, kv_heads, dim)).reshape(n, sa.kv_size)
        q, k = sa.rotary_emb(positions, q, k)
        k, v = k.reshape(n, kv_heads, dim), v.reshape(n, kv_heads, dim)
        own = torch.cat([r.slots[r.sel] for r in live])
        sizes = [int(r.sel.numel()) for r in live]
        ranking = [r.checking and index == r.check_layers for r in live]
        if any(ranking):
            stitched, _ = self.paged.read(name, own)
            gap = (k.float() - stitched.float()).pow(2).mean(dim=(1, 2)).double()
        self.paged.write(name, own, k, v)  # every row's fresh K/V, the ones narrowed away too
        q = q.reshape(n, heads, dim)
        if any(ranking):
            keep = self._narrow_rows(live, gap.split(sizes), ranking)
            q, residual, h = q[keep], residual[keep], h[keep]
            sizes = [int(r.sel.numel()) for r in live]
            n = int(keep.numel())
        if last:
            return h, residual
        out = torch.empty_like(q)
        at = 0
        for r, size in zip(live, sizes):
            if size:
                keys, values = r.context(name, int(r.host_sel[-1]) + 1)
                out[at:at + size] = _causal_attention(q[at:at + size], keys, values, r.attention_runs(q.device, q.dtype),
                                                      float(sa.scaling))
            at += size
        o, _ = sa.o_proj(out.reshape(n, heads * dim).to(h.dtype))
        h, residual = layer.post_attention_layernorm(o, residual)
        return layer.mlp(h), residual


@dataclass
class RecomputeJob:
    """One request's recompute: the arguments of ``DecoderRecompute.run``."""

    token_ids: Sequence[int]
    slots: torch.LongTensor
    select: torch.LongTensor
    check_layers: int = 0
    narrow: Callable[[np.ndarray], np.ndarray] | None = None


@dataclass
class _JobRows:
    """A job's validated inputs and its rows' state while the batch runs."""

    ids: torch.LongTensor
    slots: torch.LongTensor
    sel: torch.LongTensor
    host_sel: torch.LongTensor  # ``sel`` on the CPU: run bounds without a device sync
    context: Callable[[str, int], tuple[torch.Tensor, torch.Tensor]] | None
    checking: bool
    check_layers: int
    narrow: Callable[[np.ndarray], np.ndarray] | None
    report: RecomputeReport
    runs: list | None = None  # cached ``causal_runs``: (first row, end row, keys read, mask) per run
    runs_bytes: int = 0
    mask_budget: list | None = None  # [bytes] the pass may still keep in masks, shared by its jobs

    def narrow_to(self, keep: torch.Tensor) -> None:
        """Keep the rows ``keep`` (CPU indices into ``sel``)."""
        self.host_sel = self.host_sel[keep]
        self.sel = self.sel[keep.to(self.sel.device)]
        if self.runs is not None and self.mask_budget is not None:
            self.mask_budget[0] += self.runs_bytes
        self.runs, self.runs_bytes = None, 0

    def attention_runs(self, device: torch.device, dtype: torch.dtype) -> list:
        """The query runs with their causal masks, built once for every layer while the
        pass's masks stay within ``MASK_CACHE_BYTES``, else per call. On CUDA: one run (a
        call costs more than the keys it would skip) and an additive mask the kernel
        takes as is."""
        if self.runs is not None:
            return self.runs
        runs = causal_runs(self.host_sel, device, dtype)
        size = sum(m.numel() * m.element_size() for *_, m in runs)
        if self.mask_budget is not None and size <= self.mask_budget[0]:
            self.mask_budget[0] -= size
            self.runs, self.runs_bytes = runs, size
        return runs

    @classmethod
    def prepare(cls, job: RecomputeJob, owner: "DecoderRecompute") -> "_JobRows":
        end, device = len(job.token_ids), owner.device
        slots = torch.as_tensor(job.slots, dtype=torch.int64).reshape(-1).to(device)
        sel = torch.as_tensor(job.select, dtype=torch.int64).reshape(-1).cpu()
        if slots.numel() != end:
            raise ValueError(f"{slots.numel()} slots for {end} tokens")
        if sel.numel() and (int(sel[0]) < 0 or int(sel[-1]) >= end or bool((sel[1:] <= sel[:-1]).any())):
            raise ValueError(f"select must be sorted, unique positions inside [0, {end})")
        checking = job.narrow is not None and 0 < job.check_layers < owner.num_layers
        return cls(ids=torch.as_tensor(list(job.token_ids), dtype=torch.int64).to(device), slots=slots,
                   sel=sel.to(device), host_sel=sel,
                   context=owner._context_reader(slots) if sel.numel() else None, checking=checking,
                   check_layers=int(job.check_layers), narrow=job.narrow, report=RecomputeReport([], sel))


def causal_runs(pos: torch.Tensor, device: torch.device, dtype: torch.dtype) -> list:
    """``(a, b, stop, mask)`` per query run over sorted host positions ``pos``: rows
    ``[a, b)`` read the first ``stop`` keys, ``mask [b - a, stop]`` allows key position
    <= query position (boolean; on CUDA additive, one run)."""
    runs, cuda = [], device.type == "cuda"
    for a, b in _query_runs(pos.numel(), 1 if cuda else QUERY_RUNS):
        stop = int(pos[b - 1]) + 1
        allowed = torch.arange(stop)[None, :] <= pos[a:b, None]  # [run, stop]
        runs.append((a, b, stop, additive_mask(allowed, dtype, device) if cuda else allowed.to(device)))
    return runs


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``allowed [run, stop]`` as 0 / -inf in ``dtype`` on ``device``, a view whose rows
    are stored 16 elements aligned: torch's memory-efficient kernel would otherwise
    convert a boolean mask and pad an unaligned one on every call."""
    run, stop = allowed.shape
    bias = torch.zeros(run, -(-stop // 16) * 16, dtype=dtype, device=device)
    bias[:, :stop].masked_fill_(~allowed.to(device), float("-inf"))
    return bias[:, :stop]


def _query_runs(n: int, most: int = QUERY_RUNS) -> list[tuple[int, int]]:
    runs = max(1, min(most, n // RUN_MIN_QUERIES))
    cuts = [round(i * n / runs) for i in range(runs + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def _causal_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, runs: Sequence[tuple],
                      scale: float) -> torch.Tensor:
    """Softmax attention of queries ``q [n, H, D]`` over ``keys``/``values`` ``[Hkv, L, D]`` at
    positions ``0..L-1``, run by run (``causal_runs``: rows ``[a, b)`` read the
    first ``stop`` keys through their causal mask; query head ``h`` reads KV head
    ``h // (H / Hkv)``), in ``q``'s dtype. Returns ``[n, H, D]``."""
    out = torch.empty_like(q)
    heads_first = q.transpose(0, 1)  # [H, n, D]
    keys, values = keys.to(q.dtype), values.to(q.dtype)
    backends, gqa = contextlib.nullcontext(), True
    if q.is_cuda and CUDA_ATTENTION == "efficient":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        group = q.shape[1] // keys.shape[0]
        keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
        backends, gqa = sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]), False
    with backends:
        for a, b, stop, allowed in runs:
            o = F.scaled_dot_product_attention(heads_first[None, :, a:b], keys[None, :, :stop],
                                               values[None, :, :stop], attn_mask=allowed, scale=scale,
                                               enable_gqa=gqa)
            out[a:b] = o[0].transpose(0, 1)
    return out
