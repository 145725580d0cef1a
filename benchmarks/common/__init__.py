"""What every benchmark family shares: the results writer, workload builders, the
live-server client."""
