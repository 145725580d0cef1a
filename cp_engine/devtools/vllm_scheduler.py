"""vLLM's real v1 ``Scheduler`` (with its real KVCacheManager and BlockPool) built on
CPU from the installed classes, with a tiny model *config* (no weights, no hub).

For code that drives the scheduler without a model: the EngineCore-side tests and the
queue-order replay (``benchmarks.reliability.queue_replay``). Importing this module
imports vLLM and torch (10-20 s).
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

import torch  # noqa: E402
from transformers import LlamaConfig  # noqa: E402
from vllm.config import CacheConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import get_hash_fn_by_name  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

__all__ = ["config_dir", "make_scheduler", "make_request"]

_config_dir: str | None = None


def config_dir() -> str:
    """A folder holding a tiny Llama config (made once per process)."""
    global _config_dir
    if _config_dir is None:
        _config_dir = tempfile.mkdtemp(prefix="cp_tiny_cfg_")
        LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=8192).save_pretrained(_config_dir)
    return _config_dir


def make_scheduler(num_blocks: int, block_size: int = 16, policy: str = "fcfs", max_num_seqs: int = 16,
                   max_batched_tokens: int = 2048, max_model_len: int = 2048) -> Scheduler:
    """A real Scheduler over ``num_blocks`` KV blocks of ``block_size`` tokens (one of
    them is vLLM's null block), prefix caching on, chunked prefill as configured by
    ``max_batched_tokens``. Its queues come from ``create_request_queue``, so an
    installed queue patch applies to them."""
    mc = ModelConfig(model=config_dir(), skip_tokenizer_init=True, dtype="float32", max_model_len=max_model_len,
                     seed=0)
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                         max_model_len=max_model_len, is_encoder_decoder=False, policy=policy)
    cc = CacheConfig(block_size=block_size, cache_dtype="auto", enable_prefix_caching=True)
    vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc)
    cc.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer0"], FullAttentionSpec(
            block_size=block_size, num_kv_heads=1, head_size=8, dtype=torch.float32))],
    )
    return Scheduler(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
                     block_size=block_size, log_stats=True)


_hashers: dict[int, object] = {}


def make_request(request_id: str, tokens: list[int], extra_args: dict | None = None, max_tokens: int = 4,
                 block_size: int = 16, arrival_time: float | None = None) -> Request:
    """A vLLM ``Request`` whose block hashes (sha256, as the engine computes them) are
    set for ``block_size``-token blocks; greedy sampling of ``max_tokens`` tokens."""
    hasher = _hashers.get(block_size)
    if hasher is None:
        fn = get_hash_fn_by_name("sha256")
        init_none_hash(fn)
        hasher = _hashers[block_size] = get_request_block_hasher(block_size, fn)
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra_args, temperature=0.0)
    kwargs = {} if arrival_time is None else {"arrival_time": arrival_time}
    return Request(request_id, tokens, params, None, block_hasher=hasher, **kwargs)
