"""Read finished training runs back: ``run.json`` and ``metrics.jsonl`` from run folders, or
the same records from W&B, into ``Run`` objects that the tables and figures group.

A run is identified for grouping by its experiment (``benchmark.name``, set by the presets
in ``configs/experiment``), data set, model, scale (``scale.name``) and arm (``benchmark.arm``,
or a name derived from the optimizer config for runs outside the presets).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

logger = logging.getLogger(__name__)

# run.json layouts this reader understands. Version 1 is the first versioned layout; runs
# without the key came from development versions whose keys were not fixed.
SUPPORTED_SCHEMA_VERSIONS = (1,)

# Keys every per-epoch record must have for the tables to read it.
REQUIRED_RECORD_KEYS = ("epoch", "train_time_s", "cumulative_train_time_s")

# Run states that count as results; others are skipped unless asked for.
FINISHED_STATUSES = ("completed", "diverged")

# Display order and names of the arms the presets define, then of optimizers outside them.
ARM_LABELS = {
    "sgdm": "SGD-m",
    "sgdm_100ep": "SGD-m (100 ep.)",
    "adamw": "AdamW",
    "kfac": "KFAC",
    "shampoo": "Shampoo",
    "eva": "Eva",
    "ngd": "NGD",
    "fngd": "FNGD",
}
BASELINE_ARM = "sgdm"

DATASET_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "multi30k": "Multi30K"}


class RunFormatError(ValueError):
    """A run folder or W&B run whose records cannot be read without guessing."""


@dataclass
class Run:
    """One training run: its resolved config, per-epoch records and where it ran."""

    source: str                     # the run folder, or entity/project/id for W&B
    config: dict
    records: list[dict]
    device: dict
    host: Optional[str]
    status: str
    schema_version: int
    git: Optional[dict] = None      # commit and dirty flag from run.json
    # Derived from the above in __post_init__.
    experiment: str = field(init=False)
    dataset: str = field(init=False)
    model: str = field(init=False)
    scale: str = field(init=False)
    arm: str = field(init=False)
    seed: Optional[int] = field(init=False)

    def __post_init__(self):
        config = self.config
        benchmark = config.get("benchmark") or {}
        scale = config.get("scale") or {}
        self.experiment = str(benchmark.get("name") or "none")
        self.dataset = str((config.get("dataset") or {}).get("name") or "unknown")
        self.model = model_name(config)
        self.scale = str(scale.get("name") or "full")
        self.arm = str(benchmark.get("arm") or arm_from_optimizer(config.get("optimizer") or {}))
        if benchmark.get("grid"):
            # A grid search: each grid point is a method of its own, e.g. fngd[lr=0.1,alpha=0.01].
            values = [f"{key.rsplit('.', 1)[-1]}={config_value(config, key)}"
                      for key in benchmark["grid"]]
            self.arm += f"[{','.join(values)}]"
        self.seed = config.get("seed")

    @property
    def device_label(self) -> str:
        """Name of the device, precise enough that two equal labels time alike."""
        return device_label(self.device, self.host)

    @property
    def metric(self) -> str:
        """The test metric of the task: ``test_bleu`` for translation, else ``test_accuracy``."""
        if any("test_bleu" in record for record in self.records):
            return "test_bleu"
        return "test_accuracy"

    @property
    def target(self) -> Optional[float]:
        """The test accuracy that the run's preset sets as Table II's target, if any."""
        value = (self.config.get("benchmark") or {}).get("target_test_accuracy")
        return float(value) if value is not None else None

    @property
    def replaced_model(self) -> Optional[str]:
        """At smoke scale, the preset's model that this run's smaller model replaces."""
        return (self.config.get("scale") or {}).get("replaced_model")


def model_name(config: dict) -> str:
    """Return the model's name: ``model.name``, else the last part of ``model._target_``."""
    model = config.get("model") or {}
    if model.get("name"):
        return str(model["name"])
    return str(model.get("_target_", "unknown")).rsplit(".", 1)[-1].lower()


def arm_from_optimizer(optimizer: dict) -> str:
    """Name a run outside the presets by its optimizer: sgdm, sgd, adamw, fngd, ngd, kfac..."""
    target = str(optimizer.get("_target_", "unknown"))
    name = target.rsplit(".", 1)[-1].lower()
    if name == "sgd":
        return "sgdm" if float(optimizer.get("momentum") or 0) > 0 else "sgd"
    if name == "fngd" and optimizer.get("mode") == "ngd":
        return "ngd"
    return name


