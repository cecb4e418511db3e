"""Presets for the tables and figures of the FNGD paper (Ou et al., arXiv 2403.03473), the
smoke scale, grids and launchers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import scripts.gpu_slots as gpu_slots
from models.resnet import build_resnet
from tests.conftest import CONFIG_DIR, REPOSITORY_ROOT
from trainer.optim import build_optimizer

# Epoch budgets of Ou et al.: SGD-m 200, every other method 100 (and the added control).
FULL_EPOCHS = {"sgdm": 200, "sgdm_100ep": 100, "adamw": 100, "kfac": 100, "shampoo": 100,
               "eva": 100, "fngd": 100, "ngd": 100}
OPTIMIZER_TARGETS = {"sgdm": "torch.optim.SGD", "sgdm_100ep": "torch.optim.SGD",
                     "adamw": "torch.optim.AdamW", "kfac": "baselines.KFAC",
                     "shampoo": "baselines.Shampoo", "eva": "baselines.Eva",
                     "fngd": "fngd.FNGD", "ngd": "fngd.FNGD"}
COLUMNS = {"resnet32": "cifar10", "resnet110": "cifar10", "resnet18": "cifar100",
           "resnet34": "cifar100"}

# Each preset: its sweep's methods and models (None: the preset has no model axis).
PRESETS = {
    "table2": (["sgdm", "sgdm_100ep", "kfac", "shampoo", "eva", "fngd"], None),
    "table3": (["sgdm", "kfac", "shampoo", "eva", "fngd"],
               ["resnet32", "resnet110", "resnet18", "resnet34"]),
    "fig4": (["fngd", "ngd"], None),
    "fig5": (["sgdm", "sgdm_100ep", "kfac", "shampoo", "eva", "fngd"], ["resnet32", "resnet110"]),
    "fig6": (["sgdm", "sgdm_100ep", "kfac", "shampoo", "eva", "fngd"], ["resnet18", "resnet34"]),
    "fig7": (["adamw", "kfac", "shampoo", "fngd"], None),
    "fig8": (["sgdm", "fngd"], None),
    "fig8_transformer": (["adamw", "fngd"], None),
}


def sweep_values(cfg, key: str) -> list[str]:
    return str(cfg.hydra.sweeper.params[key]).split(",")


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_sweeps(compose_config, preset):
    arms, columns = PRESETS[preset]
    cfg = compose_config([f"experiment={preset}"], return_hydra_config=True)

    assert cfg.benchmark.name == preset
    assert sweep_values(cfg, "experiment/arm") == arms
    assert sweep_values(cfg, "seed") == ["0", "1", "2"]
    if columns is not None:
        assert sweep_values(cfg, "experiment/column") == columns
    assert cfg.scale.name == "full"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_job_of_a_preset(compose_config, preset):
    arms, columns = PRESETS[preset]
    for column in columns or [None]:
        for arm in arms:
            overrides = [f"experiment={preset}", f"experiment/arm={arm}"]
            if column is not None:
                overrides.append(f"experiment/column={column}")
            cfg = compose_config(overrides)

            assert cfg.benchmark.arm == arm
            assert cfg.optimizer._target_ == OPTIMIZER_TARGETS[arm]
            if preset.startswith("fig8"):
                assert cfg.trainer.epochs == 3
                assert cfg.trainer.profile is True
            else:
                assert cfg.trainer.epochs == FULL_EPOCHS[arm]
                assert cfg.trainer.profile is False
            if column is not None:
                assert cfg.model.name == column
                assert cfg.dataset.name == COLUMNS[column]
            if cfg.dataset.name == "multi30k":
                assert cfg.dataset.batch_size == 64
                assert cfg.model.d_model == 512
                assert cfg.schedule._target_ == "trainer.schedule.constant"
            else:
                assert cfg.dataset.batch_size == 128
                assert list(cfg.schedule.milestones) == [0.5, 0.75]
                assert cfg.schedule.gamma == 0.1
            if arm in ("fngd", "ngd"):
                assert cfg.optimizer.mode == arm
            assert OmegaConf.to_container(cfg, resolve=True)


def test_table_presets_targets_and_models(compose_config):
    table2 = compose_config(["experiment=table2"])
    assert table2.model.name == "resnet110"
    assert table2.dataset.name == "cifar10"
    assert table2.benchmark.target_test_accuracy == 0.935

    fig3 = compose_config(["experiment=fig3"])
    assert fig3.model.name == "resnet32"
    assert list(fig3.gram.layers) == ["conv1", "stages.0.0.conv1", "stages.2.4.conv2", "fc"]
    fig4 = compose_config(["experiment=fig4", "experiment/arm=ngd"])
    assert fig4.optimizer.mode == "ngd"
    assert compose_config(["experiment=fig4"]).optimizer.mode == "fngd"


def test_control_differs_from_sgdm_only_in_budget(compose_config):
    sgdm = OmegaConf.to_container(compose_config(["experiment=table2"]))
    control = OmegaConf.to_container(compose_config(["experiment=table2",
                                                     "experiment/arm=sgdm_100ep"]))

    assert sgdm["trainer"].pop("epochs") == 200
    assert control["trainer"].pop("epochs") == 100
    assert sgdm["benchmark"].pop("arm") == "sgdm"
    assert control["benchmark"].pop("arm") == "sgdm_100ep"
    assert sgdm["benchmark"].pop("smoke_epochs") == 6
    assert control["benchmark"].pop("smoke_epochs") == 3
    assert sgdm == control


@pytest.mark.parametrize("preset, arm, epochs", [
    ("table2", "sgdm", 6), ("table2", "fngd", 3), ("table2", "sgdm_100ep", 3),
    ("fig8", "fngd", 2), ("fig7", "adamw", 3),
])
def test_smoke_scale_keeps_the_comparison(compose_config, preset, arm, epochs):
    full = compose_config([f"experiment={preset}", f"experiment/arm={arm}"])
    smoke = compose_config([f"experiment={preset}", f"experiment/arm={arm}", "scale=smoke"])

    assert smoke.scale.name == "smoke"
    assert smoke.trainer.epochs == epochs
    for key in ("dataset.name", "dataset.batch_size", "optimizer", "schedule",
                "benchmark.name", "benchmark.arm", "trainer.profile", "seed"):
        assert OmegaConf.select(smoke, key) == OmegaConf.select(full, key), key
    assert smoke.dataset.train_subset is not None
    assert smoke.dataset.test_subset is not None


@pytest.mark.parametrize("column, stand_in", [("resnet32", None), ("resnet110", "resnet20"),
                                              ("resnet18", None), ("resnet34", "resnet18")])
def test_smoke_stand_in_models(compose_config, column, stand_in):
    cfg = compose_config(["experiment=table3", f"experiment/column={column}", "scale=smoke"])

    assert cfg.model.name == (stand_in or column)
    assert cfg.scale.replaced_model == (column if stand_in else None)
    assert cfg.dataset.name == COLUMNS[column]
    assert cfg.dataset.train_subset == 1024


def test_smoke_transformer_and_plain_runs(compose_config):
    translation = compose_config(["experiment=fig7", "scale=smoke"])
    assert translation.model.d_model == 128
    assert translation.model.layers == 2
    assert translation.dataset.train_subset == 2048
    assert translation.dataset.val_subset == 200
    assert translation.scale.replaced_model == "transformer-base"

    plain = compose_config(["scale=smoke", "model=resnet110"])
    assert plain.trainer.epochs == 3
    assert plain.model.name == "resnet20"
    assert compose_config(["model=resnet110"]).model.name == "resnet110"


ARM_FILES = sorted(path.stem for path in (CONFIG_DIR / "experiment" / "arm").glob("*.yaml"))


@pytest.mark.parametrize("arm", ARM_FILES)
def test_grid_of_each_arm(compose_config, arm):
    cfg = compose_config(["experiment=table3", "experiment/column=resnet32",
                          f"+experiment/grid={arm}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params

    assert params["experiment/arm"] == arm
    assert sweep_values(cfg, "seed") == ["0", "1", "2"]
    grid_keys = list(cfg.benchmark.grid)
    assert grid_keys[0] == "optimizer.lr"
    job = compose_config(["experiment=table3", f"experiment/arm={arm}"])
    for key in grid_keys:
        values = sweep_values(cfg, key)
        assert len(values) >= 3
        # Each grid key names an option the method has, so the sweep cannot fail on it,
        # and the method's default value is one of the grid's points.
        default = OmegaConf.select(job, key)
        assert default is not None, key
        assert float(default) in [float(value) for value in values], key


@pytest.mark.parametrize("arm", ARM_FILES)
def test_arm_optimizers_build(compose_config, arm):
    cfg = compose_config(["experiment=table3", f"experiment/arm={arm}"])
    model = build_resnet("resnet8", 10)

    optimizer = build_optimizer(cfg.optimizer, model, steps_per_epoch=4)

    assert optimizer.param_groups[0]["lr"] == cfg.optimizer.lr


def test_launcher_presets(compose_config):
    joblib = compose_config(["hydra/launcher=joblib_gpus"], return_hydra_config=True)
    launcher = joblib.hydra.launcher
    assert launcher._target_.endswith("JoblibLauncher")
    assert OmegaConf.to_container(launcher)["n_jobs"] == "${fngd_gpu_count:}"

    slurm = compose_config(["hydra/launcher=slurm_gpu"], return_hydra_config=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.gpus_per_node == 1
    assert slurm.hydra.launcher.tasks_per_node == 1


def test_train_script_registers_resolvers():
    import scripts.train  # noqa: F401  (registers the resolvers on import)

    assert OmegaConf.has_resolver("fngd_gpu_count")
    assert OmegaConf.has_resolver("fngd_worker_gpu")


# --------------------------------------------------------------------------------------------
# GPU slots: file locks stand in for GPUs, so that this runs without any


@pytest.fixture
def released():
    gpu_slots.release_gpu()
    yield
    gpu_slots.release_gpu()


def _slot_from_child(directory: Path, count: int = 2) -> str:
    """Ask a fresh process, as a new joblib worker would, for a GPU."""
    code = ("import sys; from pathlib import Path; from scripts.gpu_slots import worker_gpu\n"
            "try:\n"
            f"    print(worker_gpu(count={count}, directory=Path(sys.argv[1]), timeout_s=0.0))\n"
            "except TimeoutError as error:\n"
            "    print(f'timeout: {error}')\n")
    result = subprocess.run([sys.executable, "-c", code, str(directory)], cwd=REPOSITORY_ROOT,
                            capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip()


def test_workers_get_distinct_gpus(tmp_path, released):
    first = gpu_slots.worker_gpu(count=2, directory=tmp_path)

    assert first == "cuda:0"
    assert gpu_slots.worker_gpu(count=2, directory=tmp_path) == "cuda:0"
    assert _slot_from_child(tmp_path) == "cuda:1"

    # The child has exited, so its GPU is free again; ours stays held.
    assert _slot_from_child(tmp_path) == "cuda:1"


def test_all_gpus_held_times_out(tmp_path, released):
    gpu_slots.worker_gpu(count=1, directory=tmp_path)

    result = _slot_from_child(tmp_path, count=1)

    assert result.startswith("timeout: all 1 GPUs stayed locked")


def test_gpu_count_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        gpu_slots.gpu_count()
