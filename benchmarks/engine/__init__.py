"""Live-engine benchmarks: the same workloads against a running vLLM, plugin off / on /
peer (``python -m benchmarks.engine``), interleaved server A/B (``server_ab``), the
token-exact simulation of its arms (``token_sim``) and GPU prefill timing
(``prefill_gpu``)."""
