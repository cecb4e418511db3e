"""The facts about a run that ``run.json`` records: config, code version, device, libraries."""

from __future__ import annotations

import importlib.metadata
import logging
import platform
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

# Version of the run.json and metrics.jsonl layout; increase it when a key changes meaning.
SCHEMA_VERSION = 1

REPOSITORY_ROOT = Path(__file__).resolve().parent.parent

LIBRARIES = ("torch", "torchvision", "hydra-core", "omegaconf", "numpy", "wandb", "sacrebleu",
             "spacy")


def _run_git(*args: str) -> Optional[str]:
    try:
        result = subprocess.run(["git", *args], cwd=REPOSITORY_ROOT, capture_output=True,
                                text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip()


def git_state() -> dict:
    """Return the commit of the repository and whether tracked files have changes."""
    commit = _run_git("rev-parse", "HEAD")
    status = _run_git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def _nvidia_driver() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                 "--format=csv,noheader"], capture_output=True, text=True,
                                timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else None


def _cpu_name() -> str:
    # platform.processor() is empty on most Linux systems; /proc/cpuinfo names the model.
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    """Return the device's name and, on CUDA, the driver, CUDA and cuDNN versions."""
    if device.type == "cuda":
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(device),
            "driver": _nvidia_driver(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return {"type": device.type, "name": _cpu_name(), "threads": torch.get_num_threads()}


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def collect_run_info(config: dict, device: torch.device) -> dict:
    """Return the initial contents of ``run.json``; the loop adds status and results."""
    return {
        "schema_version": SCHEMA_VERSION,
        "config": config,
        "git": git_state(),
        "device": device_info(device),
        "versions": library_versions(),
        "host": socket.gethostname(),
    }
