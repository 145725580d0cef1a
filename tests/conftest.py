"""Suite-wide test settings.

Hypothesis' per-example deadline is off: CI runs on two shared cores, where a slow
example says nothing about correctness (speed lives in benchmarks, not tests).
"""
try:
    from hypothesis import settings
except ImportError:  # the SGLang venv runs no property tests
    settings = None

if settings is not None:
    settings.register_profile("cp_engine", deadline=None)
    settings.load_profile("cp_engine")
