"""Reliability runs from the command line (fuzz_live, storm, soak, the interleaved
plugin on/off A/B ``ab``) and their report;
the drivers live in ``cp_engine.devtools.reliability`` (see ``docs/reliability.md``)."""
