"""Reliability tooling: fault injection, fuzzing, eviction storm and soak (issue 7).

Shared by ``tests/live/test_reliability_*.py`` (short runs) and the scripts in this folder
(long runs, see ``docs/reliability.md``)."""
