"""Moving K between positions: undo and redo rotary position embedding (RoPE).

Plain RoPE rotates each pair of K's dimensions by ``position * inv_freq[i]``, so K
computed at position ``p`` becomes K at ``p + delta`` by one more rotation of
``delta * inv_freq[i]``: exact up to float rounding whenever the frequencies are fixed
per dimension. ``shift_k(k, delta, spec)`` does that for a block, so K computed at
``[p, p+n)`` moves to ``[0, n)`` (``delta=-p``, the stored form) and from there to
``[q, q+n)`` (``delta=q``).

Supported (``RopeSpec.from_hf_config``): pair styles ``neox`` (rotate-half: Llama,
Qwen2/Qwen3, Mistral in HF and vLLM) and ``gptj`` (interleaved pairs); partial rotary
(``partial_rotary_factor``, GPT-J ``rotary_dim``); scaling ``default``, ``linear`` and
``llama3`` (fixed frequencies, computed here). YaRN is exact too (fixed frequencies; its
attention factor scales cos and sin alike, so the stored K keeps it and a rotation does
not touch it) but its frequencies must come from the engine (``RopeSpec.from_inv_freq``).
``UnsupportedRope`` (with the reason) for frequencies that depend on the sequence
length (``dynamic`` NTK, ``longrope``), multimodal RoPE, unknown types or model families.

Rotation angles are computed in float64; K is rotated in float32 (float64 input stays
float64) and returned in its own dtype. Works on NumPy arrays and torch tensors of shape
``[..., head_dim]`` (every leading axis is rotated by the same ``delta``).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["UnsupportedRope", "RopeSpec", "STYLES", "SCALINGS", "shift_k", "shift_k_numpy", "shift_k_torch"]

STYLES = ("neox", "gptj")
# Scaling types whose frequencies this module computes from a config.
SCALINGS = ("default", "linear", "llama3")
# Families whose pair style is known; anything else needs an explicit style.
MODEL_STYLES = {"llama": "neox", "mistral": "neox", "qwen2": "neox", "qwen3": "neox", "gptj": "gptj"}
_WHY = {
    "dynamic": "dynamic NTK changes the frequencies with the sequence length",
    "longrope": "longrope picks short or long factors by the sequence length",
    "yarn": "YaRN re-rotates exactly but its frequencies must come from the engine (RopeSpec.from_inv_freq)",
    "mrope": "multimodal RoPE rotates by several position ids per token",
}


class UnsupportedRope(ValueError):
    """This model's position embedding cannot be moved by a fixed rotation."""


