"""Reliability drivers shared by the live tests (short runs) and
``benchmarks/reliability`` (long runs with recorded results): server settings, fuzz
payloads, the live fuzzer, the eviction storm and the soak."""
