"""Answer quality with and without cp_engine on a real model (``python -m
benchmarks.quality``) and the small real models it serves (``models``)."""
