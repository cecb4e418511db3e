"""The shared training loop: epochs, evaluation, timing, metrics, checkpoints and loggers.

``train(cfg)`` runs one job from a composed config and returns its per-epoch records. Each
record contains ``epoch``, ``train_loss``, ``train_<metric>`` for every extra sum of the
workload's loss, the workload's evaluation metrics (``test_loss``, ``test_accuracy`` for
images), ``train_time_s``, ``eval_time_s``, ``cumulative_train_time_s``, ``lr`` and, for an
optimizer with ``stats()``, each counter's increase during the epoch.

Optimizer protocol, duck-typed: ``set_sample_indices(indices)`` is called before every
forward pass with the batch's dataset indices, ``stats()`` returns cumulative int counters,
and the loop makes exactly one ``optimizer.step()`` per batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from tqdm.auto import tqdm

from trainer.checkpoint import (CHECKPOINT_NAME, CHECKPOINT_VERSION, capture_rng_state,
                                load_checkpoint, restore_rng_state, save_checkpoint)
from trainer.loggers import MetricsFile, NullLogger, WandbLogger, build_logger
from trainer.optim import build_optimizer
from trainer.profile import StepProfiler
from trainer.run_info import collect_run_info
from trainer.schedule import build_scheduler
from trainer.workload import Batches, EpochTotals, Workload, build_workload

logger = logging.getLogger(__name__)

AUTOCAST_MODES = ("none", "bf16")

# Config keys that may differ between a checkpoint and the run resuming from it without a
# warning: where the data lives and how the run is shown do not change its results.
RESUME_IGNORED_KEYS = ("trainer.resume", "trainer.device", "trainer.progress",
                       "trainer.log_every", "dataset.root", "dataset.download", "logger.")


def resolve_device(name: str) -> torch.device:
    """Map ``trainer.device`` (auto, cpu, cuda or cuda:N) to a device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if isinstance(name, str) and (name == "cuda" or name.startswith("cuda:")):
        if not torch.cuda.is_available():
            raise ValueError(f"trainer.device={name} was requested but no CUDA device is "
                             "visible; use trainer.device=cpu or trainer.device=auto")
        return torch.device(name)
    raise ValueError(f"trainer.device={name!r} is invalid; valid values: auto, cpu, cuda, "
                     "cuda:N")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) with ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed!r} is invalid; use an integer from 0 to 2**32 - 1")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _synchronise(device: torch.device) -> None:
    # Kernels run asynchronously on CUDA; timestamps must wait for them.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(mode: str, device: torch.device) -> contextlib.AbstractContextManager:
    if mode == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _resolve_run_dir(run_dir: Optional[str | os.PathLike]) -> Path:
    if run_dir is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            raise ValueError("train() needs run_dir when it is called outside a Hydra job")
        run_dir = HydraConfig.get().runtime.output_dir
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _validate_trainer_config(trainer_cfg: DictConfig) -> None:
    epochs = trainer_cfg.epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"trainer.epochs={epochs!r} is invalid; use a positive integer")
    if trainer_cfg.autocast not in AUTOCAST_MODES:
        raise ValueError(f"trainer.autocast={trainer_cfg.autocast!r} is invalid; valid values: "
                         f"{', '.join(AUTOCAST_MODES)}")
    log_every = trainer_cfg.log_every
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"trainer.log_every={log_every!r} is invalid; use a positive number "
                         "of steps")


def _write_json(path: Path, data: dict) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as file:
        json.dump(data, file, indent=2, default=str)
        file.write("\n")
    os.replace(temporary, path)


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _warn_config_differences(saved: dict, current: dict) -> None:
    saved_flat, current_flat = _flatten(saved), _flatten(current)
    differences = [
        f"{key}: {saved_flat.get(key)!r} -> {current_flat.get(key)!r}"
        for key in sorted(set(saved_flat) | set(current_flat))
        if saved_flat.get(key) != current_flat.get(key)
        and not any(key == ignored or key.startswith(ignored) for ignored in RESUME_IGNORED_KEYS)
    ]
    if differences:
        logger.warning("Resuming with a config that differs from the checkpoint's, so the "
                       "results will differ from an uninterrupted run: %s", "; ".join(differences))


def _run_name(cfg: DictConfig) -> str:
    model_name = cfg.model.get("name") or str(cfg.model.get("_target_", "model")).split(".")[-1]
    optimizer_name = str(cfg.optimizer.get("_target_", "optimizer")).split(".")[-1].lower()
    return f"{cfg.dataset.name}-{model_name}-{optimizer_name}-seed{cfg.seed}"


