"""make_tables: reading runs, time to target, relative epoch times, devices, schemas, W&B,
and a full pass over runs that the trainer writes."""

from __future__ import annotations

import csv
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from scripts import make_tables
from scripts.tables.compute import (MixedDevicesError, epoch_time_after_first, group_rows,
                                    time_to_target)
from scripts.tables.records import (SUPPORTED_SCHEMA_VERSIONS, load_runs, load_wandb_runs,
                                    read_run_dir)
from tests.conftest import REPOSITORY_ROOT
from trainer.run_info import SCHEMA_VERSION

CPU = {"type": "cpu", "name": "x86_64", "threads": 2}
GPU_A = {"type": "cuda", "name": "NVIDIA H200"}
GPU_B = {"type": "cuda", "name": "NVIDIA GeForce RTX 3060 Ti"}


def write_run(directory: Path, arm: str, seed: int, accuracies: list[float],
              epoch_times: list[float], device: dict = GPU_A, experiment: str = "table2",
              model: str = "resnet110", scale: str = "full", target: float | None = 0.935,
              status: str = "completed", schema_version: object = 1, host: str = "node1",
              extra: dict | None = None) -> Path:
    """Write a run folder as the trainer does: run.json and one metrics.jsonl line an epoch."""
    directory.mkdir(parents=True)
    benchmark = {"name": experiment, "arm": arm}
    if target is not None:
        benchmark["target_test_accuracy"] = target
    config = {"seed": seed, "dataset": {"name": "cifar10"}, "model": {"name": model},
              "optimizer": {"_target_": "torch.optim.SGD", "momentum": 0.9},
              "benchmark": benchmark, "scale": {"name": scale}}
    info = {"config": config, "device": device, "host": host, "status": status,
            "git": {"commit": "a" * 40, "dirty": False}}
    if schema_version is not None:
        info["schema_version"] = schema_version
    (directory / "run.json").write_text(json.dumps(info))

    cumulative = 0.0
    with open(directory / "metrics.jsonl", "w") as file:
        for epoch, (accuracy, seconds) in enumerate(zip(accuracies, epoch_times), start=1):
            cumulative += seconds
            record = {"epoch": epoch, "train_loss": 1.0, "test_accuracy": accuracy,
                      "train_time_s": seconds, "eval_time_s": 0.5,
                      "cumulative_train_time_s": cumulative, "lr": 0.1, **(extra or {})}
            file.write(json.dumps(record) + "\n")
    return directory


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def run_cli(*args: str) -> int:
    return make_tables.main(list(args))


# --------------------------------------------------------------------------------------------
# Time to target (Table II)


def test_time_to_target_reached_and_never(tmp_path):
    runs_dir = tmp_path / "runs"
    # SGD-m reaches 0.935 in epoch 3 (after 10 + 10 + 12 s); FNGD in epoch 2 (8 + 9 s).
    write_run(runs_dir / "sgdm", "sgdm", 0, [0.80, 0.93, 0.94, 0.95], [10, 10, 12, 10])
    write_run(runs_dir / "fngd", "fngd", 0, [0.90, 0.936, 0.94], [8, 9, 9])
    # Eva peaks at 0.9345, just below the target.
    write_run(runs_dir / "eva", "eva", 0, [0.90, 0.9345, 0.93], [11, 11, 11])
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0

    rows = {row["arm"]: row for row in read_csv(out / "table2_time_to_target.csv")}
    assert float(rows["sgdm"]["epochs_mean"]) == 3
    assert float(rows["sgdm"]["time_s_mean"]) == pytest.approx(32.0)
    assert float(rows["fngd"]["epochs_mean"]) == 2
    assert float(rows["fngd"]["time_s_mean"]) == pytest.approx(17.0)
    assert float(rows["fngd"]["gap_to_sgdm"]) == pytest.approx(17.0 / 32.0 - 1.0)
    assert float(rows["sgdm"]["gap_to_sgdm"]) == pytest.approx(0.0)
    assert rows["eva"]["reached_runs"] == "0"
    assert rows["eva"]["epochs_mean"] == ""
    assert rows["eva"]["gap_to_sgdm"] == ""
    assert float(rows["eva"]["best_test_accuracy"]) == pytest.approx(0.9345)

    markdown = (out / "table2_time_to_target.md").read_text()
    assert "not reached (best 93.45%)" in markdown
    assert "-46.9%" in markdown
    assert "NVIDIA H200" in markdown