def config_value(config: dict, dotted_key: str) -> object:
    """Return ``config[a][b]`` for ``"a.b"``, or None where a key is missing."""
    value: object = config
    for part in dotted_key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def arm_label(arm: str) -> str:
    """Display name of an arm: ``FNGD`` for ``fngd``, ``FNGD[lr=0.1]`` for a grid point."""
    base, bracket, rest = arm.partition("[")
    return ARM_LABELS.get(base, base) + bracket + rest


def arm_sort_key(arm: str) -> tuple[int, str]:
    """Order arms as ``ARM_LABELS`` lists them, then others by name."""
    base = arm.partition("[")[0]
    order = list(ARM_LABELS)
    return (order.index(base), arm) if base in order else (len(order), arm)


def dataset_label(name: str) -> str:
    return DATASET_LABELS.get(name, name)


def model_label(name: str) -> str:
    """Return ``ResNet-32`` for ``resnet32``, ``Transformer`` for ``transformer``."""
    if name.startswith("resnet") and name[len("resnet"):].isdigit():
        return f"ResNet-{name[len('resnet'):]}"
    return name[:1].upper() + name[1:]


def device_label(device: dict, host: Optional[str]) -> str:
    """Label a device: the GPU's name, or for CPUs the processor, thread count and host.

    Two GPUs of one model time alike on any host; CPUs of the same architecture name can be
    very different machines, so a CPU label includes the host.
    """
    kind = device.get("type", "unknown")
    name = device.get("name") or "unknown"
    if kind == "cuda":
        return str(name)
    threads = device.get("threads")
    parts = [f"{kind.upper()} {name}"]
    if threads:
        parts.append(f"{threads} threads")
    if host:
        parts.append(f"host {host}")
    return ", ".join(parts)


# ------------------------------------------------------------------------------------------
# Reading run folders


def find_run_dirs(roots: Iterable[str | os.PathLike]) -> list[Path]:
    """Return every folder under ``roots`` that contains a ``run.json``, sorted."""
    # Paths stay as the caller wrote them (relative ones too); resolved paths find duplicates.
    found: dict[Path, Path] = {}
    for root in roots:
        root = Path(root)
        if not root.exists():
            raise FileNotFoundError(f"--runs folder {root} does not exist; pass the folder "
                                    "that contains the runs (a Hydra outputs/ or multirun/ "
                                    "folder)")
        for directory, subdirectories, files in os.walk(root):
            # W&B keeps its own copies of files under wandb/; they are not runs.
            subdirectories[:] = sorted(name for name in subdirectories if name != "wandb")
            if "run.json" in files:
                found.setdefault(Path(directory).resolve(), Path(directory))
    return sorted(found.values())


