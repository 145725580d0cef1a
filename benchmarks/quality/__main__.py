import sys

from benchmarks.quality.bench import main

sys.exit(main())