def _format_record(record: dict, epochs: int) -> str:
    parts = []
    for key, value in record.items():
        if key == "epoch":
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return f"epoch {record['epoch']}/{epochs}: " + ", ".join(parts)


def _optimizer_counters(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    stats = getattr(optimizer, "stats", None)
    if stats is None:
        return {}
    return {key: value for key, value in stats().items()
            if isinstance(value, int) and not isinstance(value, bool)}


def train_epoch(workload: Workload, model: nn.Module, optimizer: torch.optim.Optimizer,
                batches: Batches, autocast: contextlib.AbstractContextManager,
                device: torch.device, progress: Optional[tqdm], log_every: int,
                profiler: Optional[StepProfiler] = None) -> tuple[dict[str, float], float]:
    """Train for one pass over ``batches``; return the train metrics and the seconds taken.

    The time runs from before the first batch is assembled to after the last update has
    finished on the device, so it covers data loading, forward, backward, preconditioning and
    the update, and nothing else. A ``profiler`` times each step's forward, backward and
    ``optimizer.step()`` phases.
    """
    model.train()
    totals = EpochTotals(device)
    set_sample_indices = getattr(optimizer, "set_sample_indices", None)
    phase = profiler.phase if profiler is not None else _untimed_phase
    steps = 0

    _synchronise(device)
    start = time.perf_counter()

    for batch in batches:
        if set_sample_indices is not None:
            set_sample_indices(batch.indices)
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"), autocast:
            output = workload.loss(model, batch)
        with phase("backward"):
            (output.loss_sum / output.count).backward()
        with phase("step"):
            optimizer.step()
        totals.add(output)
        steps += 1

        if progress is not None:
            progress.update(1)
            # Reading the loss waits for the device, so the running loss is shown only
            # every log_every steps.
            if steps % log_every == 0:
                progress.set_postfix(loss=f"{totals.loss.item() / totals.count.item():.4f}")

    _synchronise(device)
    elapsed = time.perf_counter() - start

    if steps != len(batches):
        raise RuntimeError(f"the workload produced {steps} batches in an epoch but reported "
                           f"len() = {len(batches)}; optimizers that count steps per epoch "
                           "need the two to agree")
    return totals.means("train"), elapsed


def _untimed_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def evaluate(workload: Workload, model: nn.Module, autocast: contextlib.AbstractContextManager,
             device: torch.device) -> tuple[dict[str, float], float]:
    """Run the workload's evaluation; return its metrics and the seconds taken."""
    model.eval()
    _synchronise(device)
    start = time.perf_counter()
    with torch.no_grad(), autocast:
        metrics = workload.evaluate(model)
    _synchronise(device)
    return metrics, time.perf_counter() - start


def train(cfg: DictConfig, run_dir: Optional[str | os.PathLike] = None) -> list[dict]:
    """Train and evaluate the model configured by ``cfg``; return the per-epoch records.

    Writes ``metrics.jsonl``, ``run.json`` and ``checkpoint.pt`` to ``run_dir`` (by default
    the Hydra job's output directory). With ``trainer.resume`` set to a checkpoint or a run
    directory, the run continues from that checkpoint's last epoch; on CPU the records then
    equal those of an uninterrupted run, apart from the times. A ``KeyboardInterrupt`` keeps
    the last checkpoint and the metrics written so far, then propagates.
    """
    run_dir = _resolve_run_dir(run_dir)
    trainer_cfg = cfg.trainer
    _validate_trainer_config(trainer_cfg)
    epochs = trainer_cfg.epochs
    config = OmegaConf.to_container(cfg, resolve=True)

    device = resolve_device(trainer_cfg.device)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(trainer_cfg.cudnn_benchmark)

    workload = build_workload(cfg, device)
    model = workload.build_model().to(device)
    batches = workload.train_batches()
    optimizer = build_optimizer(cfg.optimizer, model, steps_per_epoch=len(batches))
    scheduler = build_scheduler(cfg.schedule, optimizer, epochs)
    profiler = StepProfiler(device) if trainer_cfg.get("profile") else None
    if profiler is not None and not profiler.attach(optimizer):
        logger.info("trainer.profile: %s has no profiler hook, so its work is timed as a "
                    "whole in the update phase", type(optimizer).__name__)

    records: list[dict] = []
    start_epoch = 0
    cumulative_train_time = 0.0
    resume = trainer_cfg.get("resume")
    if resume:
        state = load_checkpoint(resume, device)
        _warn_config_differences(state["config"], config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        workload.load_state_dict(state["workload"])
        restore_rng_state(state["rng"])
        records = list(state["records"])
        start_epoch = state["epoch"]
        cumulative_train_time = state["cumulative_train_time_s"]
        logger.info("Resuming from %s after epoch %d", resume, start_epoch)

    metrics_file = MetricsFile(run_dir / "metrics.jsonl")
    metrics_file.rewrite(records)
    checkpoint_path = run_dir / CHECKPOINT_NAME

    run_info = collect_run_info(config, device)
    run_info.update(status="running", run_dir=str(run_dir), resumed_from=resume,
                    steps_per_epoch=len(batches), data=workload.describe(),
                    parameters=sum(p.numel() for p in model.parameters()))
    _write_json(run_dir / "run.json", run_info)
    workload.save_artifacts(run_dir)
    logger.info("Training %s on %s (%s) for %d epochs; run directory %s",
                _run_name(cfg), device, run_info["device"]["name"], epochs, run_dir)

    autocast_mode = trainer_cfg.autocast
    status = "failed"
    exit_code = 1
    epoch = start_epoch
    metric_logger: NullLogger | WandbLogger = NullLogger()
    try:
        # Inside the try, so that a logger that fails to start still leaves run.json final.
        metric_logger = build_logger(cfg.logger, run_dir, config, _run_name(cfg))
        for epoch in range(start_epoch + 1, epochs + 1):
            lr = optimizer.param_groups[0]["lr"]
            counters_before = _optimizer_counters(optimizer)
            progress = tqdm(total=len(batches), desc=f"epoch {epoch}/{epochs}", leave=False,
                            dynamic_ncols=True, disable=not trainer_cfg.progress)

            try:
                train_metrics, train_time = train_epoch(
                    workload, model, optimizer, batches, _autocast(autocast_mode, device),
                    device, progress, trainer_cfg.log_every, profiler)
            finally:
                progress.close()
            cumulative_train_time += train_time
            eval_metrics, eval_time = evaluate(workload, model, _autocast(autocast_mode, device),
                                               device)
            scheduler.step()

            counters_after = _optimizer_counters(optimizer)
            record = {"epoch": epoch, **train_metrics, **eval_metrics,
                      "train_time_s": train_time, "eval_time_s": eval_time,
                      "cumulative_train_time_s": cumulative_train_time, "lr": lr}
            for key, value in counters_after.items():
                record[key] = value - counters_before.get(key, 0)
            if profiler is not None:
                record.update(profiler.epoch_summary(train_time))
            records.append(record)

            if not math.isfinite(record["train_loss"]):
                # The weights are no longer usable, so the last good checkpoint stays.
                metrics_file.append(record)
                metric_logger.log(record, step=epoch)
                logger.error("train_loss is %s in epoch %d: the run diverged and stops here; "
                             "a lower optimizer.lr usually helps", record["train_loss"], epoch)
                status, exit_code = "diverged", 1
                break

            if trainer_cfg.checkpoint:
                checkpoint_start = time.perf_counter()
                save_checkpoint({
                    "version": CHECKPOINT_VERSION,
                    "epoch": epoch,
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "workload": workload.state_dict(),
                    "rng": capture_rng_state(),
                    "records": records,
                    "cumulative_train_time_s": cumulative_train_time,
                    "config": config,
                }, checkpoint_path)
                logger.debug("Checkpoint written in %.2f s", time.perf_counter() - checkpoint_start)

            metrics_file.append(record)
            metric_logger.log(record, step=epoch)
            logger.info(_format_record(record, epochs))
        else:
            status, exit_code = "completed", 0

    except KeyboardInterrupt:
        status, exit_code = "interrupted", 130
        if trainer_cfg.checkpoint and checkpoint_path.exists():
            logger.warning("Interrupted during epoch %d. %s contains the last completed epoch, "
                           "so continue with trainer.resume=%s", epoch, checkpoint_path,
                           checkpoint_path)
        else:
            logger.warning("Interrupted during epoch %d before any checkpoint was written",
                           epoch)
        raise

    finally:
        metric_logger.finish(exit_code)
        run_info.update(status=status, epochs_completed=len(records))
        if records:
            run_info["final"] = records[-1]
        _write_json(run_dir / "run.json", run_info)

    return records
