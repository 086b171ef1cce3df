"""An ablation's table: each variant of an ablation suite beside the suite's full data and random runs.

    python benchmarks/ablation_table.py grace_ablation   # after: grace-lightning bench --suite benchmarks/grace_ablation.toml
    python benchmarks/ablation_table.py cost_knobs       # after: grace-lightning bench --suite benchmarks/cost_knobs.toml

An ablation suite writes one journal per comparison under ``benchmarks/results/<name>/``, each comparison named
``<regime>-<variant>`` (``noisy-sample``, ``long-defaults``); its rows appear as ``<strategy> <variant>``. Full
data and random come from the suite's own journals (benchmarks/suite.toml: the comparison each prefix names in
``REGIMES``) at the ablation's seeds, so every variant is paired by seed with the same references, and
"vs random @ equal s" compares it with random's frontier (the best any random run of the seed had reached in the
same training seconds). Where the ablation ran random itself, in a comparison named ``<regime>-random`` (as
``benchmarks/grace_finetune.toml`` does, so that random's frontier is of the same sitting), random comes from
there instead and that comparison is not a variant; a regime with no suite comparison (``None``: a schedule the
suite does not run) has no full-data row. Writes ``benchmarks/results/<name>/ablation.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from grace_lightning.bench.report import format_markdown, summarize
from grace_lightning.bench.tasks import get_task

ROOT = Path(__file__).resolve().parent / "results"
# ablation prefix -> (the suite comparison holding full and random, or None, the task)
REGIMES = {
    "noisy": ("fashion-mnist-noisy", "fashion-mnist-noisy"),
    "long": ("fashion-mnist-long", "fashion-mnist"),
    "tweets-noisy": ("tweets-noisy", "tweets-noisy"),
    "tweets-long": ("tweets-long", "tweets"),
    "lm-minilm": ("lm-mixture-minilm", "lm-mixture"),
    "lm-mixture": ("lm-mixture", "lm-mixture"),
    "finetune": ("minilm-tweets", "minilm-tweets"),
    "longer": (None, "minilm-tweets"),  # fine-tuning over 6 epochs (grace_finetune.toml): the suite runs 3
}


def _rows(journal: Path) -> list[dict]:
    with open(journal) as f:
        return [json.loads(line)["row"] for line in f if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the ablation's folder under benchmarks/results (its suite file's `out`)")
    name = parser.parse_args().name
    out = [f"# {name}", ""]
    for prefix, (suite_name, task_name) in REGIMES.items():
        own_random = ROOT / name / f"{prefix}-random" / "runs.jsonl"
        variants = sorted(p for p in (ROOT / name).glob(f"{prefix}-*/runs.jsonl") if p != own_random)
        if not variants:
            continue
        rows = [
            {**row, "strategy": f"{row['strategy']} {path.parent.name.removeprefix(f'{prefix}-')}"}
            for path in variants
            for row in _rows(path)
        ]
        seeds = {r["seed"] for r in rows}
        own = _rows(own_random) if own_random.exists() else None  # random of the ablation's own sitting
        kept = ("full", "random") if own is None else ("full",)
        suite_rows = [] if suite_name is None else _rows(ROOT / "suite" / suite_name / "runs.jsonl")
        references = [r for r in suite_rows if r["strategy"] in kept and r["seed"] in seeds]
        if own is not None:
            references += [r for r in own if r["seed"] in seeds]
        summary = summarize(references + rows, get_task(task_name))
        title = suite_name or f"{task_name}, {prefix}"
        out += [f"## {title} (seeds {sorted(seeds)})", "", format_markdown(summary, get_task(task_name)), ""]
    path = ROOT / name / "ablation.md"
    path.write_text("\n".join(out))
    print("\n".join(out))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
