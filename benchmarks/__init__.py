"""Benchmarks and workload builders (not shipped in the cp-engine wheel)."""
