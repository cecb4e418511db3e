"""The training loop: records, run.json, evaluation, resume, interruption, optimizer protocol."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException

import trainer.train as train_module
from data.cifar import channel_stats, load_cifar
from models.resnet import build_resnet
from tests.conftest import REPOSITORY_ROOT, tiny_run_overrides, write_synthetic_cifar
from trainer.checkpoint import load_checkpoint
from trainer.loggers import read_metrics
from trainer.train import resolve_device, train

REQUIRED_KEYS = ["epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                 "train_time_s", "eval_time_s", "cumulative_train_time_s", "lr"]
TIME_KEYS = {"train_time_s", "eval_time_s", "cumulative_train_time_s"}


class RecordingSGD(torch.optim.SGD):
    """SGD that implements the optional optimizer protocol and records how it was driven."""

    needs_model = True
    instances: list["RecordingSGD"] = []

    def __init__(self, model, steps_per_epoch, lr=0.05):
        super().__init__(model.parameters(), lr=lr)
        self.steps_per_epoch = steps_per_epoch
        self.index_batches: list[torch.Tensor] = []
        self.steps = 0
        self.steps_without_indices = 0
        self._indices_pending = False
        RecordingSGD.instances.append(self)

    def set_sample_indices(self, indices):
        self.index_batches.append(indices.clone())
        self._indices_pending = True

    def step(self, closure=None):
        if not self._indices_pending:
            self.steps_without_indices += 1
        self._indices_pending = False
        self.steps += 1
        return super().step(closure)

    def stats(self):
        indices = torch.cat(self.index_batches) if self.index_batches else torch.zeros(0)
        return {"steps": self.steps, "indices_seen": int(indices.numel()),
                "index_sum": int(indices.sum()), "steps_without_indices":
                self.steps_without_indices}


def _without_times(records):
    return [{key: value for key, value in record.items() if key not in TIME_KEYS}
            for record in records]


def test_records_metrics_and_run_json(tmp_path, synthetic_cifar_root, compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=2))
    run_dir = tmp_path / "run"
    records = train(cfg, run_dir)

    assert len(records) == 2
    for record in records:
        assert list(record)[:len(REQUIRED_KEYS)] == REQUIRED_KEYS
    assert read_metrics(run_dir / "metrics.jsonl") == records

    # Step schedule over 2 epochs: milestones after epochs 1 and 2.
    assert records[0]["lr"] == pytest.approx(0.1)
    assert records[1]["lr"] == pytest.approx(0.01)
    assert records[1]["cumulative_train_time_s"] == pytest.approx(
        records[0]["train_time_s"] + records[1]["train_time_s"])
    assert all(record["train_time_s"] > 0 and record["eval_time_s"] > 0 for record in records)

    info = json.loads((run_dir / "run.json").read_text())
    assert info["schema_version"] == 1
    assert info["status"] == "completed"
    assert info["config"]["dataset"]["root"] == str(synthetic_cifar_root)
    assert info["config"]["model"]["name"] == "resnet8"
    assert len(info["git"]["commit"]) == 40
    assert info["device"]["type"] == "cpu"
    assert info["device"]["name"]
    assert torch.__version__.startswith(info["versions"]["torch"])
    assert info["data"]["train_images"] == 64
    assert info["final"] == records[-1]


def test_test_metrics_match_independent_evaluation(tmp_path, synthetic_cifar_root,
                                                   compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=1))
    records = train(cfg, tmp_path / "run")

    # Evaluate the checkpointed model with a NumPy normalisation of the raw test images.
    state = load_checkpoint(tmp_path / "run", torch.device("cpu"))
    model = build_resnet("resnet8", 10)
    model.load_state_dict(state["model"])
    model.eval()
    train_split, test_split = load_cifar("cifar10", synthetic_cifar_root)
    train_pixels = train_split.images.numpy().reshape(-1, 3) / 255.0
    inputs = (test_split.images.numpy() / 255.0 - train_pixels.mean(0)) / train_pixels.std(0)
    inputs = torch.from_numpy(inputs.transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        logits = model(inputs)

    expected_loss = F.cross_entropy(logits, test_split.labels).item()
    expected_accuracy = (logits.argmax(1) == test_split.labels).float().mean().item()
    assert records[0]["test_loss"] == pytest.approx(expected_loss, rel=1e-4)
    assert records[0]["test_accuracy"] == pytest.approx(expected_accuracy)


def test_interrupt_then_resume_equals_uninterrupted(tmp_path, synthetic_cifar_root,
                                                    compose_config, monkeypatch):
    overrides = tiny_run_overrides(synthetic_cifar_root, epochs=3)
    uninterrupted = train(compose_config(overrides), tmp_path / "full")

    # Interrupt the second epoch as Ctrl-C would, from inside the loop.
    real_train_epoch = train_module.train_epoch
    calls = []

    def interrupted_train_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", interrupted_train_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(compose_config(overrides), tmp_path / "part")
    monkeypatch.setattr(train_module, "train_epoch", real_train_epoch)

    assert len(read_metrics(tmp_path / "part" / "metrics.jsonl")) == 1
    assert load_checkpoint(tmp_path / "part", torch.device("cpu"))["epoch"] == 1
    assert json.loads((tmp_path / "part" / "run.json").read_text())["status"] == "interrupted"

    resumed = train(compose_config(overrides + [f"trainer.resume={tmp_path / 'part'}"]),
                    tmp_path / "resumed")

    assert _without_times(resumed) == _without_times(uninterrupted)
    assert _without_times(read_metrics(tmp_path / "resumed" / "metrics.jsonl")) == \
        _without_times(uninterrupted)
    full_state = load_checkpoint(tmp_path / "full", torch.device("cpu"))
    resumed_state = load_checkpoint(tmp_path / "resumed", torch.device("cpu"))
    for key, value in full_state["model"].items():
        assert torch.equal(value, resumed_state["model"][key]), key

    # The run learns the synthetic colours: the loss falls over the three epochs.
    assert uninterrupted[-1]["train_loss"] < uninterrupted[0]["train_loss"]


def test_optimizer_protocol(tmp_path, compose_config):
    # 60 images in batches of 16: three full batches and a partial one of 12.
    root = write_synthetic_cifar(tmp_path / "data60", train_size=60, test_size=20)
    RecordingSGD.instances.clear()
    cfg = compose_config(tiny_run_overrides(root, epochs=2) + [
        "~optimizer", f"+optimizer._target_={__name__}.RecordingSGD",
        "+optimizer._partial_=true"])
    records = train(cfg, tmp_path / "run")

    optimizer = RecordingSGD.instances[-1]
    assert optimizer.steps_per_epoch == 4
    assert [len(batch) for batch in optimizer.index_batches[:4]] == [16, 16, 16, 12]
    for epoch in range(2):
        seen = torch.cat(optimizer.index_batches[4 * epoch:4 * epoch + 4])
        assert sorted(seen.tolist()) == list(range(60))

    for record in records:
        assert record["steps"] == 4
        assert record["indices_seen"] == 60
        assert record["index_sum"] == 60 * 59 // 2
        assert record["steps_without_indices"] == 0


def test_divergence_stops_and_keeps_checkpoint(tmp_path, synthetic_cifar_root,
                                               compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=3)
                         + ["optimizer.lr=1e30", "optimizer.weight_decay=0"])
    records = train(cfg, tmp_path / "run")

    assert len(records) == 1
    assert not math.isfinite(records[0]["train_loss"])
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["train_loss"] is None
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    assert json.loads((tmp_path / "run" / "run.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize("override, fragment", [
    ("trainer.epochs=0", "trainer.epochs=0"),
    ("trainer.autocast=fp8", "trainer.autocast='fp8'"),
    ("trainer.log_every=0", "trainer.log_every=0"),
    ("trainer.device=tpu", "trainer.device='tpu'"),
    ("dataset.train_subset=65", "dataset.train_subset=65"),
    ("dataset.name=cifar1000", "cifar10, cifar100"),
    ("model.name=resnet99", "resnet32"),
    ("logger.mode=sometimes", "offline, online, disabled"),
    ("dataset.num_classes=100", "dataset.num_classes=100"),
])
def test_bad_settings_raise_clear_errors(tmp_path, synthetic_cifar_root, compose_config,
                                         override, fragment):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=1) + [override])
    # Hydra reports errors raised while instantiating the model as InstantiationException,
    # with the original message inside.
    with pytest.raises((ValueError, InstantiationException)) as info:
        train(cfg, tmp_path / "run")
    assert fragment in str(info.value)


def test_missing_data_dir_names_path(tmp_path, compose_config):
    cfg = compose_config(tiny_run_overrides(tmp_path / "absent", epochs=1))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "absent")):
        train(cfg, tmp_path / "run")


def test_resume_from_missing_checkpoint(tmp_path, synthetic_cifar_root, compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=1)
                         + [f"trainer.resume={tmp_path / 'nothing'}"])
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        train(cfg, tmp_path / "run")


def test_cuda_request_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="trainer.device=cpu"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")


def _command(data_root: Path, *extra: str, multirun: bool = False) -> list[str]:
    overrides = [item for item in tiny_run_overrides(data_root) if not
                 item.startswith("trainer.epochs")]
    # Hydra's parser accepts --multirun only before the overrides.
    flags = ["--multirun"] if multirun else []
    return [sys.executable, "-m", "scripts.train", *flags, *overrides, *extra]


def test_ctrl_c_keeps_checkpoint_and_metrics(tmp_path, synthetic_cifar_root):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        _command(synthetic_cifar_root, "trainer.epochs=1000", f"hydra.run.dir={run_dir}"),
        cwd=REPOSITORY_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        metrics = run_dir / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.read_text().count("\n") >= 1):
            assert process.poll() is None, process.communicate()[0]
            assert time.monotonic() < deadline, "no epoch finished within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()

    assert process.returncode == 130, output
    assert "continue with trainer.resume=" in output
    lines = read_metrics(run_dir / "metrics.jsonl")
    state = load_checkpoint(run_dir, torch.device("cpu"))
    assert state["epoch"] == len(lines) >= 1
    assert state["records"] == lines
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"


def test_sweep_runs_each_job_with_offline_wandb(tmp_path, synthetic_cifar_root):
    sweep_dir = tmp_path / "sweep"
    env = dict(os.environ, WANDB_SILENT="true")
    result = subprocess.run(
        _command(synthetic_cifar_root, "optimizer=sgdm,adamw", "trainer.epochs=1",
                 "logger.mode=offline", f"hydra.sweep.dir={sweep_dir}", multirun=True),
        cwd=REPOSITORY_ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr

    for job, target in (("0", "torch.optim.SGD"), ("1", "torch.optim.AdamW")):
        job_dir = sweep_dir / job
        assert len(read_metrics(job_dir / "metrics.jsonl")) == 1
        info = json.loads((job_dir / "run.json").read_text())
        assert info["config"]["optimizer"]["_target_"] == target
        assert info["status"] == "completed"
        assert len(list((job_dir / "wandb").glob("offline-run-*"))) == 1


class FakeWandbRun:
    """Stand-in for a W&B run, because no W&B server is reachable from the tests."""

    def __init__(self, **kwargs):
        self.init_kwargs = kwargs
        self.logged: list[tuple[dict, int]] = []
        self.exit_codes: list[int] = []
        self.dir = str(Path(kwargs["dir"]) / "wandb" / "run" / "files")

    def log(self, record, step):
        self.logged.append((dict(record), step))

    def finish(self, exit_code=0):
        self.exit_codes.append(exit_code)


def test_online_wandb_gets_records_and_finish(tmp_path, synthetic_cifar_root, compose_config,
                                              monkeypatch):
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **kwargs: runs.append(FakeWandbRun(**kwargs))
                        or runs[-1])
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root, epochs=2)
                         + ["logger.mode=online", "logger.project=demo-project", "seed=3"])
    records = train(cfg, tmp_path / "run")

    run = runs[0]
    assert run.init_kwargs["mode"] == "online"
    assert run.init_kwargs["project"] == "demo-project"
    assert run.init_kwargs["name"] == "cifar10-resnet8-sgd-seed3"
    assert run.init_kwargs["config"]["seed"] == 3
    assert run.logged == [(record, record["epoch"]) for record in records]
    assert run.exit_codes == [0]
