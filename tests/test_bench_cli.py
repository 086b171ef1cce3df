"""The benchmark harness: output files and their schema, time to target, config files, and option
validation before any training."""

from __future__ import annotations

import csv
import json
import math
import subprocess
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
# Empty when a run never reached the target, has no paired reference, or its task marks no example.
OPTIONAL = {
    "time_to_target_seconds", "full_at_equal_seconds", "random_at_equal_seconds", "gain_vs_random",
    "examples_to_random_final", "marked_share",
}
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
    from importlib import metadata

    # The versions that move the numbers are recorded, the LM tasks' transformers among them.
    assert data["environment"]["transformers"] == metadata.version("transformers")
    assert data["environment"]["numpy"] == metadata.version("numpy")
    runs = data["runs"]
    assert {(r["strategy"], r["fraction"], r["seed"]) for r in runs} == expected_keys() and len(runs) == len(expected_keys())
    assert len({r["sitting"] for r in runs}) == 1  # one invocation, one sitting: no gain is marked †
    assert not any(s["gain_other_sitting"] for s in data["summary"])
    _, csv_rows = _read_csv(out / "runs.csv")
    for run, row in zip(runs, csv_rows):
        assert set(RUN_COLUMNS) <= set(run)
        assert run["final_metric"] == pytest.approx(float(row["final_metric"]))
        assert len(run["evals"]) == EPOCHS and run["evals"][-1]["metric"] == run["final_metric"]
        phases = run["phase_seconds"]
        assert all(v >= 0.0 for v in phases.values())
        if run["strategy"] == "grace":  # it scores the pool and builds its graph: both phases are there
            assert phases["scoring_seconds"] > 0.0 and phases["graph_seconds"] > 0.0
            assert phases["strategy_seconds"] <= run["selection_seconds"]
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
    evals = [{"metric": m, "train_seconds": float(i + 1), "examples_seen": 10 * (i + 1)} for i, m in enumerate(curve)]
    return {"strategy": strategy, "fraction": fraction, "seed": seed, "final_metric": final, "best_metric": max(curve),
            "train_seconds": float(len(curve)), "wall_seconds": len(curve) + 0.5, "selection_seconds": 0.25,
            "examples_seen": 10, "evals": evals}


def test_a_gain_read_against_random_runs_of_another_sitting_is_marked():
    """Equal-wall-clock gains compare two runs' seconds: a † marks those paired with random runs of another sitting
    (another bench invocation; for rows from before sittings were recorded, another commit)."""
    from grace_lightning.bench.report import format_table

    task = get_task("mixture")
    rows = [_run("random", 0.3, 0, 0.70, [0.60, 0.70]), _run("grace", 0.3, 0, 0.75, [0.55, 0.62, 0.75])]
    grace_line = lambda summary: next(line for line in format_table(summary, task).splitlines() if line.startswith("grace"))  # noqa: E731
    for row in rows:
        row["sitting"] = "2026-12-04T08:00:00Z"
    summary = summarize(rows, task)
    assert summary[1]["gain_other_sitting"] is False and "†" not in format_table(summary, task)
    rows[1]["sitting"] = "2026-12-05T08:00:00Z"
    summary = summarize(rows, task)
    assert summary[1]["gain_other_sitting"] is True and grace_line(summary).endswith("†")
    assert summary[0]["gain_other_sitting"] is False  # random's own row has no gain to mark
    for row in rows:  # journals from before the sitting was recorded: the commit stands in for it
        del row["sitting"]
        row["commit"] = "4eec9ee"
    assert summarize(rows, task)[1]["gain_other_sitting"] is False
    rows[0]["commit"] = "62c8dfe"
    assert summarize(rows, task)[1]["gain_other_sitting"] is True


