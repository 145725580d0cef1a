"""A Qwen2-shaped decoder in plain torch with the module interface blend's recompute reads,
and a paged K/V cache in flash-attention's layout: what the GPU timing runs on where
vLLM is not installed.

Contract:
- ``build(dims, device, dtype, seed)`` returns a ``Qwen2ForCausalLM`` with random weights
  whose modules answer what ``DecoderRecompute.from_model`` checks and ``_layer`` calls:
  ``model.model.embed_input_ids``, ``layers[i].input_layernorm(h[, residual])`` (the fused
  residual add), ``self_attn.qkv_proj`` / ``o_proj`` returning ``(out, None)``,
  ``self_attn.rotary_emb(positions, q, k)`` (NeoX RoPE with a ``cos_sin_cache``),
  ``self_attn.attn.layer_name``, ``mlp``. The class names are vLLM's, so the recompute's
  own architecture and RoPE checks run unchanged. It is a timing stand-in: vLLM's fused
  RMSNorm, rotary and SiLU kernels would make both the prefill and the recompute faster.
- ``prefill(model, paged, ids, slots)``: the full causal forward of ``B`` prompts of
  equal length (``ids``, ``slots`` ``[B, L]``), writing every layer's K/V to ``slots``
  as vLLM's prefill does; attention is torch's fused causal kernel.
- ``FlashPagedKV(layer_names, num_blocks, block_size, kv_heads, head_dim, dtype, device)``
  is the plugin's own ``PagedKV`` over one ``[2, num_blocks, block_size, kv_heads,
  head_dim]`` tensor per layer, K in half 0 and V in half 1 (flash-attention's layout
  before vLLM 0.27; the block axis is not the leading one), written by a plain-torch
  ``do_kv_cache_update`` and read through the layout ``PagedKV`` probes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cp_engine.hooks.vllm.blend_layout import PagedKV

QWEN25_7B = "3584,18944,28,28,4,128"  # hidden, intermediate, layers, heads, KV heads, head dim


@dataclass(frozen=True)
class Dims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int = 152064
    rope_theta: float = 1_000_000.0
    max_positions: int = 32768

    @classmethod
    def parse(cls, text: str, **extra) -> "Dims":
        """``hidden,intermediate,layers,heads,kv_heads,head_dim`` (the prefill_gpu form)."""
        parts = [int(x) for x in text.split(",")]
        if len(parts) != 6:
            raise ValueError(f"dims want 6 integers, got {text!r}")
        return cls(*parts, **extra)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x, residual=None):
        if residual is not None:  # the fused form: normalise x + residual, return that sum too
            x = x + residual
            residual = x
        var = x.float().pow(2).mean(-1, keepdim=True)
        out = (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight
        return out if residual is None else (out, residual)


class PairLinear(nn.Linear):
    """A linear layer answering ``(output, bias)`` as vLLM's parallel linears do."""

    def forward(self, x):
        return super().forward(x), None


class RotaryEmbedding(nn.Module):
    """NeoX-style RoPE over the whole head with fixed frequencies."""

    def __init__(self, head_size: int, max_positions: int, base: float):
        super().__init__()
        self.head_size, self.base, self.is_neox_style = head_size, base, True
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), self._compute_inv_freq(base))
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def _compute_inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.head_size, 2, dtype=torch.float32) / self.head_size))

    def _rotate(self, x, cos, sin):
        n = x.shape[0]
        x = x.view(n, -1, self.head_size)
        a, b = x.chunk(2, dim=-1)
        xf = torch.cat([a.float() * cos - b.float() * sin, b.float() * cos + a.float() * sin], dim=-1)
        return xf.to(x.dtype).reshape(n, -1)

    def forward(self, positions, q, k):
        cos, sin = self.cos_sin_cache.to(q.device)[positions].chunk(2, dim=-1)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


class Attention(nn.Module):
    """Names the layer's cache; attention itself runs in ``prefill`` or in the recompute."""

    attn_type = "decoder"
    sliding_window = None

    def __init__(self, layer_name: str):
        super().__init__()
        self.layer_name = layer_name


