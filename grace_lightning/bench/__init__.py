"""Benchmark harness: ``grace-lightning bench ...`` or ``python -m grace_lightning.bench ...``.

See :mod:`grace_lightning.bench.cli` for the options and :mod:`grace_lightning.bench.tasks` for the task.
"""

from grace_lightning.bench.cli import bench_main, main

__all__ = ["bench_main", "main"]
