"""The property-test settings every test folder loads (``tests/``, ``benchmarks/tests/``).

The per-example deadline is off: CI runs on two shared cores, where a slow example
says nothing about correctness (speed lives in benchmarks, not tests).
"""


def load() -> None:
    """Register and load the ``cp_engine`` hypothesis profile; a no-op without
    hypothesis (the SGLang venv runs no property tests)."""
    try:
        from hypothesis import settings
    except ImportError:
        return
    settings.register_profile("cp_engine", deadline=None)
    settings.load_profile("cp_engine")