def test_a_gain_read_past_random_s_longest_run_is_marked_as_an_upper_bound():
    """Past random's longest run its frontier is that run's final metric: a strategy that trains longer than every
    random run of its seed is compared with what a larger random budget might have beaten, and its gain is marked."""
    from grace_lightning.bench.report import format_table

    task = get_task("mixture")
    rows = [_run("random", 0.3, 0, 0.70, [0.60, 0.70]), _run("grace", 0.3, 0, 0.75, [0.55, 0.62, 0.75])]
    for row in rows:
        row["sitting"] = "2026-12-05T08:00:00Z"
    summary = summarize(rows, task)
    assert summary[1]["gain_past_random"] is True and summary[0]["gain_past_random"] is False
    grace_line = next(line for line in format_table(summary, task).splitlines() if line.startswith("grace"))
    assert grace_line.endswith(" 0.0500 ± n/a ^")  # 0.75 against random's final 0.70: the bound, marked
    # A larger random budget that outlasts GRACE brackets its seconds: the gain is read on that run's curve.
    rows.append(_run("random", 0.5, 0, 0.80, [0.60, 0.72, 0.78, 0.80]) | {"sitting": "2026-12-05T08:00:00Z"})
    summary = summarize(rows, task)
    grace = next(s for s in summary if s["strategy"] == "grace")
    assert grace["gain_past_random"] is False and grace["gain_vs_random_mean"] == pytest.approx(0.75 - 0.78)
    assert "^" not in format_table(summary, task)


def test_time_to_target_is_the_first_evaluation_within_tolerance_of_full_data_best():
    task = get_task("mixture")  # tolerance 0.005, higher is better
    rows = [
        _run("full", 1.0, 0, 0.78, [0.80, 0.78]),  # overfits: its best (0.80), not its last, sets the target
        _run("full", 1.0, 1, 0.90, [0.75, 0.90]),  # mean best 0.85 -> target 0.845
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


def test_equal_wall_clock_gain_is_paired_by_seed_and_signed_for_the_metric():
    task = get_task("mixture")  # higher is better
    rows = [
        _run("full", 1.0, 0, 0.90, [0.70, 0.80, 0.85, 0.90]),
        _run("random", 0.3, 0, 0.70, [0.60, 0.70]),  # evaluations at 1 s and 2 s
        _run("random", 0.3, 1, 0.50, [0.40, 0.50]),
        _run("grace", 0.3, 0, 0.75, [0.55, 0.62, 0.75]),  # ends at 3 s: random 0.3 had 0.70 by then (its last point)
        _run("grace", 0.3, 1, 0.52, [0.52]),  # ends at 1 s: random had 0.40 by then
    ]
    summarize(rows, task)
    grace0, grace1 = rows[3], rows[4]
    assert grace0["random_at_equal_seconds"] == 0.70 and grace0["gain_vs_random"] == pytest.approx(0.05)
    # With a larger random budget in the same time, that is what grace meets: random's frontier over budgets.
    rows.append(_run("random", 0.5, 0, 0.80, [0.65, 0.72, 0.80]))
    summarize(rows, task)
    assert grace0["random_at_equal_seconds"] == 0.80 and grace0["gain_vs_random"] == pytest.approx(-0.05)
    assert grace1["random_at_equal_seconds"] == 0.40  # seed 1 has no 0.5 run
    assert grace0["full_at_equal_seconds"] == 0.85  # full's last evaluation at or before 3 s
    assert grace1["random_at_equal_seconds"] == 0.40 and grace1["gain_vs_random"] == pytest.approx(0.12)
    assert grace1["full_at_equal_seconds"] is None  # seed 1 has no full run
    # examples seen when grace first matched random's final metric (0.70: the third evaluation; 0.50: the first)
    assert grace0["examples_to_random_final"] == 30 and grace1["examples_to_random_final"] == 10

    from grace_lightning.bench.report import metric_at, within_noise

    lower = [{"metric": 9.0, "train_seconds": 1.0}, {"metric": 7.0, "train_seconds": 2.0}]
    assert metric_at(lower, 0.5) is None and metric_at(lower, 1.5) == 9.0 and metric_at(lower, 5.0) == 7.0
    perplexity = type(task)()
    type(perplexity).higher_is_better = True  # restored below; checks the sign flip through summarize
    try:
        type(perplexity).higher_is_better = False
        rows = [_run("random", 0.3, 0, 7.0, [9.0, 7.0]), _run("gip", 0.3, 0, 6.0, [8.0, 6.0])]
        summarize(rows, perplexity)
        assert rows[1]["gain_vs_random"] == pytest.approx(1.0)  # lower perplexity is a positive gain
    finally:
        type(perplexity).higher_is_better = True
    assert within_noise([0.01, -0.01, 0.005]) is True
    assert within_noise([0.05, 0.051, 0.049]) is False  # consistent across seeds
    assert within_noise([0.05]) is None


def test_bench_options_reach_the_callback_the_schedule_and_the_task(tmp_path, monkeypatch):
    import grace_lightning.bench.cli as cli

    seen = []
    monkeypatch.setattr(cli, "run_bench", lambda config: seen.append(config) or 0)
    assert main(["bench", "--task", "fashion-mnist-noisy", "--preset", "long", "--task-option", "noise=0.2",
                 "--lr-schedule", "constant", "--refresh-every", "2", "--warmup-epochs", "1", "--max-selection-share",
                 "0.05", "--overlap", "on", "--precision", "bf16-mixed", "--out", str(tmp_path)]) == 0
    (config,) = seen
    assert config.overlap == "on" and config.precision == "bf16-mixed"
    assert config.preset == "long" and config.epochs == 20 and config.task_options == {"noise": "0.2"}
    assert (config.lr_schedule, config.refresh_every, config.warmup_epochs, config.max_selection_share) == ("constant", 2, 1, 0.05)
    assert main(["bench", "--task", "mixture", "--quick", "--out", str(tmp_path)]) == 0
    assert seen[1].max_selection_share == "default" and seen[1].lr_schedule == "cosine" and seen[1].overlap == "auto"
    assert seen[1].precision == "32-true"


@pytest.mark.parametrize(
    "args, option, detail",
    [
        (["--task", "fashion-mnist-noisy", "--task-option", "noise=1.5"], "--task-option", "noise"),
        (["--task-option", "noise=0.3"], "--task-option", "no option 'noise'"),
        (["--task-option", "noise"], "--task-option", "NAME=VALUE"),
        (["--preset", "huge"], "--preset", "long"),
        (["--lr-schedule", "linear"], "--lr-schedule", "cosine"),
        (["--refresh-every", "0"], "--refresh-every", ">= 1"),
        (["--warmup-epochs", "3", "--epochs", "3"], "--warmup-epochs", "no coreset epoch"),
        (["--max-selection-share", "1.5"], "--max-selection-share", "(0, 1)"),
        (["--only", "a"], "--only", "--suite"),
        (["--overlap", "sometimes"], "--overlap", "auto, on, off"),
        (["--precision", "bf17"], "--precision", "bf16-mixed"),
    ],
    ids=["noise-above-1", "option-of-another-task", "option-without-value", "unknown-preset", "unknown-schedule",
         "refresh-0", "warmup-eats-the-fit", "share-above-1", "only-without-suite", "overlap-unknown",
         "precision-unknown"],
)
def test_bad_regime_option_exits_2_naming_it(args, option, detail, tmp_path, capsys, monkeypatch):
    import grace_lightning.bench.cli as cli

    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("trained before validating the options"))
    if "--task" not in args:
        args = [*args, "--task", "mixture"]
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", *args, "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert option in err and detail in err, err


