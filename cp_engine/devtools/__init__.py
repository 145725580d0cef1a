"""Developer tools (tests, demos, benchmarks); nothing in the core imports them."""
