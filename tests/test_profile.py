"""trainer.profile: phase and section attribution, and profiled training runs."""

from __future__ import annotations

import pytest
import torch

import trainer.profile as profile_module
from tests.conftest import tiny_run_overrides
from trainer.profile import StepProfiler, profile_parts
from trainer.train import train


class FakeClock:
    """Stands in for time.perf_counter so that durations are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(profile_module.time, "perf_counter", fake)
    return fake


def test_sections_leave_their_phase(clock):
    profiler = StepProfiler(torch.device("cpu"))

    for _ in range(2):
        with profiler.phase("forward"):
            clock.advance(1.0)
        with profiler.phase("backward"):
            clock.advance(2.0)
            with profiler.section("per_sample"):
                clock.advance(0.5)
            with profiler.section("precondition"):
                clock.advance(0.25)
            clock.advance(1.0)
        clock.advance(0.125)             # between phases: zero_grad, data
        with profiler.phase("step"):
            with profiler.section("precondition"):
                clock.advance(0.75)
            clock.advance(0.5)

    summary = profiler.epoch_summary(train_time_s=15.0)

    assert summary["profile_steps"] == 2
    assert summary["profile_forward_s"] == pytest.approx(2.0)
    assert summary["profile_backward_s"] == pytest.approx(6.0)
    assert summary["profile_per_sample_s"] == pytest.approx(1.0)
    assert summary["profile_precondition_s"] == pytest.approx(2.0)
    assert summary["profile_update_s"] == pytest.approx(1.0)
    # 15 s of training, 12 s inside the phases.
    assert summary["profile_other_s"] == pytest.approx(3.0)


def test_summary_resets_each_epoch(clock):
    profiler = StepProfiler(torch.device("cpu"))
    with profiler.phase("forward"):
        clock.advance(3.0)
    profiler.epoch_summary()

    with profiler.phase("step"):
        clock.advance(1.0)
    summary = profiler.epoch_summary()

    assert summary["profile_steps"] == 0
    assert summary["profile_forward_s"] == 0.0
    assert summary["profile_update_s"] == pytest.approx(1.0)
    assert summary["profile_per_sample_s"] == 0.0
    assert "profile_other_s" not in summary


def test_nested_and_other_sections(clock):
    profiler = StepProfiler(torch.device("cpu"))
    with profiler.phase("step"):
        with profiler.section("precondition"):
            clock.advance(1.0)
            with profiler.section("eigendecomposition"):
                clock.advance(4.0)
        clock.advance(0.5)

    summary = profiler.epoch_summary()

    assert summary["profile_precondition_s"] == pytest.approx(1.0)
    assert summary["profile_eigendecomposition_s"] == pytest.approx(4.0)
    assert summary["profile_update_s"] == pytest.approx(0.5)
    assert profile_parts(summary) == {"forward": 0.0, "backward": 0.0, "per_sample": 0.0,
                                      "precondition": 1.0, "update": 0.5,
                                      "eigendecomposition": 4.0}


@pytest.mark.parametrize("name", ["forward", "update", "other", "Has Space", "", 3])
def test_invalid_section_names(name):
    with pytest.raises(ValueError, match="section name"):
        StepProfiler(torch.device("cpu")).section(name)


def test_unknown_phase():
    with pytest.raises(ValueError, match="valid phases"):
        StepProfiler(torch.device("cpu")).phase("data")


def test_summary_with_open_interval_raises():
    profiler = StepProfiler(torch.device("cpu"))
    with profiler.phase("forward"):
        with pytest.raises(RuntimeError, match="still open: forward"):
            profiler.epoch_summary()


def test_attach_only_to_optimizers_with_hook():
    profiler = StepProfiler(torch.device("cpu"))
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)

    class Hooked:
        profiler = None

    hooked = Hooked()
    assert profiler.attach(sgd) is False
    assert not hasattr(sgd, "profiler")
    assert profiler.attach(hooked) is True
    assert hooked.profiler == profiler.section


@pytest.mark.parametrize("optimizer, solves_in_epoch_one", [("sgdm", False), ("fngd", True)])
def test_profiled_run_records_parts(tmp_path, synthetic_cifar_root, compose_config, optimizer,
                                    solves_in_epoch_one):
    overrides = tiny_run_overrides(synthetic_cifar_root, epochs=2)
    cfg = compose_config(overrides + [f"optimizer={optimizer}", "trainer.profile=true"])

    records = train(cfg, tmp_path / "run")

    for record in records:
        assert record["profile_steps"] == 4       # 64 images in batches of 16
        parts = profile_parts(record)
        assert parts["forward"] > 0
        assert parts["backward"] > 0
        assert parts["update"] > 0
        assert sum(parts.values()) == pytest.approx(record["train_time_s"], rel=1e-6)
    first, second = profile_parts(records[0]), profile_parts(records[1])
    assert (first["per_sample"] > 0) is solves_in_epoch_one
    assert (first["precondition"] > 0) is solves_in_epoch_one
    # FNGD reuses its coefficients after epoch 1, so nothing is solved in epoch 2.
    assert second["per_sample"] == 0.0
    assert second["precondition"] == 0.0


def test_unprofiled_run_has_no_parts(tmp_path, synthetic_cifar_root, compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=1))
    records = train(cfg, tmp_path / "run")
    assert not any(key.startswith("profile_") for key in records[0])
