"""Scale-out simulation: replicas behind a router (see simulate.py, docs/scale-out.md)."""
