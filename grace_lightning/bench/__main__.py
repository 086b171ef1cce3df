"""``python -m grace_lightning.bench [--quick] [--strategies ...] ...``: the ``bench`` command."""

import sys

from grace_lightning.bench.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main())