def test_cosine_schedule_decays_to_zero_over_the_fits_own_steps():
    import lightning as L
    import torch

    from grace_lightning.bench.tasks.mixture import MixtureTask
    from grace_lightning.bench.tasks import TaskSize

    task = MixtureTask()
    data = task.make_data(TaskSize(256, 64, 2), seed=0)
    model = task.build_model(data, seed=0)
    model.lr_schedule = "cosine"
    rates = []

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Watch()])
    trainer.fit(model, torch.utils.data.DataLoader(data.train, batch_size=32))
    assert len(rates) == 16 and rates[0] == pytest.approx(model.lr)
    assert all(a > b for a, b in zip(rates, rates[1:]))  # decays every step
    assert rates[8] == pytest.approx(model.lr * 0.5 * (1 + math.cos(math.pi * 8 / 16)))


def test_a_killed_bench_resumes_without_rerunning_finished_runs(tmp_path, monkeypatch, capsys):
    import grace_lightning.bench.cli as cli
    from grace_lightning.bench.runner import run_one

    calls = []

    def dies_on_third(task, strategy, fraction, seed, config):
        if config.epochs == 1 and config.train_examples <= 1024:  # the warm-up fit
            return run_one(task, strategy, fraction, seed, config)
        calls.append((seed, strategy, fraction))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return run_one(task, strategy, fraction, seed, config)

    monkeypatch.setattr(cli, "run_one", dies_on_third)
    args = ["bench", "--task", "mixture", "--quick", "--epochs", "2", "--strategies", "full,random",
            "--fractions", "0.3", "--seeds", "0,1", "--out", str(tmp_path)]
    with pytest.raises(KeyboardInterrupt):
        main(args)
    assert len((tmp_path / "runs.jsonl").read_text().splitlines()) == 2  # the two finished runs survive
    calls.clear()
    monkeypatch.setattr(cli, "run_one", lambda *a: (calls.append(a[1:4]), run_one(*a))[1])
    assert main(args) == 0
    # after the warm-up; seed 1 is the second seed, so its turn starts with the second strategy
    assert [(c[2], c[0], c[1]) for c in calls[1:]] == [(1, "random", 0.3), (1, "full", 1.0)]
    assert "resuming: 2 of 4 runs already done" in capsys.readouterr().out
    _, rows = _read_csv(tmp_path / "runs.csv")
    assert len(rows) == 4
    # other options are another comparison: its journal lines are not mixed in
    calls.clear()
    assert main([*args[:-2], "--lr-schedule", "constant", "--out", str(tmp_path)]) == 0
    assert len(calls) == 5 and "dropped 4 runs of another configuration" in capsys.readouterr().out


