"""Stand-in for ``blend_recompute.DecoderRecompute`` (same interface, see the blend
contract) used by ``blend_worker`` only while that module is absent. Plain RoPE only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from cp_engine.blend.rope import RopeSpec


class UnsupportedModel(RuntimeError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass
class RecomputeReport:
    tokens_per_layer: list
    kept: torch.LongTensor

    def full_depth_tokens(self) -> float:
        return sum(self.tokens_per_layer) / max(1, len(self.tokens_per_layer))


class DecoderRecompute:
    """Layer-by-layer pass over a Llama-family model's own modules (exact causal SDPA)."""

    def __init__(self, model, paged, rope: RopeSpec):
        self.model, self.paged, self.rope = model, paged, rope
        self.num_layers = len(model.model.layers)

    @classmethod
    def from_model(cls, model, paged) -> "DecoderRecompute":
        inner = getattr(model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None or not hasattr(inner, "embed_tokens"):
            raise UnsupportedModel("architecture", type(model).__name__)
        names = tuple(layer.self_attn.attn.layer_name for layer in layers)
        if names != paged.layer_names:
            raise UnsupportedModel("layer_names")
        rot = layers[0].self_attn.rotary_emb
        if type(rot).__name__ != "RotaryEmbedding":
            raise UnsupportedModel("rope_" + type(rot).__name__)
        inv = rot._compute_inv_freq(rot.base)
        rope = RopeSpec.from_inv_freq(inv, "neox" if rot.is_neox_style else "gptj", layers[0].self_attn.head_dim)
        return cls(model, paged, rope)

    @torch.inference_mode()
    def run(self, token_ids: Sequence[int], slots: torch.LongTensor, select: torch.LongTensor,
            check_layers: int = 0, narrow: Callable[[np.ndarray], np.ndarray] | None = None) -> RecomputeReport:
        m = self.model.model
        end = len(token_ids)
        sel = torch.as_tensor(select, dtype=torch.long)
        h = m.embed_tokens(torch.as_tensor(list(token_ids), dtype=torch.long)[sel])
        residual = None
        counts = []
        key_pos = torch.arange(end)
        for i, layer in enumerate(m.layers):
            sa = layer.self_attn
            name = sa.attn.layer_name
            n = int(sel.numel())
            counts.append(n)
            if residual is None:
                residual = h
                x = layer.input_layernorm(h)
            else:
                x, residual = layer.input_layernorm(h, residual)
            qkv, _ = sa.qkv_proj(x)
            q, k, v = qkv.split([sa.q_size, sa.kv_size, sa.kv_size], dim=-1)
            q, k = sa.rotary_emb(sel, q, k)
            hkv, d, heads = sa.num_kv_heads, sa.head_dim, sa.num_heads
            k, v = k.view(n, hkv, d), v.view(n, hkv, d)
            if narrow is not None and i < check_layers:
                old_k, _ = self.paged.read(name, slots[sel])
                dev = ((k.float() - old_k.float()) ** 2).sum(dim=(1, 2)).numpy()
            self.paged.write(name, slots[sel], k, v)
            kk, vv = self.paged.read(name, slots[:end])
            kk = kk.repeat_interleave(heads // hkv, dim=1).transpose(0, 1)
            vv = vv.repeat_interleave(heads // hkv, dim=1).transpose(0, 1)
            qq = q.view(n, heads, d).transpose(0, 1)
            mask = key_pos[None, :] <= sel[:, None]
            o = torch.nn.functional.scaled_dot_product_attention(qq, kk.to(qq.dtype), vv.to(qq.dtype),
                                                                 attn_mask=mask, scale=sa.scaling)
            o, _ = sa.o_proj(o.transpose(0, 1).reshape(n, heads * d))
            h, residual = layer.post_attention_layernorm(o, residual)
            h = layer.mlp(h)
            if narrow is not None and i + 1 == check_layers:
                keep = torch.as_tensor(np.asarray(narrow(dev)), dtype=torch.long)
                sel, h, residual = sel[keep], h[keep], residual[keep]
        return RecomputeReport(counts, sel)
