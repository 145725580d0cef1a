"""Backend choice for overlap scoring: NumPy always, Triton when it can run.

``auto`` picks Triton only when torch, triton and a CUDA device are present and the
problem has at least ``TRITON_MIN_PAIRS`` query×candidate pairs; anything else (or a
failed probe) silently means NumPy. A forced backend (argument or
``CP_ENGINE_KERNEL_BACKEND``) that cannot run raises ``BackendUnavailable``.
torch and triton are imported only here, lazily, and only when Triton is considered.
"""
from __future__ import annotations

import glob
import os
from functools import lru_cache

BACKENDS = ("auto", "numpy", "triton")

# Pairs (nq × nc) from which auto prefers the GPU kernel. Provisional: no GPU was lent
# when this was written; `python -m benchmarks.micro.kernels --gpu` prints the measured
# crossover (numpy vs triton median) and this constant should take that value.
TRITON_MIN_PAIRS = 4_000_000
MAX_K = 128  # the Triton kernel keeps the running top-k in registers: KP × BLOCK_Q

_auto_failed: list[str] = []  # set once an automatic Triton run failed: auto stays on NumPy


class BackendUnavailable(RuntimeError):
    """A forced backend cannot run in this process."""


def gpu_device_present() -> bool:
    """A GPU device node exists (NVIDIA or AMD): checked before anything imports torch,
    which alone costs seconds and hundreds of MB on a CPU-only machine."""
    return (os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/kfd")
            or bool(glob.glob("/dev/nvidia[0-9]*")))


@lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(usable, reason). Usable on CUDA, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import torch  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the environment
        return False, f"torch is not importable ({exc.__class__.__name__}: {exc})"
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return False, f"triton is not importable ({exc.__class__.__name__}: {exc}); pip install triton"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "triton interpreter (CPU tensors)"
    try:
        if not torch.cuda.is_available():
            return False, "no CUDA device (torch.cuda.is_available() is False)"
    except Exception as exc:  # pragma: no cover
        return False, f"CUDA probe failed ({exc})"
    return True, f"CUDA device {torch.cuda.get_device_name(0)}"


def requested_backend(backend: str | None) -> str:
    """An explicit argument wins; ``None`` reads CP_ENGINE_KERNEL_BACKEND (default auto)."""
    if backend is None:
        from cp_engine.config import load_config

        backend = load_config().kernel_backend
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def auto_failed(reason: str) -> None:
    """Record that an automatically chosen Triton run failed; log once, never retry."""
    if not _auto_failed:
        import logging

        logging.getLogger("cp_engine.kernels").warning(
            "Triton overlap kernel failed, using NumPy from now on: %s", reason)
    _auto_failed.append(reason)


def choose_backend(backend: str | None, pairs: int, k: int = 1) -> tuple[str, bool]:
    """(backend, forced) for ``pairs`` query×candidate pairs and top-``k``.

    'auto'/None resolves to a runnable backend; a forced one is checked and raises."""
    want = requested_backend(backend)
    if want == "numpy":
        return "numpy", True
    if want == "triton":
        ok, why = triton_status()
        if not ok:
            raise BackendUnavailable(f"backend='triton' was forced but cannot run: {why}")
        if k > MAX_K:
            raise BackendUnavailable(f"backend='triton' keeps at most k={MAX_K}; got k={k}")
        return "triton", True
    if pairs < TRITON_MIN_PAIRS or k > MAX_K or _auto_failed or os.environ.get("TRITON_INTERPRET") == "1":
        return "numpy", False  # the interpreter is for tests, never an automatic choice
    ok, _ = triton_status()
    return ("triton" if ok else "numpy"), False
