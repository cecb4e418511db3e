"""The step benchmark: its report layout and that each FNGD contender runs the phase it names."""

import json

import pytest
import torch

from scripts import bench_step


def test_bench_step_reports_fngd_phases(tmp_path):
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    try:
        bench_step.main(["--model", "resnet8", "--batch-size", "4", "--optimizers", "fngd,ngd",
                         "--steps", "2", "--warmup", "1", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    report = json.loads(out.read_text())

    assert report["model"] == "resnet8"
    assert report["batch_size"] == 4
    rows = {(row["optimizer"], row["phase"]): row for row in report["results"]}
    assert set(rows) == {("sgdm", "every_step"), ("fngd", "solve"), ("fngd", "reuse"),
                         ("ngd", "every_step")}
    assert rows[("sgdm", "every_step")]["ratio_to_sgdm"] == 1.0
    for row in rows.values():
        assert row["steps"] == 2
        assert row["median_step_s"] > 0

    # Warm-up plus timed steps: the solve contender never reuses, the reuse one only reuses
    # after its one warm-up step.
    solve_stats = rows[("fngd", "solve")]["optimizer_stats"]
    reuse_stats = rows[("fngd", "reuse")]["optimizer_stats"]
    assert solve_stats["solve_steps"] == 3
    assert solve_stats["reuse_steps"] == 0
    assert reuse_stats["solve_steps"] == 1
    assert reuse_stats["reuse_steps"] == 2


def test_bench_step_times_the_transformer():
    threads = torch.get_num_threads()
    try:
        args = bench_step.parse_args([
            "--model", "transformer", "--batch-size", "3", "--optimizers", "adamw,fngd",
            "--steps", "1", "--warmup", "1", "--threads", "1", "model.d_model=16",
            "model.ffn_dim=32", "model.heads=2", "model.layers=1"])
        report = bench_step.run(args)
    finally:
        torch.set_num_threads(threads)
    labels = [(row["optimizer"], row["phase"]) for row in report["results"]]
    assert labels == [("sgdm", "every_step"), ("adamw", "every_step"), ("fngd", "solve"),
                      ("fngd", "reuse")]
    assert report["results"][3]["optimizer_stats"]["layer_reuses"] > 0


def test_bench_step_unknown_optimizer_lists_choices():
    with pytest.raises(SystemExit) as raised:
        bench_step.main(["--model", "resnet8", "--optimizers", "sgdm,nosuch", "--steps", "1"])
    assert "optimizer/nosuch" in str(raised.value.code)
    assert "fngd" in str(raised.value.code)
