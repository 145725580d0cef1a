"""Characters per token of the served model's tokenizer, measured on live traffic.

The hints for EngineCore (``cp_ends``) must be in the engine's real token units: its
evictions come as KV-block positions. The core estimates token lengths at a fixed 4
characters per token, which is far off for many tokenizers (the tests' tiny tokenizer
runs ~2.8). ``TokenRatio.observe`` tokenizes a bounded sample of rendered contexts (the
first ``warmup`` requests, then one in ``every``) and ``scale()`` converts estimates.

Contract: ``observe`` never raises (a tokenizer error is ignored); ``scale()`` is 1.0
until a sample exists; the cost is bounded by the sampling rate. Thread-safe.
"""
from __future__ import annotations

import threading
from typing import Any

ESTIMATE_CHARS_PER_TOKEN = 4  # cp_engine.blocks' estimate


class TokenRatio:
    def __init__(self, warmup: int = 16, every: int = 64):
        self.warmup, self.every = warmup, every
        self._lock = threading.Lock()
        self._seen = 0
        self._chars = 0
        self._tokens = 0

    def observe(self, tokenizer: Any, text: str) -> None:
        if tokenizer is None or not text:
            return
        with self._lock:
            self._seen += 1
            take = self._seen <= self.warmup or self._seen % self.every == 0
        if not take:
            return
        try:
            n = len(tokenizer.encode(text, add_special_tokens=False))
        except Exception:
            return
        if n > 0:
            with self._lock:
                self._chars += len(text)
                self._tokens += n

    def chars_per_token(self) -> float | None:
        with self._lock:
            return self._chars / self._tokens if self._tokens else None

    def scale(self) -> float:
        """Real tokens per estimated token (1.0 before any sample)."""
        cpt = self.chars_per_token()
        return ESTIMATE_CHARS_PER_TOKEN / cpt if cpt else 1.0