def test_time_to_target_partial_seeds(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "a", "sgdm", 0, [0.94, 0.95], [10, 10])
    write_run(runs_dir / "b", "fngd", 0, [0.90, 0.94], [5, 5])
    write_run(runs_dir / "c", "fngd", 1, [0.90, 0.92], [5, 7])
    write_run(runs_dir / "d", "fngd", 2, [0.94, 0.92], [6, 7])
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0

    fngd = next(row for row in read_csv(out / "table2_time_to_target.csv") if row["arm"] == "fngd")
    assert fngd["runs"] == "3"
    assert fngd["reached_runs"] == "2"
    assert fngd["seeds"] == "0 1 2"
    # Seed 0 reaches it in epoch 2 after 10 s, seed 2 in epoch 1 after 6 s.
    assert float(fngd["epochs_mean"]) == pytest.approx(1.5)
    assert float(fngd["time_s_mean"]) == pytest.approx(8.0)
    assert float(fngd["time_s_std"]) == pytest.approx(statistics.stdev([10.0, 6.0]))
    assert "(2 of 3 runs reached it)" in (out / "table2_time_to_target.md").read_text()


def test_time_to_target_skips_missing_accuracy(tmp_path):
    run_dir = write_run(tmp_path / "run", "sgdm", 0, [0.5, 0.96], [1, 2])
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    first["test_accuracy"] = None       # a diverged epoch is written as null
    (run_dir / "metrics.jsonl").write_text("\n".join([json.dumps(first), lines[1]]) + "\n")

    result = time_to_target(read_run_dir(run_dir), 0.9)

    assert result.reached
    assert result.epoch == 2
    assert result.time_s == pytest.approx(3.0)


def test_target_override_and_rows_without_target(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "a", "sgdm", 0, [0.5, 0.6], [1, 1], experiment="table3",
              model="resnet32", target=None)
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0
    assert not (out / "table2_time_to_target.md").exists()

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures",
                   "--target", "0.55") == 0
    row = read_csv(out / "table2_time_to_target.csv")[0]
    assert float(row["target"]) == 0.55
    assert float(row["epochs_mean"]) == 2


# --------------------------------------------------------------------------------------------
# Relative epoch times (Table III)


def test_relative_epoch_times(tmp_path):
    runs_dir = tmp_path / "runs"
    # Medians after epoch 1: SGD-m seeds 10 and 12 (mean 11); KFAC 22; FNGD 13.2 and 15.4.
    write_run(runs_dir / "s0", "sgdm", 0, [0.1] * 4, [30, 10, 11, 9], experiment="table3")
    write_run(runs_dir / "s1", "sgdm", 1, [0.1] * 4, [30, 12, 12, 13], experiment="table3")
    write_run(runs_dir / "k0", "kfac", 0, [0.1] * 3, [50, 22, 22], experiment="table3")
    write_run(runs_dir / "f0", "fngd", 0, [0.1] * 3, [90, 13.2, 13.2], experiment="table3")
    write_run(runs_dir / "f1", "fngd", 1, [0.1] * 3, [90, 15.4, 15.4], experiment="table3")
    # One epoch only: no time after epoch 1 exists.
    write_run(runs_dir / "e0", "eva", 0, [0.1], [40], experiment="table3")
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0

    rows = {row["arm"]: row for row in read_csv(out / "table3_epoch_time.csv")}
    assert rows["sgdm"]["baseline"] == "sgdm"
    assert float(rows["sgdm"]["epoch_time_s_mean"]) == pytest.approx(11.0)
    assert float(rows["kfac"]["ratio_mean"]) == pytest.approx(2.0)
    assert rows["kfac"]["ratio_std"] == ""
    assert float(rows["fngd"]["ratio_mean"]) == pytest.approx((1.2 + 1.4) / 2)
    assert float(rows["fngd"]["ratio_std"]) == pytest.approx(statistics.stdev([1.2, 1.4]))
    assert rows["fngd"]["seeds"] == "0 1"
    assert rows["eva"]["runs"] == "0"
    assert rows["eva"]["single_epoch_runs"] == "1"

    assert float(rows["sgdm"]["epoch_time_spread"]) == pytest.approx(11 / 9)
    assert float(rows["fngd"]["epoch_time_spread"]) == pytest.approx(1.0)

    markdown = (out / "table3_epoch_time.md").read_text()
    assert "†" not in markdown
    assert "2.00× (n=1, seed 0)" in markdown
    assert "1.30× ± 0.14 (n=2, seeds 0,1)" in markdown
    assert "1× = 11.00 ± 1.41 s (n=2, seeds 0,1)" in markdown
    assert "needs ≥ 2 epochs" in markdown
    latex = (out / "table3_epoch_time.tex").read_text()
    assert "1.30$\\times$ $\\pm$ 0.14" in latex
    assert "\\begin{tabular}" in latex