class Qwen2Attention(nn.Module):
    def __init__(self, d: Dims, index: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = d.heads, d.kv_heads, d.head_dim
        self.q_size, self.kv_size = d.heads * d.head_dim, d.kv_heads * d.head_dim
        self.scaling = d.head_dim ** -0.5
        self.qkv_proj = PairLinear(d.hidden, self.q_size + 2 * self.kv_size, bias=True)
        self.o_proj = PairLinear(self.q_size, d.hidden, bias=False)
        self.rotary_emb = RotaryEmbedding(d.head_dim, d.max_positions, d.rope_theta)
        self.attn = Attention(f"model.layers.{index}.self_attn.attn")


class Qwen2MLP(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.gate_up_proj = PairLinear(d.hidden, 2 * d.intermediate, bias=False)
        self.down_proj = PairLinear(d.intermediate, d.hidden, bias=False)

    def forward(self, x):
        gate_up, _ = self.gate_up_proj(x)
        gate, up = gate_up.chunk(2, dim=-1)
        out, _ = self.down_proj(F.silu(gate) * up)
        return out


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, d: Dims, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(d.hidden)
        self.self_attn = Qwen2Attention(d, index)
        self.post_attention_layernorm = RMSNorm(d.hidden)
        self.mlp = Qwen2MLP(d)


class Qwen2Model(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.embed_tokens = nn.Embedding(d.vocab, d.hidden)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(d, i) for i in range(d.layers))

    def embed_input_ids(self, ids):
        return self.embed_tokens(ids)


class Qwen2ForCausalLM(nn.Module):
    def __init__(self, d: Dims):
        super().__init__()
        self.dims = d
        self.model = Qwen2Model(d)


def build(d: Dims, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> Qwen2ForCausalLM:
    """Random weights (std 0.02, norms at 1), made on ``device``, cast to ``dtype``."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen2ForCausalLM(d)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight"):
                continue
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.zero_()
    return model.to(dtype).eval()


class FlashCacheUpdate:
    """A backend impl whose cache write is flash-attention's layout in plain torch: K of
    slot ``s`` at ``cache[0, s // block_size, s % block_size]``, V at ``cache[1, ...]``."""

    kv_cache_dtype = "auto"

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        flat = kv_cache.view(2, -1, *kv_cache.shape[3:])
        flat[0, slot_mapping] = key
        flat[1, slot_mapping] = value


class FlashBackend:
    """The backend class the layer names: its forward leaves the cache write to the impl."""

    forward_includes_kv_cache_update = False


class FlashAttentionLayer(nn.Module):
    """What ``PagedKV`` reads of a vLLM attention layer: heads, head size, impl, backend."""

    def __init__(self, kv_heads: int, head_dim: int):
        super().__init__()
        self.num_kv_heads, self.head_size = kv_heads, head_dim
        self.impl, self.attn_backend = FlashCacheUpdate(), FlashBackend


class FlashPagedKV(PagedKV):
    """The plugin's ``PagedKV`` over one ``[2, num_blocks, block_size, kv_heads, head_dim]``
    cache per layer (its layout probed through ``FlashCacheUpdate`` like any backend's)."""

    def __init__(self, layer_names: Sequence[str], num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: str | torch.device):
        caches = {n: torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, dtype=dtype, device=device)
                  for n in layer_names}
        layers = {n: FlashAttentionLayer(kv_heads, head_dim) for n in layer_names}
        super().__init__(caches, layers, block_size, num_blocks)


@torch.inference_mode()
def prefill(model: Qwen2ForCausalLM, paged: FlashPagedKV, ids: torch.Tensor, slots: torch.Tensor) -> None:
    """Full causal forward of ``ids [B, L]`` (positions ``0..L-1`` each), K/V to ``slots [B, L]``."""
    b, length = ids.shape
    n = b * length
    positions = torch.arange(length, device=ids.device).repeat(b)
    h, residual = model.model.embed_input_ids(ids.reshape(-1)), None
    flat_slots = slots.reshape(-1)
    for layer in model.model.layers:
        sa = layer.self_attn
        if residual is None:
            residual, x = h, layer.input_layernorm(h)
        else:
            x, residual = layer.input_layernorm(h, residual)
        qkv, _ = sa.qkv_proj(x)
        q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
        q, k = sa.rotary_emb(positions, q, k)
        k, v = k.reshape(n, sa.num_kv_heads, sa.head_dim), v.reshape(n, sa.num_kv_heads, sa.head_dim)
        paged.write(sa.attn.layer_name, flat_slots, k, v)
        group = sa.num_heads // sa.num_kv_heads

        def heads_first(t, expand):
            t = t.reshape(b, length, -1, sa.head_dim)
            return (t.repeat_interleave(group, dim=2) if expand else t).transpose(1, 2)

        o = F.scaled_dot_product_attention(heads_first(q, False), heads_first(k, True), heads_first(v, True),
                                           is_causal=True, scale=sa.scaling)
        o, _ = sa.o_proj(o.transpose(1, 2).reshape(n, sa.q_size))
        h, residual = layer.post_attention_layernorm(o, residual)
        h = layer.mlp(h)
