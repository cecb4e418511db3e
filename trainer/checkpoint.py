"""Checkpoints: atomic writes, loading, and the random-number-generator states they carry."""

from __future__ import annotations

import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_VERSION = 1


def capture_rng_state() -> dict:
    """Return the global generator states of Python, NumPy, torch and CUDA.

    NumPy's state becomes plain lists and ints so that the checkpoint loads with
    ``torch.load(weights_only=True)``.
    """
    numpy_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": numpy_state["state"]["key"].tolist(),
                  "pos": int(numpy_state["state"]["pos"]),
                  "has_gauss": int(numpy_state["has_gauss"]),
                  "gauss": float(numpy_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore what ``capture_rng_state`` returned."""
    random.setstate(_as_tuples(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": np.array(numpy_state["key"], dtype=np.uint32),
                                   "pos": numpy_state["pos"]},
                         "has_gauss": numpy_state["has_gauss"], "gauss": numpy_state["gauss"]})
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _as_tuples(value):
    # random.setstate needs tuples where a round trip through a checkpoint may give lists.
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuples(item) for item in value)
    return value


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` so that ``path`` always contains a complete checkpoint.

    The data goes to a temporary file beside ``path``, is flushed to disk and then renamed
    over ``path``; an interruption leaves the previous checkpoint in place.
    """
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Return the checkpoint file for ``path``, which is a checkpoint or a run directory."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"trainer.resume={str(path)!r}: no checkpoint found there; give "
                                f"a checkpoint file or a run directory containing "
                                f"{CHECKPOINT_NAME}")
    return path


def load_checkpoint(path: str | os.PathLike, device: torch.device) -> dict:
    """Load a checkpoint written by ``save_checkpoint`` onto ``device``.

    Only tensors and plain Python values are unpickled (``weights_only=True``), so loading a
    checkpoint cannot run code stored in it.
    """
    path = resolve_checkpoint_path(path)
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(f"could not load checkpoint {path} ({error}); the file is corrupt or "
                         "was not written by this trainer") from error

    version = state.get("version") if isinstance(state, dict) else None
    if version != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {path} has version {version!r}; this trainer reads "
                         f"version {CHECKPOINT_VERSION}")
    return state
