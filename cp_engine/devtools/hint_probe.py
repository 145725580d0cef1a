"""See the hints a vLLM engine really received: a logits processor that records them.

For tests and debugging only. vLLM hands every request's ``SamplingParams`` (with
``extra_args``, where the API server's hints ride) and prompt ids to each logits
processor when the request joins the batch, after EngineCore. This one writes them as a
JSON line to the file named by ``CP_ENGINE_HINT_PROBE_FILE`` and leaves the logits alone::

    CP_ENGINE_HINT_PROBE_FILE=/tmp/hints.jsonl python -m vllm.entrypoints.openai.api_server \\
        --model DIR --logits-processors cp_engine.devtools.hint_probe:HintProbe

Each line: ``{"extra_args": {...}, "prompt_token_ids": [...]}``.
"""
from __future__ import annotations

import json
import os
from typing import Any

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor
except ImportError:  # pragma: no cover - without vLLM there is nothing to probe
    LogitsProcessor = object  # type: ignore[assignment,misc]

__all__ = ["HintProbe", "PROBE_ENV", "read_probe"]

PROBE_ENV = "CP_ENGINE_HINT_PROBE_FILE"


class HintProbe(LogitsProcessor):  # type: ignore[misc,valid-type]
    def __init__(self, vllm_config: Any = None, device: Any = None, is_pin_memory: bool = False):
        self.path = os.environ.get(PROBE_ENV, "")

    def is_argmax_invariant(self) -> bool:
        return True  # never changes the logits

    def update_state(self, batch_update: Any) -> None:
        if batch_update is None or not self.path:
            return
        lines = []
        for _index, params, prompt_ids, _output in batch_update.added:
            extra = getattr(params, "extra_args", None) or {}
            lines.append(json.dumps({"extra_args": extra, "prompt_token_ids": list(prompt_ids or [])},
                                    default=str))
        if lines:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write("\n".join(lines) + "\n")

    def apply(self, logits: Any) -> Any:
        return logits


def read_probe(path: str) -> list[dict]:
    """The records written so far (none when the file does not exist yet)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
