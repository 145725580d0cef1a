"""vLLM's real v1 ``Scheduler`` on CPU for the EngineCore-side tests, with 16-token
blocks (builder: ``cp_engine.devtools.vllm_scheduler``).

Importing it imports vLLM (~10-20 s).
"""
from __future__ import annotations

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from cp_engine.devtools import vllm_scheduler as _vs

BLOCK = 16


def model_dir() -> str:
    return _vs.config_dir()


def make_scheduler(num_blocks: int, policy: str = "fcfs", max_num_seqs: int = 16,
                   max_batched_tokens: int = 2048) -> Scheduler:
    """A real Scheduler over ``num_blocks`` KV blocks of ``BLOCK`` tokens (one is vLLM's null block)."""
    return _vs.make_scheduler(num_blocks, BLOCK, policy=policy, max_num_seqs=max_num_seqs,
                              max_batched_tokens=max_batched_tokens)


def make_request(request_id: str, tokens: list[int], extra_args: dict | None = None, max_tokens: int = 4) -> Request:
    return _vs.make_request(request_id, tokens, extra_args, max_tokens=max_tokens, block_size=BLOCK)


def abort(sched: Scheduler, ids) -> None:
    sched.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
