"""The benchmark CLI: output schema of a tiny run, and option validation before any training."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from grace_lightning import available_strategies
from grace_lightning.bench.cli import RUN_COLUMNS, bench_main, main

NUMERIC = [c for c in RUN_COLUMNS if c != "strategy"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, int]:
    out = tmp_path_factory.mktemp("bench") / "out"  # does not exist yet: the CLI creates it
    code = main(
        ["bench", "--quick", "--epochs", "1", "--strategies", "full,random", "--fractions", "0.2,0.5",
         "--seeds", "0,1", "--out", str(out)]
    )
    return out, code


def expected_keys() -> set[tuple[str, float, int]]:
    # `full` runs once at fraction 1.0; every other strategy at each fraction.
    return {("full", 1.0, s) for s in (0, 1)} | {("random", f, s) for f in (0.2, 0.5) for s in (0, 1)}


def test_bench_exits_zero(tiny_run):
    assert tiny_run[1] == 0


def test_runs_csv_schema(tiny_run):
    out, _ = tiny_run
    with open(out / "runs.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == RUN_COLUMNS
        rows = list(reader)
    keys = [(r["strategy"], float(r["fraction"]), int(r["seed"])) for r in rows]
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys()
    for row in rows:
        for column in NUMERIC:
            assert math.isfinite(float(row[column])), (column, row)
        assert 0.0 <= float(row["final_val_accuracy"]) <= 1.0
        assert float(row["wall_seconds"]) > 0
        assert 0.0 <= float(row["selection_seconds"]) <= float(row["wall_seconds"])
        assert int(row["epochs"]) == 1
        assert int(row["examples_seen"]) == int(row["budget_per_epoch"])  # one epoch, one budget


def test_runs_json_schema(tiny_run):
    out, _ = tiny_run
    data = json.loads((out / "runs.json").read_text())
    assert {"config", "environment", "runs", "summary"} <= set(data)
    runs = data["runs"]
    assert {(r["strategy"], r["fraction"], r["seed"]) for r in runs} == expected_keys() and len(runs) == 6
    for run in runs:
        assert set(RUN_COLUMNS) <= set(run)
        for column in NUMERIC:
            assert isinstance(run[column], (int, float)) and math.isfinite(run[column]), (column, run)
        assert len(run["val_accuracy_per_epoch"]) == 1
    summary = {(s["strategy"], s["fraction"]): s for s in data["summary"]}
    assert set(summary) == {("full", 1.0), ("random", 0.2), ("random", 0.5)}
    assert all(s["seeds"] == 2 and math.isfinite(s["accuracy_std"]) for s in summary.values())


def test_full_reference_sees_more_examples(tiny_run):
    out, _ = tiny_run
    runs = json.loads((out / "runs.json").read_text())["runs"]
    seen = {(r["strategy"], r["fraction"]): r["examples_seen"] for r in runs}
    assert seen[("full", 1.0)] > seen[("random", 0.5)] > seen[("random", 0.2)]


@pytest.mark.parametrize(
    "args, option, detail",
    [
        (["--strategies", "full,nope"], "--strategies", "nope"),
        (["--fractions", "0.3,1.5"], "--fractions", "(0, 1]"),
        (["--seeds", " , "], "--seeds", "no seed"),
        (["--out", "{file}/sub"], "--out", "cannot write"),
    ],
    ids=["unknown-strategy", "fraction-out-of-range", "empty-seeds", "unwritable-out"],
)
def test_bad_option_exits_2_naming_it(args, option, detail, tmp_path, capsys, monkeypatch):
    # Validation must fail before any training: make training itself an error.
    import grace_lightning.bench.cli as cli

    monkeypatch.setattr(cli, "run_one", lambda *a, **k: pytest.fail("trained before validating the options"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    args = [a.format(file=blocker) for a in args]
    if option != "--out":
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as excinfo:
        main(["bench", "--quick", *args])
    assert excinfo.value.code == 2
    err = capsys.readouterr().err
    assert option in err and detail in err, err
    if option == "--strategies":
        assert ", ".join(available_strategies()) in err  # lists what is available


def test_module_entry_point_validates_too(tmp_path, capsys):
    with pytest.raises(SystemExit) as excinfo:
        bench_main(["--fractions", "0", "--out", str(tmp_path)])
    assert excinfo.value.code == 2
    assert "--fractions" in capsys.readouterr().err


def test_console_script_needs_the_bench_command(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2


def test_plots_are_written_as_png_files(tiny_run):
    out, _ = tiny_run
    for name in ("accuracy_per_epoch.png", "accuracy_vs_wall_clock.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
