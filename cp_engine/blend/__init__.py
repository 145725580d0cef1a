"""Compositional KV reuse, engine-free core (see docs/blend.md).

Modules, one job each: ``keys`` (what a stored block's KV depends on), ``rope``
(moving K between positions), ``store`` (bounded host-memory block store), ``selection``
(which claimed tokens to recompute), ``spans`` (where each block's tokens sit in a
prompt). Nothing here imports an engine; torch is imported lazily where used.
"""
