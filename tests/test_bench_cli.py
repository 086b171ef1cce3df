"""The benchmark harness: output files and their schema, time to target, config files, and option
validation before any training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from grace_lightning import available_strategies
from grace_lightning.bench.cli import EVAL_COLUMNS, RUN_COLUMNS, SUMMARY_COLUMNS, bench_main, main
from grace_lightning.bench.plots import PLOT_FILES
from grace_lightning.bench.report import summarize, time_to_target
from grace_lightning.bench.tasks import TaskUnavailable, get_task

EPOCHS = 3
SEEDS = (0, 1)
FRACTIONS = (0.2, 0.5)
OPTIONAL = {"time_to_target_seconds"}  # empty when a run never reached the target
TEXT = {"task", "strategy", "metric"}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("bench") / "out"  # does not exist yet: the CLI creates it
    code = main(
        ["bench", "--task", "mixture", "--quick", "--epochs", str(EPOCHS), "--strategies", ",".join(available_strategies()),
         "--fractions", ",".join(map(str, FRACTIONS)), "--seeds", ",".join(map(str, SEEDS)), "--out", str(out)]
    )
    return out, code


def expected_keys() -> set[tuple[str, float, int]]:
    # `full` runs once at fraction 1.0 per seed; every other strategy at each fraction.
    keys = {("full", 1.0, s) for s in SEEDS}
    return keys | {(name, f, s) for name in available_strategies() if name != "full" for f in FRACTIONS for s in SEEDS}


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_bench_exits_zero(tiny_run):
    assert tiny_run[1] == 0


def test_runs_csv_has_every_strategy_fraction_and_seed(tiny_run):
    out, _ = tiny_run
    columns, rows = _read_csv(out / "runs.csv")
    assert columns == RUN_COLUMNS
    keys = [(r["strategy"], float(r["fraction"]), int(r["seed"])) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys()
    for row in rows:
        for column in set(RUN_COLUMNS) - TEXT - OPTIONAL:
            assert math.isfinite(float(row[column])), (column, row)
        assert row["task"] == "mixture" and row["metric"] == "accuracy"
        assert 0.0 <= float(row["final_metric"]) <= float(row["best_metric"]) <= 1.0
        assert 0 < float(row["train_seconds"]) <= float(row["wall_seconds"])
        assert 0.0 <= float(row["selection_seconds"]) <= float(row["train_seconds"])
        assert int(row["epochs"]) == EPOCHS
        assert int(row["examples_seen"]) == EPOCHS * int(row["budget_per_epoch"])  # constant epoch length


def test_evals_csv_has_one_point_per_epoch_in_order(tiny_run):
    out, _ = tiny_run
    columns, points = _read_csv(out / "evals.csv")
    assert columns == EVAL_COLUMNS
    by_run: dict[tuple, list[dict]] = {}
    for p in points:
        by_run.setdefault((p["strategy"], float(p["fraction"]), int(p["seed"])), []).append(p)
    assert set(by_run) == expected_keys()
    for run in by_run.values():
        assert [int(p["epoch"]) for p in run] == list(range(1, EPOCHS + 1))
        for key in ("train_seconds", "wall_seconds", "selection_seconds", "examples_seen", "step"):
            values = [float(p[key]) for p in run]
            assert values == sorted(values), key  # cumulative quantities never go down


def test_runs_json_matches_the_csv(tiny_run):
    out, _ = tiny_run
    data = json.loads((out / "runs.json").read_text())
    assert {"config", "task", "environment", "runs", "summary"} <= set(data)
    assert data["task"]["name"] == "mixture" and data["config"]["seeds"] == list(SEEDS)
    runs = data["runs"]
    assert {(r["strategy"], r["fraction"], r["seed"]) for r in runs} == expected_keys() and len(runs) == len(expected_keys())
    _, csv_rows = _read_csv(out / "runs.csv")
    for run, row in zip(runs, csv_rows):
        assert set(RUN_COLUMNS) <= set(run)
        assert run["final_metric"] == pytest.approx(float(row["final_metric"]))
        assert len(run["evals"]) == EPOCHS and run["evals"][-1]["metric"] == run["final_metric"]
    summary = {(s["strategy"], s["fraction"]): s for s in data["summary"]}
    assert set(summary) == {(k[0], k[1]) for k in expected_keys()}
    assert all(s["seeds"] == len(SEEDS) and math.isfinite(s["final_std"]) for s in summary.values())
    columns, _ = _read_csv(out / "summary.csv")
    assert columns == SUMMARY_COLUMNS


def test_full_reference_sees_more_examples(tiny_run):
    out, _ = tiny_run
    runs = json.loads((out / "runs.json").read_text())["runs"]
    seen = {(r["strategy"], r["fraction"]): r["examples_seen"] for r in runs}
    assert seen[("full", 1.0)] > seen[("random", 0.5)] > seen[("random", 0.2)]


def test_plots_are_written_as_png_files(tiny_run):
    out, _ = tiny_run
    for name in PLOT_FILES:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def _run(strategy, fraction, seed, final, curve):
    evals = [{"metric": m, "train_seconds": float(i + 1)} for i, m in enumerate(curve)]
    return {"strategy": strategy, "fraction": fraction, "seed": seed, "final_metric": final, "best_metric": max(curve),
            "train_seconds": float(len(curve)), "wall_seconds": len(curve) + 0.5, "selection_seconds": 0.25,
            "examples_seen": 10, "evals": evals}


def test_time_to_target_is_the_first_evaluation_within_tolerance_of_full():
    task = get_task("mixture")  # tolerance 0.005, higher is better
    rows = [
        _run("full", 1.0, 0, 0.80, [0.70, 0.80]),
        _run("full", 1.0, 1, 0.90, [0.75, 0.90]),  # full mean 0.85 -> target 0.845
        _run("random", 0.3, 0, 0.85, [0.60, 0.846, 0.85]),  # reaches it at the 2nd evaluation
        _run("random", 0.3, 1, 0.80, [0.80, 0.80, 0.80]),  # never does
    ]
    summary = {s["strategy"]: s for s in summarize(rows, task)}
    assert summary["full"]["target"] == pytest.approx(0.845)
    assert [r["time_to_target_seconds"] for r in rows] == [None, 2.0, 2.0, None]
    assert summary["random"]["target_reached"] == 1 and summary["random"]["time_to_target_mean"] == 2.0
    assert summary["random"]["final_mean"] == pytest.approx(0.825)
    assert summary["random"]["final_std"] == pytest.approx(math.sqrt(2 * 0.025**2))


def test_time_to_target_for_a_metric_where_lower_is_better():
    evals = [{"metric": 5.0, "train_seconds": 1.0}, {"metric": 3.9, "train_seconds": 2.5}, {"metric": 3.0, "train_seconds": 4.0}]
    assert time_to_target(evals, 4.0, higher_is_better=False) == 2.5
    assert time_to_target(evals, 2.0, higher_is_better=False) is None
    assert time_to_target(evals, None, higher_is_better=False) is None


def test_a_config_file_describes_the_comparison_and_options_win(tmp_path, monkeypatch):
    import grace_lightning.bench.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_bench", lambda config: seen.append(config) or 0)
    config = tmp_path / "compare.json"
    config.write_text(json.dumps({"task": "mixture", "strategies": ["full", "random"], "fractions": [0.1, 0.3],
                                  "seeds": [3, 4], "epochs": 2, "out": str(tmp_path / "from-file")}))
    assert main(["bench", "--config", str(config), "--seeds", "7"]) == 0
    (resolved,) = seen
    assert resolved.task == "mixture" and resolved.strategies == ["full", "random"]
    assert resolved.fractions == [0.1, 0.3] and resolved.epochs == 2 and resolved.out == str(tmp_path / "from-file")
    assert resolved.seeds == [7]  # the command line wins over the file


@pytest.mark.parametrize(
    "args, option, detail",
    [
        (["--task", "nope"], "--task", "mixture"),
        (["--strategies", "full,nope"], "--strategies", "nope"),
        (["--fractions", "0.3,1.5"], "--fractions", "(0, 1]"),
        (["--fractions", "0"], "--fractions", "(0, 1]"),
        (["--seeds", " , "], "--seeds", "no seed"),
        (["--seeds", "1,x"], "--seeds", "'x'"),
        (["--epochs", "0"], "--epochs", "positive"),
        (["--out", "{file}/sub"], "--out", "cannot write"),
        (["--config", "{file}"], "--config", "not valid JSON"),
        (["--config", "{json:{\"epoch\": 3}}"], "--config", "'epoch'"),
        (["--config", "{json:{\"strategy_kwargs\": {\"grace\": {\"nope\": 1}}}}"], "--config", "strategy_kwargs.grace"),
    ],
    ids=["unknown-task", "unknown-strategy", "fraction-above-1", "fraction-0", "empty-seeds", "bad-seed", "epochs-0",
         "unwritable-out", "config-not-json", "config-unknown-key", "config-bad-strategy-kwargs"],
)
def test_bad_option_exits_2_naming_it_before_training(args, option, detail, tmp_path, capsys, monkeypatch):
    import grace_lightning.bench.cli as cli

    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("trained before validating the options"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")

    def expand(arg: str) -> str:
        if arg.startswith("{json:"):
            path = tmp_path / "config.json"
            path.write_text(arg[len("{json:"):-1])
            return str(path)
        return arg.format(file=blocker)

    args = [expand(a) for a in args]
    if "--task" not in args:
        args += ["--task", "mixture"]
    if option != "--out":
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--quick", *args])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert option in err and detail in err, err
    if option == "--strategies":
        assert ", ".join(available_strategies()) in err  # lists what is available


def test_a_task_whose_data_are_missing_fails_with_the_fix(tmp_path, capsys, monkeypatch):
    from grace_lightning.bench.tasks.mixture import MixtureTask

    def missing(self):
        raise TaskUnavailable("install it with `apt-get install dataset-mixture`")

    monkeypatch.setattr(MixtureTask, "check_available", missing)
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--task", "mixture", "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "--task" in err and "apt-get install dataset-mixture" in err


def test_module_entry_point_validates_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        bench_main(["--task", "mixture", "--fractions", "0", "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    assert "--fractions" in capsys.readouterr().err


def test_console_script_needs_the_bench_command(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


@pytest.mark.slow
def test_quick_preset_through_the_console_script_on_the_default_task(tmp_path):
    """What the README's demo runs: the installed `grace-lightning` command, `--quick`, default task and strategies."""
    import shutil
    import subprocess

    from grace_lightning.bench.config import DEFAULT_STRATEGIES, DEFAULT_TASK

    exe = shutil.which("grace-lightning")
    assert exe, "the console script is not installed (pip install -e .)"
    out = tmp_path / "quick"
    done = subprocess.run([exe, "bench", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    header = next(line for line in done.stdout.splitlines() if line.startswith("strategy"))
    assert "final accuracy" in header and "selection s" in header and "time to" in header
    _, rows = _read_csv(out / "runs.csv")
    assert {r["task"] for r in rows} == {DEFAULT_TASK}
    assert [r["strategy"] for r in rows] == DEFAULT_STRATEGIES  # one seed, one fraction (0.3; full at 1.0)
    assert all(float(r["fraction"]) == (1.0 if r["strategy"] == "full" else 0.3) and r["seed"] == "0" for r in rows)
    for name in ("evals.csv", "summary.csv", "runs.json", *PLOT_FILES):
        assert (out / name).stat().st_size > 0, name