def test_noisy_epoch_times_marked(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "s0", "sgdm", 0, [0.1] * 3, [5, 10, 10], experiment="table3")
    # A busy machine: epoch 3 took 4 times as long as epoch 2.
    write_run(runs_dir / "f0", "fngd", 0, [0.1] * 3, [9, 5, 20], experiment="table3")
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0

    rows = {row["arm"]: row for row in read_csv(out / "table3_epoch_time.csv")}
    assert float(rows["fngd"]["epoch_time_spread"]) == pytest.approx(4.0)
    markdown = (out / "table3_epoch_time.md").read_text()
    assert "1.25× (n=1, seed 0) †" in markdown
    assert "differ by up to 4.0×" in markdown
    assert "1× = 10.00 s (n=1, seed 0) |" in markdown


def test_ngd_is_baseline_without_sgdm(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "n0", "ngd", 0, [0.1] * 3, [20, 10, 10], experiment="fig4")
    write_run(runs_dir / "f0", "fngd", 0, [0.1] * 3, [20, 4, 4], experiment="fig4")
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0

    rows = {row["arm"]: row for row in read_csv(out / "table3_epoch_time.csv")}
    assert rows["fngd"]["baseline"] == "ngd"
    assert float(rows["fngd"]["ratio_mean"]) == pytest.approx(0.4)


def test_epoch_time_uses_median_after_first():
    class FakeRun:
        records = [{"epoch": 1, "train_time_s": 100.0}, {"epoch": 2, "train_time_s": 3.0},
                   {"epoch": 3, "train_time_s": 50.0}, {"epoch": 4, "train_time_s": 4.0}]

    assert epoch_time_after_first(FakeRun()) == 4.0


def test_mixed_devices_rejected(tmp_path, caplog):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "a", "sgdm", 0, [0.1, 0.2], [10, 10], device=GPU_A)
    write_run(runs_dir / "b", "fngd", 0, [0.1, 0.2], [5, 5], device=GPU_B)
    out = tmp_path / "out"

    runs, _ = load_runs([runs_dir])
    with pytest.raises(MixedDevicesError) as info:
        group_rows(runs)
    assert "NVIDIA H200" in str(info.value)
    assert "RTX 3060 Ti" in str(info.value)
    assert "--device" in str(info.value)

    assert run_cli("--runs", str(runs_dir), "--out", str(out)) == 2
    assert "cannot be compared" in caplog.text
    assert not (out / "table3_epoch_time.md").exists()

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures",
                   "--device", "NVIDIA H200") == 0
    assert [row["arm"] for row in read_csv(out / "table3_epoch_time.csv")] == ["sgdm"]


def test_cpu_hosts_are_different_devices(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "a", "sgdm", 0, [0.1, 0.2], [10, 10], device=CPU, host="laptop")
    write_run(runs_dir / "b", "fngd", 0, [0.1, 0.2], [5, 5], device=CPU, host="server")

    runs, _ = load_runs([runs_dir])
    with pytest.raises(MixedDevicesError):
        group_rows(runs)


def test_unknown_device_filter(tmp_path, caplog):
    write_run(tmp_path / "runs" / "a", "sgdm", 0, [0.1, 0.2], [10, 10])

    assert run_cli("--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"),
                   "--device", "TPU") == 2
    assert "NVIDIA H200" in caplog.text


# --------------------------------------------------------------------------------------------
# Schemas and unreadable runs


def test_supported_schema_includes_trainer():
    assert SCHEMA_VERSION in SUPPORTED_SCHEMA_VERSIONS


@pytest.mark.parametrize("version, message", [
    (None, "has no schema_version"),
    (0, "schema_version 0 is older"),
    (SCHEMA_VERSION + 1, f"schema_version {SCHEMA_VERSION + 1} is newer"),
    ("1", "is not an integer"),
])
def test_incompatible_schema_skipped(tmp_path, version, message):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "good", "sgdm", 0, [0.5, 0.6], [10, 10])
    # Same arm and seed with very different times: reading it would change the table.
    write_run(runs_dir / "old", "sgdm", 1, [0.5, 0.6], [99, 99], schema_version=version)

    runs, skipped = load_runs([runs_dir])

    assert [Path(run.source).name for run in runs] == ["good"]
    assert len(skipped) == 1
    assert message in skipped[0]
    assert "old" in skipped[0]


