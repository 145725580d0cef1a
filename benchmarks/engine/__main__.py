import sys

from benchmarks.engine.cli import main

sys.exit(main())
