"""Scale-out helpers that need no engine: routing keys a router and every replica
compute alike (``key``) and replica routing policies (``routing``).
See docs/scale-out.md."""
