"""Planner benchmarks: hit ratio and planning cost against ContextPilot on a simulated
prefix cache (``sim``), planning time against N (``scaling``), the best plan any
prefix planner can reach (``optimality``), partner search (``partners``)."""
