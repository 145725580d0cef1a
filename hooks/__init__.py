"""Engine adapters for cp_engine (shipped as cp_engine.hooks)."""
