"""Shared helpers for the SGLang adapter tests (real SGLang modules on CPU).

- ``require_sglang()`` skips the calling module unless SGLang imports; when the real
  ``torchvision`` cannot be imported (PyPI's build breaks beside the CPU torch) it first
  installs an import-time stand-in, since SGLang imports torchvision unconditionally
  although no text-model path uses it. Test-only: nothing in ``hooks/`` does this.
- builders for real caches with real CPU memory pools, real ``Req`` objects, a tiny
  local model directory (config + a character-level tokenizer with a chat template).
Run with ``.venv-sglang`` (``scripts/setup_sglang_env.sh``).
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import string
import sys
import types
from array import array

import pytest

SITE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------- torchvision
class _Placeholder:
    """Any torchvision object referenced at import time (transforms, enums, ...)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _Placeholder()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()

    def __mro_entries__(self, bases):  # used as a base class in a few modules
        return (object,)


class _StandinModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder()


class _StandinFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision" or fullname.startswith("torchvision."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        mod = _StandinModule(spec.name)
        mod.__path__ = []
        mod.__version__ = "0.0.0+cp-engine-test-standin"
        return mod

    def exec_module(self, module):
        pass


def install_torchvision_standin() -> bool:
    """Install the stand-in only when the real torchvision cannot be imported."""
    if any(isinstance(f, _StandinFinder) for f in sys.meta_path):
        return True
    try:
        import torchvision  # noqa: F401

        return False
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    sys.meta_path.insert(0, _StandinFinder())
    return True


class _KernelPlaceholder:
    def __init__(self, name):
        self.name = name

    def __call__(self, *args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{self.name} (test stand-in: no CPU kernel build)")


class _KernelStandinModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _KernelPlaceholder(name)


def install_sgl_kernel_standin() -> bool:
    """The PyPI sglang wheel has no CPU ``sgl_kernel``; SGLang's CPU engine imports a few
    names from it at import time but the tiny Llama path (torch_native attention, pytorch
    sampling) never calls them. Installed only when the real module is missing."""
    try:
        import sgl_kernel  # noqa: F401

        return False
    except Exception:
        sys.modules["sgl_kernel"] = _KernelStandinModule("sgl_kernel")
        return True


# Source line for subprocess tests: same stand-in, same condition.
STANDIN_PRELUDE = (
    f"import sys; sys.path.insert(0, {SITE!r}); import sglang_support; "
    "sglang_support.install_torchvision_standin()"
)


def require_sglang():
    install_torchvision_standin()
    return pytest.importorskip("sglang.srt.mem_cache.radix_cache", reason="SGLang not installed (.venv-sglang)")


# --------------------------------------------------------------------- tiny model
CHARS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
SPECIALS = ["[UNK]", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(path: str, weights: bool = False) -> str:
    """A Llama config plus a character-level tokenizer (one token per character);
    ``weights=True`` also saves random weights (a live server needs them; seconds)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(path, exist_ok=True)
    vocab = {w: i for i, w in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", additional_special_tokens=SPECIALS[3:])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_hidden_layers": 1, "vocab_size": len(vocab), "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "torch_dtype": "float32",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    if weights:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k != "architectures"})).save_pretrained(path)
    return path


# --------------------------------------------------------------------- caches
def build_cache(kind: str, page_size: int = 1, kv_size: int = 4096, events: bool = False):
    """A real cache with real CPU pools: kind is "radix", "unified-python" or "unified-rust".

    Returns ``(cache, allocator)``. ``events`` is what the *user* configured; the plugin
    may switch the recorder on by itself.
    """
    import torch
    from sglang.srt.mem_cache.allocator import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.cache_init_params import CacheInitParams
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.mem_cache.radix_cache import RadixCache
    from sglang.srt.mem_cache.unified_radix_cache import UnifiedRadixCache
    from sglang.srt.mem_cache.unified_cache.components.base import ComponentType

    r2t = ReqToTokenPool(size=16, max_context_len=kv_size, device="cpu", enable_memory_saver=False)
    kv = MHATokenToKVPool(size=kv_size, page_size=page_size, dtype=torch.float16, head_num=1,
                          head_dim=4, layer_num=1, device="cpu", enable_memory_saver=False)
    if page_size == 1:
        alloc = TokenToKVPoolAllocator(size=kv_size, dtype=torch.float16, device="cpu",
                                       kvcache=kv, need_sort=False)
    else:
        from sglang.srt.mem_cache.allocator import PagedTokenToKVPoolAllocator

        alloc = PagedTokenToKVPoolAllocator(size=kv_size, page_size=page_size, dtype=torch.float16,
                                            device="cpu", kvcache=kv, need_sort=False)
    kw = dict(disable=False, req_to_token_pool=r2t, token_to_kv_pool_allocator=alloc,
              page_size=page_size, enable_kv_cache_events=events)
    if kind == "radix":
        return RadixCache(CacheInitParams(**kw)), alloc
    kw["tree_components"] = (ComponentType.FULL,)
    kw["tree_core_backend"] = kind.split("-", 1)[1]
    return UnifiedRadixCache(CacheInitParams(**kw)), alloc


def insert(cache, alloc, token_ids) -> None:
    """Store ``token_ids`` (whole pages) in ``cache`` as a finished prefill would."""
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    page = cache.page_size
    n = (len(token_ids) // page) * page
    key = RadixKey(array("q", token_ids[:n]))
    value = alloc.alloc(n)
    assert value is not None, "KV pool exhausted"
    result = cache.insert(InsertParams(key=key, value=value))
    if result.prefix_len:  # the shared prefix was already stored: free our duplicate slots
        alloc.free(value[: result.prefix_len])


def match_len(cache, token_ids) -> int:
    from sglang.srt.mem_cache.base_prefix_cache import MatchPrefixParams
    from sglang.srt.mem_cache.radix_cache import RadixKey

    return cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", token_ids)))).device_prefix_len


def evict(cache, num_tokens: int) -> int:
    from sglang.srt.mem_cache.base_prefix_cache import EvictParams

    return cache.evict(EvictParams(num_tokens=num_tokens)).num_tokens_evicted


# --------------------------------------------------------------------- requests
@pytest.fixture(scope="module")
def scheduler_ctx(tmp_path_factory):
    """Publish scheduler-role server args for a tiny local model (real ``Req`` needs it)."""
    from sglang.srt.runtime_context import publish
    from sglang.srt.server_args import ServerArgs, set_global_server_args_for_scheduler

    model = build_tiny_model(str(tmp_path_factory.mktemp("model")))
    args = ServerArgs(model_path=model, device="cpu")
    set_global_server_args_for_scheduler(args)
    publish(args, role="scheduler")
    return args



def make_req(rid: str, token_ids, custom_params=None, arrival: float | None = None, priority=None):
    """A real scheduler ``Req`` (needs ``publish(ServerArgs(...), role="scheduler")`` first)."""
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.sampling.sampling_params import SamplingParams

    req = Req(rid, "", array("q", token_ids),
              SamplingParams(max_new_tokens=4, custom_params=custom_params), priority=priority)
    req.time_stats.set_wait_queue_entry_time(arrival)
    return req


def block_tokens(prep, token_of) -> list[int]:
    """Token ids laid out exactly as ``build_xargs`` estimates: one run per rendered block,
    one separator token between neighbours (``token_of(block_id)`` picks the run's token)."""
    out: list[int] = []
    for i, (bid, n) in enumerate(zip(prep.block_ids, prep.token_lengths)):
        if i:
            out.append(3)
        out.extend([token_of(bid)] * int(n))
    return out
