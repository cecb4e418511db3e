"""Hydra config groups: composition, defaults, presets, schedules and name errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONFIG_DIR
from trainer.optim import build_optimizer
from trainer.schedule import build_scheduler

DATASETS = ["cifar10", "cifar100"]
PAPER_MODELS = ["resnet32", "resnet110", "resnet18", "resnet34"]
FIRST_ORDER = ["sgdm", "adamw"]
SCHEDULES = ["step", "constant"]


def test_defaults(compose_config, monkeypatch):
    monkeypatch.delenv("FNGD_DATA_DIR", raising=False)
    cfg = compose_config([])

    assert cfg.dataset.name == "cifar10"
    assert cfg.model.name == "resnet32"
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.schedule._target_ == "trainer.schedule.step_decay"
    assert cfg.logger.name == "wandb"
    assert cfg.logger.mode == "offline"
    assert cfg.trainer.profile is False
    assert cfg.trainer.autocast == "none"
    assert cfg.trainer.device == "auto"
    assert cfg.dataset.root == "./datasets"
    assert cfg.dataset.train_subset is None
    assert cfg.dataset.batch_size == 128
    assert cfg.seed == 0


def test_data_root_from_environment(compose_config, monkeypatch, tmp_path):
    monkeypatch.setenv("FNGD_DATA_DIR", str(tmp_path))
    assert compose_config([]).dataset.root == str(tmp_path)


def test_output_directories(compose_config):
    hydra_cfg = compose_config([], return_hydra_config=True).hydra
    assert hydra_cfg.run.dir.startswith("outputs/")
    assert hydra_cfg.sweep.dir.startswith("multirun/")
    gitignore = (CONFIG_DIR.parent / ".gitignore").read_text().split()
    assert "outputs/" in gitignore
    assert "multirun/" in gitignore


@pytest.mark.parametrize("dataset, schedule", list(itertools.product(DATASETS, SCHEDULES)))
def test_every_combination_composes(compose_config, dataset, schedule):
    for model, optimizer in itertools.product(PAPER_MODELS, FIRST_ORDER):
        cfg = compose_config([f"dataset={dataset}", f"model={model}",
                              f"optimizer={optimizer}", f"schedule={schedule}"])
        assert cfg.dataset.name == dataset
        assert cfg.model.name == model
        assert OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize("group, bad, valid", [
    ("optimizer", "lbfgs", ["sgdm", "adamw"]),
    ("model", "resnet99", PAPER_MODELS),
    ("dataset", "imagenet", DATASETS),
    ("schedule", "cosine", SCHEDULES),
])
def test_unknown_option_lists_choices(compose_config, group, bad, valid):
    with pytest.raises(MissingConfigException) as info:
        compose_config([f"{group}={bad}"])
    message = str(info.value)
    assert f"{group}/{bad}" in message
    for name in valid:
        assert name in message


@pytest.mark.parametrize("name, num_classes, model_class_name", [
    ("resnet32", 10, "ResNet"), ("resnet18", 100, "ResNet"),
])
def test_model_configs_instantiate(compose_config, name, num_classes, model_class_name):
    cfg = compose_config([f"model={name}"])
    model = instantiate(cfg.model, num_classes=num_classes)
    assert type(model).__name__ == model_class_name
    assert model.fc.out_features == num_classes


@pytest.mark.parametrize("optimizer, expected", [("sgdm", torch.optim.SGD),
                                                 ("adamw", torch.optim.AdamW)])
def test_optimizer_configs_build(compose_config, optimizer, expected):
    cfg = compose_config([f"optimizer={optimizer}"])
    model = torch.nn.Linear(3, 2)
    built = build_optimizer(cfg.optimizer, model, steps_per_epoch=10)
    assert isinstance(built, expected)
    assert built.param_groups[0]["lr"] == cfg.optimizer.lr
    assert built.param_groups[0]["weight_decay"] == cfg.optimizer.weight_decay


def _learning_rates(compose_config, schedule: str, epochs: int) -> list[float]:
    cfg = compose_config([f"schedule={schedule}"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = build_scheduler(cfg.schedule, optimizer, epochs)
    rates = []
    for _ in range(epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_step_schedule_decays_at_half_and_three_quarters(compose_config):
    rates = _learning_rates(compose_config, "step", 200)
    assert rates[:100] == pytest.approx([0.1] * 100)
    assert rates[100:150] == pytest.approx([0.01] * 50)
    assert rates[150:] == pytest.approx([0.001] * 50)


def test_constant_schedule(compose_config):
    assert _learning_rates(compose_config, "constant", 7) == pytest.approx([0.1] * 7)


def test_invalid_milestone(compose_config):
    cfg = compose_config(["schedule.milestones=[0.5,1.5]"])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="milestone 1.5"):
        build_scheduler(cfg.schedule, optimizer, 10)


@pytest.mark.parametrize("preset, dataset, model", [
    ("paper_cifar10_resnet32", "cifar10", "resnet32"),
    ("paper_cifar10_resnet110", "cifar10", "resnet110"),
    ("paper_cifar100_resnet18", "cifar100", "resnet18"),
    ("paper_cifar100_resnet34", "cifar100", "resnet34"),
])
def test_paper_presets(compose_config, preset, dataset, model):
    cfg = compose_config([f"experiment={preset}"])
    assert cfg.dataset.name == dataset
    assert cfg.model.name == model
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.trainer.epochs == 200
    assert cfg.dataset.batch_size == 128
    assert list(cfg.schedule.milestones) == [0.5, 0.75]


def test_command_line_overrides_win_over_presets(compose_config):
    cfg = compose_config(["experiment=paper_cifar100_resnet18", "optimizer=adamw",
                          "trainer.epochs=100"])
    assert cfg.optimizer._target_ == "torch.optim.AdamW"
    assert cfg.trainer.epochs == 100
    assert cfg.model.name == "resnet18"


def test_demo_preset(compose_config):
    cfg = compose_config(["experiment=demo"])
    assert cfg.dataset.name == "cifar10"
    assert cfg.model.name == "resnet32"
    assert cfg.optimizer._target_ == "torch.optim.SGD"
    assert cfg.dataset.train_subset == 5000
    assert cfg.dataset.test_subset == 2000
    assert cfg.trainer.epochs == 3
    assert cfg.logger.mode in ("offline", "disabled")


def test_step_schedule_short_run_keeps_both_decays(compose_config):
    # With 3 epochs the two milestones fall after epochs 2 (of 1.5) and 3 (of 2.25).
    assert _learning_rates(compose_config, "step", 4) == pytest.approx([0.1, 0.1, 0.01, 0.001])
    assert _learning_rates(compose_config, "step", 3) == pytest.approx([0.1, 0.1, 0.01])
