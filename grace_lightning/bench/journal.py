"""A comparison's finished runs, appended to ``<out>/runs.jsonl`` as each one ends, so that a crash or a kill
loses at most the run in progress: started again with the same options, the bench skips what is done.

Each line is one run's row (the summary columns plus its evaluation points) and the fingerprint of the
configuration that produced it. Lines of another configuration (other epochs, tasks options, callback settings...)
are never mixed into a comparison: they are dropped when the journal is opened, and the bench says so.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict

from grace_lightning.bench.config import BenchConfig

__all__ = ["Journal", "fingerprint"]

FILE = "runs.jsonl"


def fingerprint(config: BenchConfig) -> str:
    """What makes two runs comparable: every option but the output folder and the lists of runs to do."""
    options = asdict(config)
    for key in ("out", "strategies", "fractions", "seeds"):
        options.pop(key)
    if options["overlap"] == "auto":
        # "auto" overlaps only on an accelerator: on the CPU it is what every run did before the option existed,
        # so journals written then stay valid.
        options.pop("overlap")
    if options["precision"] == "32-true":
        options.pop("precision")  # likewise: the precision every run had before the option existed
    if options["scoring_batch_size"] is None:
        options.pop("scoring_batch_size")  # likewise: the callback's default, what every run had before the option
    if options["capture"]:
        options.pop("capture")  # likewise
    if options["evals_per_epoch"] == 1:
        options.pop("evals_per_epoch")  # likewise
    return hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Journal:
    """The finished runs of one comparison, keyed by ``(seed, strategy, fraction)``.

    Example:
        >>> import tempfile
        >>> from grace_lightning.bench.config import BenchConfig
        >>> config = BenchConfig("mixture", ["random"], [0.3], [0], 2, tempfile.mkdtemp(), "quick", None, None)
        >>> journal = Journal(config)
        >>> journal.add({"seed": 0, "strategy": "random", "fraction": 0.3, "final_metric": 0.9})
        >>> Journal(config).done(0, "random", 0.3)
        True
    """

    def __init__(self, config: BenchConfig) -> None:
        self.path = os.path.join(config.out, FILE)
        self._fingerprint = fingerprint(config)
        self.rows: dict[tuple[int, str, float], dict] = {}
        self.dropped = 0  # lines of another configuration or unreadable (a line cut short by a kill)
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        entry = json.loads(line)
                    except ValueError:
                        self.dropped += 1
                        continue
                    if entry.get("fingerprint") != self._fingerprint:
                        self.dropped += 1
                        continue
                    row = entry["row"]
                    self.rows[(int(row["seed"]), row["strategy"], float(row["fraction"]))] = row
            if self.dropped:  # rewrite with only this configuration's runs
                with open(self.path, "w") as f:
                    for row in self.rows.values():
                        f.write(self._line(row))

    def _line(self, row: dict) -> str:
        return json.dumps({"fingerprint": self._fingerprint, "row": row}) + "\n"

    def done(self, seed: int, strategy: str, fraction: float) -> bool:
        return (int(seed), strategy, float(fraction)) in self.rows

    def add(self, row: dict) -> None:
        """Record a finished run (flushed and synced: it survives a kill right after)."""
        self.rows[(int(row["seed"]), row["strategy"], float(row["fraction"]))] = row
        with open(self.path, "a") as f:
            f.write(self._line(row))
            f.flush()
            os.fsync(f.fileno())
