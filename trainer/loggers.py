"""Destinations of per-epoch records: ``metrics.jsonl`` always, and W&B when configured."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

from omegaconf import DictConfig, OmegaConf

logger = logging.getLogger(__name__)

WANDB_MODES = ("offline", "online", "disabled")


class MetricsFile:
    """Append-only JSON-lines file with one record per epoch, flushed to disk after each line."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def rewrite(self, records: list[dict]) -> None:
        """Replace the file's contents with ``records`` (used when a run resumes)."""
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            for record in records:
                file.write(_to_json(record) + "\n")
        os.replace(temporary, self.path)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as file:
            file.write(_to_json(record) + "\n")
            file.flush()
            os.fsync(file.fileno())


def _to_json(record: dict) -> str:
    # Strict JSON has no NaN or infinity, so a diverged loss is written as null.
    clean = {key: (None if isinstance(value, float) and not math.isfinite(value) else value)
             for key, value in record.items()}
    return json.dumps(clean, allow_nan=False)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Read a ``metrics.jsonl`` file back into a list of records."""
    with open(path, encoding="utf-8") as file:
        return [json.loads(line) for line in file if line.strip()]


class NullLogger:
    """Logger for ``logger=none``: records go to ``metrics.jsonl`` only."""

    def log(self, record: dict, step: int) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger:
    """Weights & Biases run for one training job.

    ``mode="offline"`` writes the run under ``{run_dir}/wandb`` for a later ``wandb sync``;
    ``"online"`` needs an account and network access; ``"disabled"`` makes every call a no-op
    inside wandb itself.
    """

    def __init__(self, logger_cfg: DictConfig, run_dir: Path, config: dict,
                 run_name: Optional[str]):
        mode = logger_cfg.get("mode", "offline")
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r} is invalid; valid modes: "
                             f"{', '.join(WANDB_MODES)}")
        import wandb

        tags = logger_cfg.get("tags")
        self.run = wandb.init(
            project=logger_cfg.get("project"),
            entity=logger_cfg.get("entity"),
            group=logger_cfg.get("group"),
            tags=list(tags) if tags else None,
            name=logger_cfg.get("run_name") or run_name,
            mode=mode,
            dir=str(run_dir),
            config=config,
        )
        if mode == "offline":
            logger.info("W&B is offline; upload later with `wandb sync %s`",
                        Path(self.run.dir).parent)

    def log(self, record: dict, step: int) -> None:
        self.run.log(record, step=step)

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def build_logger(logger_cfg: DictConfig, run_dir: Path, config: dict,
                 run_name: Optional[str] = None) -> NullLogger | WandbLogger:
    """Create the logger named by ``logger_cfg.name`` (``wandb`` or ``none``)."""
    name = logger_cfg.get("name")
    if name == "wandb":
        return WandbLogger(logger_cfg, run_dir, config, run_name)
    if name == "none":
        return NullLogger()
    raise ValueError(f"logger.name={name!r} is invalid; valid names: wandb, none "
                     f"(config: {OmegaConf.to_yaml(logger_cfg).strip()})")
