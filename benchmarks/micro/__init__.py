"""Micro-benchmarks of one component each: online reorder latency (``online``), the
overlap kernels (``kernels``), the cache-aware waiting order (``queue_order``), the
plugin's CPU time per request in the API server (``overhead``)."""
