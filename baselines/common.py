"""Pieces the KFAC, Shampoo and Eva optimizers share: KL clipping and batched symmetric
eigendecompositions that survive failures, besides the argument checks and SGD-momentum update
of ``fngd.update``."""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import torch

# Re-exported for the baselines: FNGD uses the same checks and update.
from fngd.update import (check_choice, check_interval, check_number,  # noqa: F401
                         check_sgd_arguments, sgd_momentum_update)

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------
# KL clipping


def kl_clip_scale(inner_products: list[torch.Tensor],
                  kl_clip: Optional[float]) -> Optional[torch.Tensor]:
    """Return ``nu = min(1, sqrt(kl_clip / sum_l lr_l^2 <P_l, G_l>))``, or None without clipping.

    ``inner_products`` contains one ``lr^2 * <P, G>`` scalar per preconditioned layer (P the
    preconditioned gradient, G the gradient). A sum that is zero or negative (a preconditioner
    that is not positive definite) leaves the step unscaled. The result stays on the device.
    """
    if not kl_clip or not inner_products:
        return None
    total = torch.stack([t.float() for t in inner_products]).sum()
    scale = torch.sqrt(kl_clip / total.clamp_min(torch.finfo(torch.float32).tiny))
    scale = torch.where(total > 0, scale, torch.ones_like(scale))
    return scale.clamp(max=1.0)


# --------------------------------------------------------------------------------------------
# Eigendecompositions


def batched_eigh(matrices: list[torch.Tensor]) -> list[Optional[tuple[torch.Tensor, torch.Tensor]]]:
    """Return ``(eigenvalues, eigenvectors)`` for each stack of symmetric matrices, or None.

    Each entry of ``matrices`` is ``(..., D, D)``. Stacks of the same size and device are
    decomposed together in one ``torch.linalg.eigh`` call in float32 (float64 stays float64),
    whatever autocast is active. A stack whose input is not finite, or whose decomposition
    raises or returns non-finite values, is retried alone in float64; if that fails too its
    entry is None and the caller keeps its previous decomposition. Eigenvalues are clamped at
    zero, because rounding makes tiny ones of a positive semidefinite matrix negative.
    """
    results: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * len(matrices)
    buckets: dict[tuple, list[int]] = {}
    for index, matrix in enumerate(matrices):
        buckets.setdefault((matrix.shape[-1], matrix.device), []).append(index)

    for indices in buckets.values():
        with without_autocast(matrices[indices[0]].device):
            stacks = [_working_precision(matrices[i]) for i in indices]
            size = stacks[0].shape[-1]
            flat = [s.reshape(-1, size, size) for s in stacks]
            counts = [f.shape[0] for f in flat]
            batch = torch.cat(flat) if len(flat) > 1 else flat[0]

            decomposed = _eigh_or_none(batch)
            if decomposed is not None:
                values, vectors = decomposed
                finite = (torch.isfinite(values).all(dim=-1)
                          & torch.isfinite(vectors).flatten(1).all(dim=-1))
                chunks = torch.split(finite, counts)
                per_stack = torch.stack([chunk.all() for chunk in chunks]).tolist()
                values = torch.split(values, counts)
                vectors = torch.split(vectors, counts)
            else:
                per_stack = [False] * len(indices)

            for position, index in enumerate(indices):
                if per_stack[position]:
                    shape = matrices[index].shape
                    results[index] = (values[position].reshape(shape[:-1]).clamp_min(0),
                                      vectors[position].reshape(shape))
                else:
                    results[index] = _eigh_float64(matrices[index])
    return results


def without_autocast(device: torch.device):
    """Return a context that turns autocast off on ``device``, so statistics stay in float32."""
    return torch.autocast(device_type=device.type, enabled=False)


def _working_precision(matrix: torch.Tensor) -> torch.Tensor:
    if matrix.dtype == torch.float64:
        return matrix
    return matrix.float()


def _eigh_or_none(batch: torch.Tensor):
    if not bool(torch.isfinite(batch).all()):
        return None
    try:
        return torch.linalg.eigh(batch)
    except RuntimeError as error:  # torch.linalg.LinAlgError is a RuntimeError
        logger.info("batched eigendecomposition of %s matrices of size %d failed (%s); "
                    "retrying each in float64", batch.shape[0], batch.shape[-1], error)
        return None


def _eigh_float64(matrix: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    if not bool(torch.isfinite(matrix).all()):
        return None
    try:
        values, vectors = torch.linalg.eigh(matrix.double())
    except RuntimeError:
        return None
    if not (bool(torch.isfinite(values).all()) and bool(torch.isfinite(vectors).all())):
        return None
    dtype = _working_precision(matrix).dtype
    return values.clamp_min(0).to(dtype), vectors.to(dtype)