def test_only_incompatible_runs_fail(tmp_path, caplog):
    write_run(tmp_path / "runs" / "old", "sgdm", 0, [0.5], [10], schema_version=0)

    assert run_cli("--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")) == 2
    assert "no usable run" in caplog.text
    assert "schema_version 0 is older" in caplog.text


def test_record_missing_key_rejected(tmp_path):
    run_dir = write_run(tmp_path / "runs" / "a", "sgdm", 0, [0.5, 0.6], [10, 10])
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    del records[1]["cumulative_train_time_s"]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")

    runs, skipped = load_runs([tmp_path / "runs"])

    assert runs == []
    assert "record 2 lacks cumulative_train_time_s" in skipped[0]


def test_unfinished_runs_skipped_unless_asked(tmp_path):
    write_run(tmp_path / "runs" / "a", "sgdm", 0, [0.5], [10], status="running")
    write_run(tmp_path / "runs" / "b", "sgdm", 1, [0.5], [10], status="diverged")

    runs, skipped = load_runs([tmp_path / "runs"])
    assert [run.seed for run in runs] == [1]
    assert "status 'running'" in skipped[0]

    runs, skipped = load_runs([tmp_path / "runs"], include_unfinished=True)
    assert sorted(run.seed for run in runs) == [0, 1]