def test_a_suite_runs_each_comparison_into_its_folder_and_validates_all_first(tmp_path, capsys):
    suite = tmp_path / "suite.toml"
    suite.write_text(
        f'out = "{tmp_path / "out"}"\n[defaults]\nseeds = [0]\nfractions = [0.3]\nstrategies = ["full", "random"]\n'
        'epochs = 2\nquick = true\n[[comparison]]\ntask = "mixture"\n[[comparison]]\nname = "mix-constant"\n'
        'task = "mixture"\nlr_schedule = "constant"\n'
    )
    assert main(["bench", "--suite", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "2 comparisons, 4 runs to do" in out and "[4/4]" in out
    for name in ("mixture-quick", "mix-constant"):
        lines = (tmp_path / "out" / name / "runs.jsonl").read_text().splitlines()
        assert len(lines) == 2 and json.loads(lines[0])["row"]["commit"]  # each run records the code it ran
    report = (tmp_path / "out" / "suite.md").read_text()
    assert "## mixture-quick" in report and "## mix-constant" in report and "runs_from_commits" in report
    assert "| strategy | budget | seeds |" in report and "| random | 0.3 | 1 |" in report  # Markdown tables
    assert main(["bench", "--suite", str(suite), "--only", "mix-constant"]) == 0
    assert "0 runs to do" in capsys.readouterr().out
    again = (tmp_path / "out" / "suite.md").read_text()
    assert again.index("## mixture-quick") < again.index("## mix-constant"), "--only keeps the other tables, in order"
    assert again.count("## mixture-quick") == 1 and again.split("## mixture-quick")[1] == report.split("## mixture-quick")[1]

    bad = tmp_path / "bad.toml"
    bad.write_text('[[comparison]]\ntask = "mixture"\n[[comparison]]\ntask = "mixture"\nfractions = [2]\n')
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--suite", str(bad)])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "comparison 2" in err and "--fractions" in err
    with pytest.raises(SystemExit):
        main(["bench", "--suite", str(suite), "--task", "mixture"])
    assert "--task in the suite file" in capsys.readouterr().err


def test_data_the_options_cannot_build_stop_the_bench_before_training(tmp_path, capsys, monkeypatch):
    from grace_lightning.bench.tasks.mixture import MixtureTask

    def too_little(self, size, seed):
        raise TaskUnavailable("only 10 chunks of code for 3,000 asked; lower the `code` share")

    monkeypatch.setattr(MixtureTask, "make_data", too_little)
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--task", "mixture", "--quick", "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "--task-option" in err and "lower the `code` share" in err


def test_journal_fingerprint_separates_overlap_settings():
    """Runs with the thread forced on or off never mix with "auto" runs (synchronous on the CPU, as before)."""
    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.journal import fingerprint

    def config(**kw):
        return BenchConfig("mixture", ["grace"], [0.3], [0], 2, "out", "quick", None, None, **kw)

    auto, on, off = fingerprint(config()), fingerprint(config(overlap="on")), fingerprint(config(overlap="off"))
    assert len({auto, on, off}) == 3
    assert fingerprint(config(refresh_every=2)) != auto


def test_journal_fingerprint_separates_precisions_and_keeps_old_journals():
    """bf16 runs never mix with fp32 ones; the default precision leaves the fingerprint as it was before the option."""
    from dataclasses import asdict

    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.journal import fingerprint

    config = BenchConfig("mixture", ["grace"], [0.3], [0], 2, "out", "quick", None, None)
    assert fingerprint(config) != fingerprint(BenchConfig(**{**asdict(config), "precision": "bf16-mixed"}))
    options = asdict(config)
    for key in ("out", "strategies", "fractions", "seeds", "overlap", "precision", "scoring_batch_size", "capture",
                "evals_per_epoch"):
        options.pop(key)
    import hashlib
    import json

    before = hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert fingerprint(config) == before


def test_gpu_only_precision_without_a_gpu_exits_2_naming_it(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--task", "mixture", "--quick", "--precision", "16-mixed", "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert "--precision" in err and "bf16-mixed" in err


def test_rows_name_the_commit_and_mark_only_code_changes(tmp_path):
    from grace_lightning.bench.suite import code_version

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "runs.jsonl").write_text("{}\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "first")
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    assert code_version(str(tmp_path)) == head.stdout.strip()
    (tmp_path / "benchmarks" / "results" / "runs.jsonl").write_text("{}\n{}\n")  # a run appended its row
    assert code_version(str(tmp_path)) == head.stdout.strip()
    (tmp_path / "code.py").write_text("x = 2\n")
    assert code_version(str(tmp_path)) == head.stdout.strip() + " (with uncommitted changes)"
    assert code_version(str(tmp_path / "missing")) == "unknown"


def test_run_order_gives_every_strategy_each_place_within_a_seed():
    """Seeds outermost; within a seed the strategies take turns going first, each run planned exactly once."""
    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.runner import plan

    config = BenchConfig("mixture", ["full", "random", "grace"], [0.1, 0.3], [0, 1, 2], 2, "", "quick", None, None)
    order = plan(config)
    subsets = {(s, name, f) for s in (0, 1, 2) for name in ("random", "grace") for f in (0.1, 0.3)}
    expected = {(s, "full", 1.0) for s in (0, 1, 2)} | subsets
    assert len(order) == len(expected) and set(order) == expected
    assert [seed for seed, _, _ in order] == sorted(seed for seed, _, _ in order)  # seeds outermost
    firsts = [next(name for seed, name, _ in order if seed == s) for s in (0, 1, 2)]
    lasts = [[name for seed, name, _ in order if seed == s][-1] for s in (0, 1, 2)]
    assert sorted(firsts) == sorted(lasts) == ["full", "grace", "random"], (firsts, lasts)


def test_a_single_run_for_measurement_scripts_is_the_benchs_run_with_synchronous_selection():
    from grace_lightning.bench.runner import build_single_run, quiet_and_restored

    with quiet_and_restored():
        built = build_single_run("mixture", "grace", 0.25, 3, 2, strategy_kwargs={"k": 5})
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
    assert built.callback.strategy.k == 5 and built.callback.overlap is False
    assert built.sampler.fraction == 0.25 and built.trainer.max_epochs == 2 == built.trainer.current_epoch
    assert [r["refresh"] for r in built.callback.history] == [1.0, 2.0]
    assert built.callback.history[-1]["subset_size"] == len(built.sampler.selection)


def test_a_bench_run_trains_and_selects_in_the_configured_precision():
    """``--precision bf16-mixed`` reaches the Trainer; the fit, its scoring passes and the selection run under it."""
    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.runner import build_run, quiet_and_restored
    from grace_lightning.bench.tasks import get_task

    config = BenchConfig("mixture", ["grace"], [0.25], [0], 2, "", "quick", 400, 100, precision="bf16-mixed")
    with quiet_and_restored():
        built = build_run(get_task("mixture"), "grace", 0.25, 0, config)
        built.trainer.fit(built.model, built.train_loader, built.val_loader)
    assert built.trainer.precision == "bf16-mixed"
    assert [r["refresh"] for r in built.callback.history] == [1.0, 2.0]
    import torch

    store = built.callback.store
    assert store.measured.all() and torch.isfinite(store.loss).all()  # the scoring pass read the whole pool


def test_scoring_batch_size_and_capture_reach_the_callback_and_are_validated(tmp_path, capsys):
    """``--scoring-batch-size`` and ``--capture off`` set the callback's scoring batch and free capture; a bad value
    exits 2 naming the option; the defaults leave the journal fingerprint as it was before the options."""
    from dataclasses import asdict

    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.journal import fingerprint
    from grace_lightning.bench.runner import build_run, quiet_and_restored
    from grace_lightning.bench.tasks import get_task

    config = BenchConfig(
        "mixture", ["grace"], [0.25], [0], 2, "", "quick", 400, 100, scoring_batch_size=96, capture=False
    )
    with quiet_and_restored():
        built = build_run(get_task("mixture"), "grace", 0.25, 0, config)
    assert built.callback.scoring_batch_size == 96 and built.callback.capture_training_signals is False
    default = BenchConfig(**{**asdict(config), "scoring_batch_size": None, "capture": True})
    with quiet_and_restored():
        built = build_run(get_task("mixture"), "grace", 0.25, 0, default)
    assert built.callback.scoring_batch_size is None and built.callback.capture_training_signals is True
    assert len({fingerprint(config), fingerprint(default), fingerprint(BenchConfig(**{**asdict(default), "capture": False}))}) == 3
    import hashlib

    options = asdict(default)
    for key in ("out", "strategies", "fractions", "seeds", "overlap", "precision", "scoring_batch_size", "capture",
                "evals_per_epoch"):
        options.pop(key)
    assert fingerprint(default) == hashlib.sha256(json.dumps(options, sort_keys=True, default=str).encode()).hexdigest()[:16]

    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--task", "mixture", "--quick", "--scoring-batch-size", "0", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--scoring-batch-size" in err and "positive integer" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--task", "mixture", "--quick", "--capture", "maybe", "--out", str(tmp_path)])
    assert exit_info.value.code == 2 and "--capture" in capsys.readouterr().err


def test_more_evaluations_an_epoch_add_points_between_the_epochs_ends_and_change_no_fit():
    """``evals_per_epoch=2`` over 5 batches an epoch: a validation every 2nd batch of the fit and one at its last
    batch, which 2 does not divide; where a point falls on an epoch's end, the same metric as the run evaluated
    once an epoch (this task's model draws no random numbers, so extra validations change nothing)."""
    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.runner import quiet_and_restored, run_one
    from grace_lightning.bench.tasks import get_task

    rows = {}
    for per_epoch in (1, 2):
        # 2,560 examples at 0.25 and batch 128: 5 batches an epoch, 15 in the fit.
        config = BenchConfig("mixture", ["grace"], [0.25], [0], 3, "", "quick", 2560, 100, evals_per_epoch=per_epoch)
        with quiet_and_restored():
            rows[per_epoch] = run_one(get_task("mixture"), "grace", 0.25, 0, config)
    once, often = rows[1]["evals"], rows[2]["evals"]
    assert [p["epoch"] for p in once] == [1, 2, 3]
    assert [p["epoch"] for p in often] == [0.4, 0.8, 1.2, 1.6, 2, 2.4, 2.8, 3]
    assert [p["step"] for p in often] == [2, 4, 6, 8, 10, 12, 14, 15]
    assert often[4]["metric"] == once[1]["metric"] and often[-1]["metric"] == once[-1]["metric"]
    assert rows[2]["final_metric"] == rows[1]["final_metric"]
    seconds = [p["train_seconds"] for p in often]
    assert seconds == sorted(seconds)


def test_evals_per_epoch_is_validated_and_kept_out_of_old_fingerprints(tmp_path, capsys):
    from dataclasses import asdict

    from grace_lightning.bench.config import BenchConfig
    from grace_lightning.bench.journal import fingerprint

    config = BenchConfig("mixture", ["grace"], [0.3], [0], 2, "out", "quick", None, None)
    assert fingerprint(config) != fingerprint(BenchConfig(**{**asdict(config), "evals_per_epoch": 4}))
    for bad in ("0", "two"):
        with pytest.raises(SystemExit) as exit_info:
            main(["bench", "--task", "mixture", "--quick", "--evals-per-epoch", bad, "--out", str(tmp_path)])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--evals-per-epoch" in err and "positive integer" in err
