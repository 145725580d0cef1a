"""ContextPilot, the peer, run in its own venv (``setup_peer.sh``): ``client`` calls it
from the benchmarks; the other scripts run inside that venv."""
