"""GRACE's ablation table: each variant of benchmarks/grace_ablation.toml beside full data and random.

    python benchmarks/grace_ablation_table.py      # after: grace-lightning bench --suite benchmarks/grace_ablation.toml

Full data and random come from the suite's own journals (benchmarks/suite.toml: fashion-mnist-noisy and
fashion-mnist-long) at the ablation's seeds, so every variant is paired by seed with the same references, and
"vs random @ equal s" compares it with random's frontier (the best any random run of the seed had reached in the
same training seconds). Writes benchmarks/results/grace_ablation/ablation.md.
"""

from __future__ import annotations

import json
from pathlib import Path

from grace_lightning.bench.report import format_markdown, summarize
from grace_lightning.bench.tasks import get_task

ROOT = Path(__file__).resolve().parent / "results"
# ablation prefix -> (the suite comparison holding full and random, the task)
REGIMES = {"noisy": ("fashion-mnist-noisy", "fashion-mnist-noisy"), "long": ("fashion-mnist-long", "fashion-mnist")}


def _rows(journal: Path) -> list[dict]:
    with open(journal) as f:
        return [json.loads(line)["row"] for line in f if line.strip()]


def main() -> None:
    out = ["# GRACE ablation (budget 0.3)", ""]
    for prefix, (suite_name, task_name) in REGIMES.items():
        variants = sorted(p for p in (ROOT / "grace_ablation").glob(f"{prefix}-*/runs.jsonl"))
        rows = [r for p in variants for r in _rows(p)]
        for path, name in ((p, p.parent.name.removeprefix(f"{prefix}-")) for p in variants):
            for row in _rows(path):
                rows.append({**row, "strategy": f"grace {name}"})
        rows = [r for r in rows if r["strategy"] != "grace"]  # each variant appears once, under its name
        seeds = {r["seed"] for r in rows}
        references = [
            r for r in _rows(ROOT / "suite" / suite_name / "runs.jsonl")
            if r["strategy"] in ("full", "random") and r["seed"] in seeds
        ]
        summary = summarize(references + rows, get_task(task_name))
        out += [f"## {suite_name} (seeds {sorted(seeds)})", "", format_markdown(summary, get_task(task_name)), ""]
    path = ROOT / "grace_ablation" / "ablation.md"
    path.write_text("\n".join(out))
    print("\n".join(out))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
