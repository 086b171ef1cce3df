"""The examples run, and the coreset one differs from the plain one in at most three lines."""

from __future__ import annotations

import difflib
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PLAIN = EXAMPLES / "train_plain.py"
CORESET = EXAMPLES / "train_coreset.py"
MAX_CHANGED_LINES = 3


def changed_lines(a: list[str], b: list[str]) -> int:
    """Lines changed from ``a`` to ``b``: per hunk of a unified diff, max(added, removed)."""
    total = 0
    added = removed = 0
    for line in difflib.unified_diff(a, b, lineterm="", n=0):
        if line.startswith(("---", "+++")):
            continue  # file headers
        if line.startswith("@@"):
            total += max(added, removed)
            added = removed = 0
        elif line.startswith("+"):
            added += 1
        elif line.startswith("-"):
            removed += 1
    return total + max(added, removed)


def test_changed_lines_counts_a_replacement_once():
    assert changed_lines(["a", "b", "c"], ["a", "B", "c"]) == 1
    assert changed_lines(["a", "c"], ["a", "b", "c"]) == 1
    assert changed_lines(["a", "b", "c", "d"], ["A", "b", "c", "D", "E"]) == 3
    assert changed_lines(["a"], ["a"]) == 0


def test_coreset_example_differs_from_plain_in_at_most_three_lines():
    plain = PLAIN.read_text().splitlines()
    coreset = CORESET.read_text().splitlines()
    n = changed_lines(plain, coreset)
    diff = "\n".join(difflib.unified_diff(plain, coreset, "train_plain.py", "train_coreset.py", lineterm="", n=0))
    assert 0 < n <= MAX_CHANGED_LINES, f"{n} changed lines:\n{diff}"


@pytest.mark.parametrize("script", [PLAIN, CORESET], ids=lambda p: p.name)
def test_example_runs(script: Path, tmp_path: Path):
    # Run from a scratch directory so that nothing the script writes lands in the repository.
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, f"{script.name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert "validation accuracy:" in proc.stdout
