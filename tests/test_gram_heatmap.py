"""scripts.gram_heatmap: K of chosen layers for one batch, its file and its heat map."""

from __future__ import annotations

import json

import matplotlib.image
import numpy as np
import pytest
import torch

from scripts.gram_heatmap import compute_grams, save_grams
from scripts.tables.figures import plot_gram
from tests.conftest import tiny_run_overrides
from trainer.train import seed_everything
from trainer.workload import build_workload


def test_classifier_gram_matches_per_sample_gradients(synthetic_cifar_root, compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root) + ["experiment=fig3"])
    device = torch.device("cpu")

    grams, labels, batch_size = compute_grams(cfg, None, ["fc", "stages.0.0.conv1"], device)

    # Reference: the gradient of each sample's own loss through the same batch, one at a time.
    # The classifier comes after every BatchNorm, so its per-sample gradients are exact.
    seed_everything(cfg.seed)
    workload = build_workload(cfg, device)
    model = workload.build_model()
    batch = next(iter(workload.train_batches()))
    model.train()
    logits = model(batch.inputs)
    losses = torch.nn.functional.cross_entropy(logits, batch.targets, reduction="none")
    rows = []
    for loss in losses:
        weight, bias = torch.autograd.grad(loss, [model.fc.weight, model.fc.bias],
                                           retain_graph=True)
        rows.append(torch.cat([weight.reshape(-1), bias]).double())
    per_sample = torch.stack(rows)                       # (M, P)

    assert batch_size == 16
    np.testing.assert_allclose(grams["fc"], (per_sample @ per_sample.T).numpy(),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(labels, batch.targets.numpy())
    conv = grams["stages.0.0.conv1"]
    assert conv.shape == (16, 16)
    np.testing.assert_allclose(conv, conv.T, rtol=1e-6, atol=1e-9)
    assert np.all(np.linalg.eigvalsh(conv) > -1e-6 * np.abs(conv).max())


def test_unknown_layer_lists_valid_names(synthetic_cifar_root, compose_config):
    cfg = compose_config(tiny_run_overrides(synthetic_cifar_root))
    with pytest.raises(ValueError, match="valid names: conv1"):
        compute_grams(cfg, None, ["stages.9.conv1"], torch.device("cpu"))


def test_saved_grams_sorted_and_drawn(tmp_path):
    labels = np.array([2, 0, 1, 0])
    gram = np.arange(16, dtype=float).reshape(4, 4)
    info = {"experiment": "fig3", "dataset": "cifar10", "model": "resnet32", "scale": "smoke",
            "weights": None, "batch_size": 4}

    save_grams(tmp_path / "gram.npz", {"fc": gram}, labels, info, sort_by_label=True)

    with np.load(tmp_path / "gram.npz") as data:
        order = [1, 3, 2, 0]
        np.testing.assert_array_equal(data["labels"], [0, 0, 1, 2])
        np.testing.assert_array_equal(data["gram_0"], gram[np.ix_(order, order)])
        assert list(data["layers"]) == ["fc"]
        assert json.loads(str(data["info"]))["sorted_by_label"] is True

    path = plot_gram(tmp_path / "gram.npz", tmp_path / "figures")
    assert path.name == "fig3_cifar10_resnet32_smoke_gram.png"
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 100 and image.std() > 0
