"""Hydra resolvers that run a multirun's jobs one per GPU on a multi-GPU machine.

    python -m scripts.train -m experiment=table3 hydra/launcher=joblib_gpus \\
        'trainer.device=${fngd_worker_gpu:}'

``hydra/launcher=joblib_gpus`` starts one joblib worker process per visible GPU
(``n_jobs: ${fngd_gpu_count:}``). ``${fngd_worker_gpu:}`` gives the worker process that
resolves it a GPU of its own. It takes an exclusive ``flock`` on one lock file per GPU and
keeps it until the process exits, so the worker's later jobs reuse its GPU and no two
workers share one. The lock files live in ``$FNGD_GPU_LOCK_DIR`` or the system's temporary
folder, so two sweeps started on the same machine also take turns per GPU.

NOTE: not yet run on a multi-GPU machine. The locking is tested across processes, and a CPU
joblib sweep resolved ``${fngd_worker_gpu:2}`` to a different slot in each worker.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import IO, Optional

from omegaconf import OmegaConf

logger = logging.getLogger(__name__)

# How long a job waits for a free GPU before it fails. Joblib's workers are as many as the
# GPUs, so a wait means that another sweep on this machine has locked them.
WAIT_TIMEOUT_S = 3600.0
POLL_INTERVAL_S = 2.0

# The GPU locked by this process: {"device": "cuda:N", "file": the locked file}.
_held: dict[str, object] = {}


def lock_dir() -> Path:
    """Return the folder of the per-GPU lock files: $FNGD_GPU_LOCK_DIR or a per-user temp folder."""
    configured = os.environ.get("FNGD_GPU_LOCK_DIR")
    if configured:
        return Path(configured)
    return Path(tempfile.gettempdir()) / f"fngd-gpu-locks-{os.getuid()}"


def gpu_count() -> int:
    """Return the number of visible CUDA devices; raise when there is none."""
    import torch

    count = torch.cuda.device_count()
    if count < 1:
        raise ValueError("hydra/launcher=joblib_gpus runs one job per GPU, but no CUDA device "
                         "is visible; use the default launcher (drop hydra/launcher=...) on "
                         "a machine without GPUs")
    return count


def worker_gpu(count: Optional[int] = None, directory: Optional[Path] = None,
               timeout_s: float = WAIT_TIMEOUT_S) -> str:
    """Return ``cuda:N`` for a GPU that this process keeps locked until it exits.

    The first call takes the lock of the lowest-numbered free GPU, waiting up to
    ``timeout_s`` for one; later calls in the same process return the same device.
    """
    if "device" in _held:
        return str(_held["device"])
    count = gpu_count() if count is None else count
    directory = lock_dir() if directory is None else Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    deadline = time.monotonic() + timeout_s
    while True:
        for index in range(count):
            file = _try_lock(directory / f"gpu{index}.lock")
            if file is not None:
                _held.update(device=f"cuda:{index}", file=file)
                logger.info("Process %d locked cuda:%d for its jobs (lock file %s)", os.getpid(),
                            index, file.name)
                return f"cuda:{index}"
        if time.monotonic() >= deadline:
            raise TimeoutError(f"all {count} GPUs stayed locked for {timeout_s:.0f} s by other "
                               f"processes (lock files in {directory}); wait for the other "
                               "sweep to finish, or set FNGD_GPU_LOCK_DIR to a separate folder "
                               "if those processes use other GPUs")
        time.sleep(POLL_INTERVAL_S)


def _try_lock(path: Path) -> Optional[IO]:
    file = open(path, "a")
    try:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        file.close()
        return None
    return file


def release_gpu() -> None:
    """Unlock the GPU of this process, if any (processes that exit release it anyway)."""
    file = _held.pop("file", None)
    _held.pop("device", None)
    if file is not None:
        fcntl.flock(file, fcntl.LOCK_UN)
        file.close()


def register_resolvers() -> None:
    """Register ``fngd_gpu_count`` and ``fngd_worker_gpu`` with OmegaConf (idempotent)."""
    OmegaConf.register_new_resolver("fngd_gpu_count", gpu_count, replace=True)
    OmegaConf.register_new_resolver("fngd_worker_gpu", worker_gpu, replace=True)