def test_missing_runs_folder(tmp_path, caplog):
    assert run_cli("--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "out")) == 2
    assert "does not exist" in caplog.text


def test_invalid_target_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run_cli("--runs", str(tmp_path), "--out", str(tmp_path), "--target", "93.5")
    assert "fraction" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Final metrics, smoke labels, grid points


def test_final_metrics_and_smoke_notes(tmp_path):
    runs_dir = tmp_path / "runs"
    write_run(runs_dir / "a", "sgdm", 0, [0.30, 0.50, 0.40], [1, 1, 1], scale="smoke",
              experiment="fig5", device=CPU)
    write_run(runs_dir / "b", "sgdm", 1, [0.20, 0.60, 0.60], [1, 1, 1], scale="smoke",
              experiment="fig5", device=CPU)
    out = tmp_path / "out"

    assert run_cli("--runs", str(runs_dir), "--out", str(out), "--no-figures") == 0

    row = read_csv(out / "final_metrics.csv")[0]
    assert float(row["final_mean"]) == pytest.approx(0.5)
    assert float(row["best_mean"]) == pytest.approx(0.55)
    assert float(row["final_std"]) == pytest.approx(statistics.stdev([0.4, 0.6]))
    markdown = (out / "final_metrics.md").read_text()
    assert "50.00% ± 14.14" in markdown
    assert "not comparable with the paper" in markdown
    assert "CPU x86_64, 2 threads, host node1" in markdown
    assert "| smoke |" in markdown
    runs_csv = read_csv(out / "runs.csv")
    assert {row["seed"] for row in runs_csv} == {"0", "1"}
    assert runs_csv[0]["git_commit"] == "a" * 40


def test_grid_points_are_separate_methods(tmp_path):
    runs_dir = tmp_path / "runs"
    for index, lr in enumerate((0.05, 0.1)):
        run_dir = write_run(runs_dir / str(index), "fngd", 0, [0.5, 0.6 + lr], [1, 1],
                            experiment="table3", target=None)
        info = json.loads((run_dir / "run.json").read_text())
        info["config"]["benchmark"]["grid"] = ["optimizer.lr"]
        info["config"]["optimizer"]["lr"] = lr
        (run_dir / "run.json").write_text(json.dumps(info))

    runs, _ = load_runs([runs_dir])

    assert sorted(run.arm for run in runs) == ["fngd[lr=0.05]", "fngd[lr=0.1]"]


# --------------------------------------------------------------------------------------------
# W&B (the W&B server cannot run here, so its public API is replaced by a stand-in)


class FakeWandbRun:
    def __init__(self, run_id, config, history, state="finished", metadata=None):
        self.id = run_id
        self.config = config
        self._history = history
        self.state = state
        self.metadata = metadata if metadata is not None else {"gpu": "NVIDIA H200",
                                                               "host": "node1"}

    def scan_history(self):
        return iter(self._history)


class FakeWandbApi:
    def __init__(self, runs):
        self._runs = runs
        self.paths = []

    def runs(self, path):
        self.paths.append(path)
        return list(self._runs)


def _history(times):
    cumulative = 0.0
    rows = []
    for epoch, seconds in enumerate(times, start=1):
        cumulative += seconds
        rows.append({"_step": epoch, "_runtime": 3.0, "epoch": epoch, "train_loss": 1.0,
                     "test_accuracy": 0.5, "train_time_s": seconds,
                     "cumulative_train_time_s": cumulative})
    return rows


def test_wandb_runs_read_like_folders():
    config = {"seed": 0, "dataset": {"name": "cifar10"}, "model": {"name": "resnet32"},
              "optimizer": {"_target_": "fngd.FNGD", "mode": "ngd"}}
    api = FakeWandbApi([
        FakeWandbRun("r1", config, _history([9, 4, 4])),
        FakeWandbRun("r2", config, _history([9, 4]), state="running"),
        FakeWandbRun("r3", config, [{"_step": 1, "epoch": 1, "test_accuracy": 0.5}]),
    ])

    runs, skipped = load_wandb_runs("team/fngd-suite", api=api)

    assert api.paths == ["team/fngd-suite"]
    assert [run.source for run in runs] == ["team/fngd-suite/r1"]
    run = runs[0]
    assert run.arm == "ngd"
    assert run.device_label == "NVIDIA H200"
    assert epoch_time_after_first(run) == 4
    assert all(not key.startswith("_") for key in run.records[0])
    assert len(skipped) == 2
    assert any("state 'running'" in message for message in skipped)
    assert any("lacks train_time_s" in message for message in skipped)


def test_wandb_path_validated():
    with pytest.raises(ValueError, match="ENTITY/PROJECT"):
        load_wandb_runs("just-a-project", api=FakeWandbApi([]))


# --------------------------------------------------------------------------------------------
# The whole pipeline: a one-command sweep of the trainer, then make_tables


def test_sweep_then_make_tables(tmp_path, synthetic_cifar_root):
    sweep_dir = tmp_path / "multirun"
    command = [
        sys.executable, "-m", "scripts.train", "-m", "experiment=fig8", "scale=smoke",
        f"dataset.root={synthetic_cifar_root}", "model=resnet8", "dataset.batch_size=16",
        "dataset.train_subset=null", "dataset.test_subset=null", "dataset.eval_batch_size=32",
        "trainer.device=cpu", "trainer.progress=false", "trainer.checkpoint=false",
        "logger=none", "seed=0", f"hydra.sweep.dir={sweep_dir}",
    ]
    result = subprocess.run(command, cwd=REPOSITORY_ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "results"

    assert run_cli("--runs", str(sweep_dir), "--out", str(out)) == 0

    # Two jobs: SGD-m and FNGD, 2 smoke epochs each, profiled.
    runs, skipped = load_runs([sweep_dir])
    assert skipped == []
    assert sorted(run.arm for run in runs) == ["fngd", "sgdm"]
    assert all(run.scale == "smoke" and run.experiment == "fig8" for run in runs)
    assert all(len(run.records) == 2 for run in runs)

    times = {row["arm"]: row for row in read_csv(out / "table3_epoch_time.csv")}
    by_arm = {run.arm: run for run in runs}
    expected = by_arm["fngd"].records[1]["train_time_s"] / by_arm["sgdm"].records[1]["train_time_s"]
    assert float(times["fngd"]["ratio_mean"]) == pytest.approx(expected)

    breakdown = {(row["arm"], row["epochs"]): row for row in read_csv(out / "time_breakdown.csv")}
    # FNGD solves in epoch 1 only; SGD-m has no optimizer sections.
    assert float(breakdown[("fngd", "1")]["per_sample_ms_mean"]) > 0
    assert float(breakdown[("fngd", "1")]["precondition_ms_mean"]) > 0
    assert float(breakdown[("fngd", "2+")]["per_sample_ms_mean"]) == 0
    assert float(breakdown[("sgdm", "1")]["precondition_ms_mean"]) == 0
    for row in breakdown.values():
        parts = sum(float(row[f"{part}_ms_mean"]) for part in
                    ("forward", "backward", "per_sample", "precondition", "update", "other"))
        assert parts == pytest.approx(float(row["total_ms"]))
    record = by_arm["fngd"].records[0]
    steps = record["profile_steps"]
    assert float(breakdown[("fngd", "1")]["total_ms"]) == pytest.approx(
        1000 * record["train_time_s"] / steps, rel=1e-6)

    for name in ("table3_epoch_time", "final_metrics", "time_breakdown"):
        for suffix in (".md", ".csv", ".tex"):
            assert (out / f"{name}{suffix}").stat().st_size > 0
    for stem in ("curves", "time_breakdown"):
        image = matplotlib.image.imread(out / f"fig8_cifar10_resnet8_smoke_{stem}.png")
        assert image.shape[0] > 100 and image.shape[1] > 100
        assert not math.isclose(float(image.std()), 0.0)
