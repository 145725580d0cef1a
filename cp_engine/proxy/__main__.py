"""``python -m cp_engine.proxy --upstream URL ...`` (same options as ``cp-engine proxy``)."""
from .cli import proxy_main

raise SystemExit(proxy_main())