def read_run_dir(path: str | os.PathLike) -> Run:
    """Read one run folder; raise ``RunFormatError`` when it cannot be read safely."""
    path = Path(path)
    try:
        info = json.loads((path / "run.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise RunFormatError(f"{path / 'run.json'} is not valid JSON ({error})") from error
    check_schema_version(info.get("schema_version"), str(path))

    metrics_path = path / "metrics.jsonl"
    if not metrics_path.is_file():
        raise RunFormatError(f"{path} has run.json but no metrics.jsonl; the run stopped before "
                             "its first epoch finished")
    records = []
    with open(metrics_path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise RunFormatError(f"line {number} of {metrics_path} is not valid JSON "
                                     f"({error})") from error

    for key in ("config", "device"):
        if not isinstance(info.get(key), dict):
            raise RunFormatError(f"{path / 'run.json'} has no '{key}' object although its "
                                 f"schema_version is {info['schema_version']}")
    check_records(records, str(path))
    return Run(source=str(path), config=info["config"], records=records, device=info["device"],
               host=info.get("host"), status=str(info.get("status", "unknown")),
               schema_version=int(info["schema_version"]), git=info.get("git"))


def check_schema_version(version: object, source: str) -> None:
    """Raise ``RunFormatError`` unless ``version`` is a layout this reader understands."""
    if version is None:
        raise RunFormatError(
            f"{source}: run.json has no schema_version, so it was written before the record "
            f"layout was versioned and its keys may mean something else; rerun it with the "
            f"current trainer (this reader supports schema_version "
            f"{', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RunFormatError(f"{source}: schema_version={version!r} is not an integer")
    if version < min(SUPPORTED_SCHEMA_VERSIONS):
        raise RunFormatError(
            f"{source}: schema_version {version} is older than this reader supports "
            f"({', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); rerun it with the current "
            "trainer")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise RunFormatError(
            f"{source}: schema_version {version} is newer than this reader supports "
            f"({', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))}); update the suite "
            "(git pull) to read it")


def check_records(records: list[dict], source: str) -> None:
    """Raise ``RunFormatError`` when a record lacks a required key or epochs are out of order."""
    for index, record in enumerate(records):
        missing = [key for key in REQUIRED_RECORD_KEYS if key not in record]
        if missing:
            raise RunFormatError(f"{source}: record {index + 1} lacks {', '.join(missing)}")
    epochs = [record["epoch"] for record in records]
    if epochs != sorted(set(epochs)):
        raise RunFormatError(f"{source}: epochs {epochs} are not strictly increasing")


def load_runs(roots: Iterable[str | os.PathLike], include_unfinished: bool = False
              ) -> tuple[list[Run], list[str]]:
    """Read every run under ``roots``; return the runs and one message per run skipped.

    Runs that cannot be read (no or unknown ``schema_version``, broken files) are always
    skipped, with the reason. Runs still running, interrupted or failed are skipped unless
    ``include_unfinished``.
    """
    runs, skipped = [], []
    for path in find_run_dirs(roots):
        try:
            run = read_run_dir(path)
        except RunFormatError as error:
            skipped.append(str(error))
            continue
        if not run.records:
            skipped.append(f"{path}: no epoch has finished")
            continue
        if run.status not in FINISHED_STATUSES and not include_unfinished:
            skipped.append(f"{path}: status {run.status!r}; finish it with "
                           f"trainer.resume={path} or pass --include-unfinished")
            continue
        runs.append(run)
    return runs, skipped


# ------------------------------------------------------------------------------------------
# Reading W&B


# W&B run states mapped to the trainer's run.json statuses.
WANDB_STATES = {"finished": "completed", "failed": "failed", "crashed": "failed",
                "killed": "interrupted", "running": "running"}


def load_wandb_runs(path: str, include_unfinished: bool = False, api=None
                    ) -> tuple[list[Run], list[str]]:
    """Read the runs of the W&B project ``path`` (``ENTITY/PROJECT``) through the public API.

    The trainer logs the resolved config as the W&B config and each epoch's record at step
    ``epoch``. The device comes from the metadata that W&B collects (GPU name, or the CPU).
    A W&B run has no ``run.json``, so its layout is taken as the oldest supported schema
    when its records carry the required keys, and the run is rejected otherwise.
    NOTE: a run that diverged ends as "failed" in W&B and is skipped unless
    ``include_unfinished``; its ``metrics.jsonl`` and ``run.json`` on disk record "diverged".
    """
    if path.count("/") != 1 or not all(path.split("/")):
        raise ValueError(f"--wandb {path!r} is invalid; expected ENTITY/PROJECT")
    if api is None:
        import wandb

        api = wandb.Api()

    runs, skipped = [], []
    for wandb_run in api.runs(path):
        source = f"{path}/{wandb_run.id}"
        records = [_clean_wandb_row(row) for row in wandb_run.scan_history()]
        records = [row for row in records if "epoch" in row]
        status = WANDB_STATES.get(wandb_run.state, wandb_run.state)
        if records and records[-1].get("train_loss") is None and "train_loss" in records[-1]:
            status = "diverged"
        try:
            check_records(records, source)
        except RunFormatError as error:
            skipped.append(f"{error} (W&B runs carry no schema_version; this reader expects "
                           f"the keys of schema_version {min(SUPPORTED_SCHEMA_VERSIONS)})")
            continue
        if not records:
            skipped.append(f"{source}: no epoch has finished")
            continue
        if status not in FINISHED_STATUSES and not include_unfinished:
            skipped.append(f"{source}: W&B state {wandb_run.state!r}; pass "
                           "--include-unfinished to use it")
            continue
        metadata = wandb_run.metadata or {}
        runs.append(Run(source=source, config=dict(wandb_run.config), records=records,
                        device=_wandb_device(metadata), host=metadata.get("host"),
                        status=status, schema_version=min(SUPPORTED_SCHEMA_VERSIONS)))
    return runs, skipped


def _clean_wandb_row(row: dict) -> dict:
    clean = {}
    for key, value in row.items():
        if key.startswith("_"):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            value = None
        clean[key] = value
    return clean


def _wandb_device(metadata: dict) -> dict:
    if metadata.get("gpu"):
        return {"type": "cuda", "name": metadata["gpu"]}
    return {"type": "cpu", "name": metadata.get("cpu") or metadata.get("os") or "unknown",
            "threads": metadata.get("cpu_count")}
