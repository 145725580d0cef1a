"""Benchmarks by family (planner, engine, quality, micro, reliability, blend) and what
they share (common: the results writer, workloads, the live-server client); not shipped
in the cp-engine wheel."""
