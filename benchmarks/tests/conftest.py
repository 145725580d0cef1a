"""Tests of the benchmark code itself (workloads, baselines, scoring, statistics, the
engine benchmark's assembly); no server, no engine. CI runs them with the main suite."""
from cp_engine.devtools import hypothesis_profile

hypothesis_profile.load()
