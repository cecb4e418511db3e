"""Compute the sample Gram matrix K of chosen layers for one training batch and draw it.

    python -m scripts.gram_heatmap experiment=fig3                       # initial weights
    python -m scripts.gram_heatmap experiment=fig3 gram.weights=outputs/DATE/TIME
    python -m scripts.gram_heatmap experiment=fig3 'gram.layers=[conv1,fc]' scale=smoke

Takes the training config (so ``experiment=...``, ``dataset.root=...`` and ``scale=smoke``
work as for ``scripts.train``) and a ``gram`` node, which experiment=fig3 provides:
``gram.weights`` (a run folder or checkpoint.pt, or null), ``gram.layers`` (module names
as ``fngd.find_layers`` lists them) and ``gram.sort_by_label``.

K[m, n] = <u_m, u_n> where u_m is the gradient of sample m's own loss with respect to the
layer's weight and bias, computed from the layer's input and output gradient in one
backward pass of the first training batch, with BatchNorm in training mode as in a
training step. Writes ``gram.npz`` (one matrix a layer, the layer names, the batch's labels
and a JSON ``info`` string) and its heat maps as PNG to the Hydra run folder. make_tables
draws every ``gram.npz`` under its --runs folders.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

import hydra
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fngd.layers import Recorder, find_layers
from trainer.checkpoint import load_checkpoint
from trainer.train import resolve_device, seed_everything
from trainer.workload import build_workload

logger = logging.getLogger("scripts.gram_heatmap")

# Used when the config has no gram node: two adjacent layers at each end of a CIFAR ResNet.
DEFAULT_LAYERS = ("conv1", "stages.0.0.conv1", "fc")


def compute_grams(cfg: DictConfig, weights: Optional[str], layers: list[str],
                  device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
    """Return K of each layer in ``layers`` for the first training batch, that batch's
    labels and its size."""
    seed_everything(cfg.seed)
    workload = build_workload(cfg, device)
    model = workload.build_model().to(device)
    if weights:
        model.load_state_dict(load_checkpoint(weights, device)["model"])

    helpers = {helper.name: helper for helper in find_layers(model)}
    unknown = [name for name in layers if name not in helpers]
    if unknown:
        raise ValueError(f"gram.layers has {', '.join(unknown)}, which the model does not "
                         f"have as a Linear or Conv2d layer; valid names: {', '.join(helpers)}")

    grams: dict[str, torch.Tensor] = {}

    def store_gram(helper, a, g):
        grams[helper.name] = helper.gram(a, g).detach().double().cpu()

    recorder = Recorder([helpers[name] for name in layers], store_gram)
    try:
        batch = next(iter(workload.train_batches()))
        model.train()
        output = workload.loss(model, batch)
        # The summed loss gives each sample's output gradient of its own loss, so K is the
        # Gram matrix of per-sample gradients without the 1/M of a mean.
        output.loss_sum.backward()
    finally:
        recorder.remove()

    missing = [name for name in layers if name not in grams]
    if missing:
        raise RuntimeError(f"layers {', '.join(missing)} took no part in the backward pass, "
                           "so their K could not be recorded")
    labels = getattr(batch, "targets", None)
    labels = labels.cpu().numpy() if labels is not None and labels.dim() == 1 \
        else np.arange(len(batch.indices))
    return {name: grams[name].numpy() for name in layers}, labels, len(batch.indices)


def save_grams(path: Path, grams: dict[str, np.ndarray], labels: np.ndarray, info: dict,
               sort_by_label: bool) -> None:
    """Write ``gram.npz``; with ``sort_by_label`` rows and columns are ordered by label."""
    order = np.argsort(labels, kind="stable") if sort_by_label else np.arange(len(labels))
    arrays = {f"gram_{index}": gram[np.ix_(order, order)]
              for index, gram in enumerate(grams.values())}
    np.savez_compressed(path, layers=np.array(list(grams)), labels=labels[order],
                        info=np.array(json.dumps({**info, "sorted_by_label": sort_by_label})),
                        **arrays)


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from scripts.tables.figures import plot_gram

    gram_cfg = cfg.get("gram") or {}
    layers = list(gram_cfg.get("layers") or DEFAULT_LAYERS)
    weights = gram_cfg.get("weights")
    if weights:
        # Hydra does not change the working directory, so relative paths are the caller's.
        weights = os.path.abspath(weights)
    device = resolve_device(cfg.trainer.device)
    out_dir = Path(HydraConfig.get().runtime.output_dir)

    grams, labels, batch_size = compute_grams(cfg, weights, layers, device)
    info = {
        "experiment": (cfg.get("benchmark") or {}).get("name"),
        "dataset": cfg.dataset.name,
        "model": cfg.model.get("name", "model"),
        "scale": (cfg.get("scale") or {}).get("name"),
        "weights": weights,
        "batch_size": batch_size,
        "seed": cfg.seed,
        "device": str(device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    save_grams(out_dir / "gram.npz", grams, labels, info, bool(gram_cfg.get("sort_by_label", True)))
    figure = plot_gram(out_dir / "gram.npz", out_dir)
    print(out_dir / "gram.npz")
    print(figure)


if __name__ == "__main__":
    main()