@dataclass(frozen=True)
class RopeSpec:
    """Fixed per-pair frequencies, their pair style and how many dims they rotate."""

    inv_freq: tuple[float, ...]
    style: str
    head_dim: int
    label: str = "custom"

    def __post_init__(self):
        if self.style not in STYLES:
            raise UnsupportedRope(f"RoPE style {self.style!r} unknown; supported: {', '.join(STYLES)}")
        if not self.inv_freq or 2 * len(self.inv_freq) > self.head_dim:
            raise ValueError(f"{len(self.inv_freq)} frequencies do not fit head_dim {self.head_dim}")
        if not all(math.isfinite(f) and f >= 0 for f in self.inv_freq):
            raise ValueError("inverse frequencies must be finite and non-negative")

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.inv_freq)

    def identity(self) -> str:
        """Text for ``KVLayout.rope``: equal only for identical rotations."""
        digest = hashlib.blake2b(np.asarray(self.inv_freq, dtype="<f8").tobytes(), digest_size=8).hexdigest()
        return f"{self.style}/rot{self.rotary_dim}of{self.head_dim}/{self.label}/{digest}"

    @classmethod
    def from_inv_freq(cls, inv_freq: Sequence[float], style: str, head_dim: int, label: str = "engine") -> "RopeSpec":
        """From the engine's own frequencies (e.g. an HF ``rotary_emb.inv_freq`` buffer)."""
        values = np.asarray(_to_numpy(inv_freq), dtype=np.float64).reshape(-1)
        return cls(tuple(float(v) for v in values), style, int(head_dim), label)

    @classmethod
    def from_hf_config(cls, config: Any, style: str | None = None) -> "RopeSpec":
        """From a HuggingFace config (object or dict); ``UnsupportedRope`` says why not."""
        get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
        model_type = get("model_type", None)
        style = style or MODEL_STYLES.get(model_type)
        if style is None:
            raise UnsupportedRope(f"model type {model_type!r}: RoPE pair style unknown (pass style=)")
        params = dict(get("rope_parameters", None) or get("rope_scaling", None) or {})
        if any(isinstance(v, Mapping) for v in params.values()):
            raise UnsupportedRope("RoPE parameters differ per layer type (e.g. sliding and full attention)")
        kind = params.get("rope_type") or params.get("type") or "default"
        if "mrope_section" in params or params.get("mrope_interleaved"):
            kind = "mrope"
        if kind not in SCALINGS:
            raise UnsupportedRope(f"rope type {kind!r}: " + _WHY.get(kind, "not a fixed-frequency rotation known here"))
        try:
            theta = float(params.get("rope_theta") or get("rope_theta", None) or 10000.0)
            head_dim = int(get("head_dim", None) or get("hidden_size") // get("num_attention_heads"))
            rotary_dim = int(get("rotary_dim", None) or head_dim * float(params.get("partial_rotary_factor")
                                                                      or get("partial_rotary_factor", None) or 1.0))
            inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
            if kind == "linear":
                inv = inv / float(params["factor"])
            elif kind == "llama3":
                inv = _llama3(inv, params, get("max_position_embeddings"))
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
            raise UnsupportedRope(f"rope type {kind!r}: incomplete or malformed parameters ({exc!r})") from exc
        return cls(tuple(float(v) for v in inv), style, head_dim, f"{kind}-theta{theta:g}")


def _llama3(inv: np.ndarray, params: Mapping[str, Any], max_pos: int | None) -> np.ndarray:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short kept, a linear blend between."""
    factor, low, high = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
    context = float(params.get("original_max_position_embeddings") or max_pos)
    wavelen = 2 * math.pi / inv
    blend = np.clip((context / wavelen - low) / (high - low), 0.0, 1.0)
    # blend 0 for wavelengths beyond context/low (fully scaled), 1 below context/high (kept).
    return (1 - blend) * inv / factor + blend * inv


def _to_numpy(x: Any) -> Any:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else x


def _angles(delta: int, spec: RopeSpec) -> tuple[np.ndarray, np.ndarray]:
    theta = float(int(delta)) * np.asarray(spec.inv_freq, dtype=np.float64)
    return np.cos(theta), np.sin(theta)


def _pairs(x, spec: RopeSpec):
    """The two halves of each rotated pair (views), in the spec's style."""
    rot = x[..., : spec.rotary_dim]
    if spec.style == "neox":
        half = spec.rotary_dim // 2
        return rot[..., :half], rot[..., half:]
    return rot[..., 0::2], rot[..., 1::2]


def _check(k, spec: RopeSpec) -> None:
    if k.shape[-1] != spec.head_dim:
        raise ValueError(f"K's last axis is {k.shape[-1]}, the RoPE spec's head_dim is {spec.head_dim}")


def shift_k_numpy(k: np.ndarray, delta: int, spec: RopeSpec) -> np.ndarray:
    """NumPy reference of ``shift_k``: a new array, ``k``'s dtype."""
    _check(k, spec)
    work = np.array(k, dtype=np.float64 if k.dtype == np.float64 else np.float32)
    cos, sin = _angles(delta, spec)
    a, b = _pairs(work, spec)
    a0, b0 = a.copy(), b.copy()
    a[...] = a0 * cos - b0 * sin
    b[...] = b0 * cos + a0 * sin
    return work.astype(k.dtype, copy=False)


def shift_k_torch(k, delta: int, spec: RopeSpec):
    """torch version of ``shift_k``: a new tensor on ``k``'s device, ``k``'s dtype."""
    import torch

    _check(k, spec)
    work_dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    work = k.to(work_dtype).clone()
    cos_np, sin_np = _angles(delta, spec)
    cos = torch.from_numpy(cos_np).to(device=k.device, dtype=work_dtype)
    sin = torch.from_numpy(sin_np).to(device=k.device, dtype=work_dtype)
    a, b = _pairs(work, spec)
    a0, b0 = a.clone(), b.clone()
    a.copy_(a0 * cos - b0 * sin)
    b.copy_(b0 * cos + a0 * sin)
    return work.to(k.dtype)


def shift_k(k, delta: int, spec: RopeSpec):
    """K at positions ``[p, p+n)`` -> K at ``[p+delta, p+n+delta)`` (NumPy or torch)."""
    if isinstance(k, np.ndarray):
        return shift_k_numpy(k, delta, spec)
    return shift_k_torch(k, delta, spec)
