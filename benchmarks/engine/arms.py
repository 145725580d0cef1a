"""What each arm of the engine benchmark sends (a batched-RAG workload is sent all at
once with ``--concurrency`` threads):

- ``off``: plugin-off server (``CP_ENGINE_DISABLE=1``), documents in retrieval order in the
  user turn. Multi-turn: every turn re-sends its documents with the full history.
- ``on``: plugin-on server, ``extra_body={"context_blocks": ..., "conversation_id": ...}``;
  the plugin reorders online (arrival order), dedups, annotates, orders the waiting queue.
- ``on+batch``: ``cp_engine.build_batch_messages`` planned client-side for the whole batch,
  sent in its execution order to the plugin-on server; blocks weighed by the served
  model's token counts (``benchmarks.engine.tokens``; characters/4 estimates when the
  tokenizer cannot be loaded here).
- ``on+batch-noannot``: the same plan rendered with ``CP_ENGINE_ANNOTATE=0`` semantics
  (no annotation, so no block labels either): what the annotation costs in tokens.
- ``peer``: the peer's ``contextpilot.optimize_batch`` messages in its execution order,
  sent to the plugin-off server.
- ``off@on``: the ``off`` arm's requests again, on the plugin-on server (they pass
  through it unmodified). A clock for that server: the two servers run minutes apart,
  and this 2-core box's speed drifted ~10% between them (measured: the same
  pre-rendered requests ran at 11,300 recomputed tokens/s on one server and 11,900 on
  the other, each rate steady across arms), so time ratios of the plugin-on arms are
  taken against ``off@on``; token ratios always against ``off``.
"""
from __future__ import annotations

import time
from typing import Callable

from benchmarks.common.live import Request, peer_messages, plain_messages
from benchmarks.engine.workloads import Rag

SYSTEM = "You are a helpful assistant. Answer the question from the documents."
NOANNOT = "on+batch-noannot"
OFF_ON = "off@on"  # the off arm's requests on the plugin-on server: that server's clock
RAG_ARMS = ("off", "on", "on+batch", NOANNOT, "peer", OFF_ON)
CHAT_ARMS = ("off", "on")
SERVER_OF = {"off": "off", "peer": "off", "on": "on", "on+batch": "on", NOANNOT: "on", OFF_ON: "on"}


def plain(blocks, question) -> list[dict]:
    return plain_messages(SYSTEM, blocks, question)


def rag_requests(arm: str, rag: Rag, count_tokens: Callable[[str], int] | None = None
                 ) -> tuple[list[Request], float]:
    """Requests in submission order, plus client-side planning seconds (``count_tokens``:
    see ``block_token_counter``; only the client-side batch plan uses it)."""
    if arm in ("off", OFF_ON):
        return [Request(plain(d, q), tag=i) for i, (d, q) in enumerate(zip(rag.docs, rag.queries))], 0.0
    if arm == "on":
        return [Request([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
                        {"context_blocks": d}, tag=i) for i, (d, q) in enumerate(zip(rag.docs, rag.queries))], 0.0
    if arm in ("on+batch", NOANNOT):
        from cp_engine import Config, build_batch_messages

        t0 = time.perf_counter()
        cfg = Config(annotate=arm != NOANNOT)  # without annotation, blocks go unlabelled too
        batch = build_batch_messages(list(zip(rag.docs, rag.queries)), system=SYSTEM, config=cfg,
                                     count_tokens=count_tokens)
        secs = time.perf_counter() - t0
        return [Request(m, tag=i) for i, m in batch], secs
    if arm == "peer":
        out = peer_messages(rag.docs, rag.queries, SYSTEM)
        if out is None:
            return [], 0.0
        return [Request(m, tag=i) for m, i in zip(out["messages"], out["order"])], float(out.get("seconds", 0))
    raise ValueError(arm)

