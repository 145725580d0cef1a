"""Build vLLM's real v1 ``Scheduler`` (with its real KVCacheManager and BlockPool) on
CPU from the installed classes, with a tiny local model config (no weights, no hub).

Shared by the EngineCore-side tests; importing it imports vLLM (~10-20 s).
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
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

BLOCK = 16
_model_dir: str | None = None


def model_dir() -> str:
    global _model_dir
    if _model_dir is None:
        _model_dir = tempfile.mkdtemp(prefix="cp_tiny_cfg_")
        LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                    num_attention_heads=2, num_key_value_heads=1,
                    max_position_embeddings=4096).save_pretrained(_model_dir)
    return _model_dir


def make_scheduler(num_blocks: int, policy: str = "fcfs", max_num_seqs: int = 16,
                   max_batched_tokens: int = 2048) -> Scheduler:
    """A real Scheduler over ``num_blocks`` KV blocks of ``BLOCK`` tokens (one is vLLM's null block)."""
    mc = ModelConfig(model=model_dir(), skip_tokenizer_init=True, dtype="float32", max_model_len=2048, seed=0)
    sc = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                         max_model_len=2048, is_encoder_decoder=False, policy=policy)
    cc = CacheConfig(block_size=BLOCK, cache_dtype="auto", enable_prefix_caching=True)
    vc = VllmConfig(model_config=mc, scheduler_config=sc, cache_config=cc)
    cc.num_gpu_blocks = num_blocks
    kv = KVCacheConfig(
        num_blocks=num_blocks,
        kv_cache_tensors=[],
        kv_cache_groups=[KVCacheGroupSpec(["layer0"], FullAttentionSpec(
            block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32))],
    )
    return Scheduler(vllm_config=vc, kv_cache_config=kv, structured_output_manager=StructuredOutputManager(vc),
                     block_size=BLOCK, log_stats=True)


_hasher = None


def make_request(request_id: str, tokens: list[int], extra_args: dict | None = None, max_tokens: int = 4) -> Request:
    global _hasher
    if _hasher is None:
        fn = get_hash_fn_by_name("sha256")
        init_none_hash(fn)
        _hasher = get_request_block_hasher(BLOCK, fn)
    params = SamplingParams(max_tokens=max_tokens, extra_args=extra_args)
    return Request(request_id, tokens, params, None, block_hasher=_hasher)


def abort(sched: Scheduler, ids) -> None:
    sched.finish_requests(ids, RequestStatus.FINISHED_ABORTED)
