"""The figures as PNG: test accuracy or BLEU against epochs and training time (Figs. 4-7),
the time breakdown per step (Fig. 8) and Gram-matrix heat maps (Fig. 3)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")   # files only; no display is needed or assumed

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from scripts.tables.compute import (BREAKDOWN_PARTS, Row, breakdown_cells,  # noqa: E402
                                    metric_values)
from scripts.tables.records import arm_label, dataset_label, model_label  # noqa: E402

logger = logging.getLogger(__name__)

DPI = 120

# One colour per arm across all figures, so that a method looks the same everywhere.
ARM_COLOURS = {"sgdm": "tab:blue", "sgdm_100ep": "tab:cyan", "adamw": "tab:purple",
               "kfac": "tab:orange", "shampoo": "tab:green", "eva": "tab:red",
               "ngd": "tab:brown", "fngd": "black"}
PART_COLOURS = {"forward": "#4c72b0", "backward": "#dd8452", "per_sample": "#55a868",
                "precondition": "#c44e52", "update": "#8172b3", "other": "#bbbbbb"}


def figure_stem(row: Row, kind: str) -> str:
    """File name stem for a row's figure, e.g. ``fig4_cifar10_resnet32_smoke_curves``."""
    parts = [row.key.experiment, row.key.dataset, row.key.model, row.key.scale, kind]
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", part) for part in parts)


def row_title(row: Row) -> str:
    model = model_label(row.key.model)
    if row.replaced_model:
        model += f" (for {model_label(row.replaced_model)})"
    scale = ", smoke scale" if row.key.scale == "smoke" else ""
    data = dataset_label(row.key.dataset)
    return f"{row.key.experiment}: {model} on {data}{scale} — {row.device}"


def _mean_curve(series: list[list[tuple[float, float]]]
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Average curves point by point over the runs' common length; return x, mean and std."""
    length = min(len(points) for points in series)
    xs = np.array([[point[0] for point in points[:length]] for points in series])
    ys = np.array([[point[1] for point in points[:length]] for points in series])
    std = ys.std(axis=0, ddof=1) if len(series) > 1 else np.zeros(length)
    return xs.mean(axis=0), ys.mean(axis=0), std


def plot_curves(row: Row, out_dir: Path) -> Optional[Path]:
    """Test metric against epochs and against training time, and training time per epoch.

    Lines are means over an arm's runs (up to the shortest run), bands one standard
    deviation. Returns None when no run of the row has a test metric.
    """
    metric = next(iter(row.runs)).metric
    is_bleu = metric == "test_bleu"
    scale = 1.0 if is_bleu else 100.0
    ylabel = "test BLEU" if is_bleu else "test accuracy (%)"

    figure, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    plotted = False
    for arm in row.sorted_arms:
        runs = row.arms[arm]
        by_epoch, by_time, epoch_times = [], [], []
        for run in runs:
            values = metric_values(run, metric)
            cumulative = {record["epoch"]: record["cumulative_train_time_s"]
                          for record in run.records}
            if values:
                by_epoch.append([(epoch, value * scale) for epoch, value in values])
                by_time.append([(cumulative[epoch], value * scale) for epoch, value in values])
            epoch_times.append([(record["epoch"], record["train_time_s"])
                                for record in run.records])
        colour = ARM_COLOURS.get(arm)
        label = f"{arm_label(arm)} (n={len(runs)})"
        if by_epoch:
            plotted = True
            for axis, series in ((axes[0], by_epoch), (axes[1], by_time)):
                x, mean, std = _mean_curve(series)
                axis.plot(x, mean, marker="o", markersize=3, color=colour, label=label)
                if len(series) > 1:
                    axis.fill_between(x, mean - std, mean + std, color=colour, alpha=0.2)
        x, mean, std = _mean_curve(epoch_times)
        axes[2].plot(x, mean, marker="o", markersize=3, color=colour, label=label)

    if not plotted:
        plt.close(figure)
        return None
    axes[0].set(xlabel="epoch", ylabel=ylabel)
    axes[1].set(xlabel="cumulative training time (s)", ylabel=ylabel)
    axes[2].set(xlabel="epoch", ylabel="training time of the epoch (s)")
    axes[2].set_ylim(bottom=0)
    for axis in axes:
        axis.grid(alpha=0.3)
    for axis in (axes[0], axes[2]):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[0].legend(fontsize=8)
    title = row_title(row)
    if row.key.scale == "smoke":
        title += "\n" + "smoke-scale runs: pipeline check, not comparable with the paper"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, out_dir / f"{figure_stem(row, 'curves')}.png")


def plot_breakdown(row: Row, out_dir: Path) -> Optional[Path]:
    """Stacked bars of milliseconds per step in each part, per arm and epoch range."""
    cells = breakdown_cells(row)
    if not cells:
        return None
    labels = [f"{arm_label(cell.arm)}, epoch {cell.epochs}" for cell in cells]
    figure, axis = plt.subplots(figsize=(9, 0.6 * len(cells) + 1.8))
    left = np.zeros(len(cells))
    for part in BREAKDOWN_PARTS:
        widths = np.array([cell.milliseconds[part].mean if part in cell.milliseconds else 0.0
                           for cell in cells])
        axis.barh(labels, widths, left=left, color=PART_COLOURS[part], label=part)
        left += widths
    axis.invert_yaxis()
    axis.set_xlabel("milliseconds per training step")
    axis.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    title = row_title(row)
    if row.key.scale == "smoke":
        title += "\nsmoke-scale runs"
    axis.set_title(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, out_dir / f"{figure_stem(row, 'time_breakdown')}.png")


def find_gram_files(roots) -> list[Path]:
    """Return every ``gram.npz`` that ``python -m scripts.gram_heatmap`` wrote under ``roots``."""
    found = set()
    for root in roots:
        found.update(path.resolve() for path in Path(root).rglob("gram.npz"))
    return sorted(found)


def plot_gram(path: Path, out_dir: Path, normalise: bool = False) -> Path:
    """Heat maps of the Gram matrices K in one ``gram.npz``, one panel per layer.

    With ``normalise``, each K is shown as cosine similarities K_mn / sqrt(K_mm K_nn).
    """
    with np.load(path, allow_pickle=False) as data:
        layers = [str(name) for name in data["layers"]]
        grams = [data[f"gram_{index}"] for index in range(len(layers))]
        info = json.loads(str(data["info"]))

    figure, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4.2), squeeze=False)
    for axis, name, gram in zip(axes[0], layers, grams):
        shown = gram
        if normalise:
            diagonal = np.sqrt(np.clip(np.diag(gram), 1e-30, None))
            shown = gram / diagonal[:, None] / diagonal[None, :]
        image = axis.imshow(shown, cmap="viridis", interpolation="nearest")
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("sample")
        axis.set_ylabel("sample")
        figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)

    weights = info.get("weights")
    # The last two parts of the path name the run (sweep folder and job number).
    weights = f"weights of .../{'/'.join(Path(weights).parts[-2:])}" if weights \
        else "initial weights"
    order = ", samples sorted by label" if info.get("sorted_by_label") else ""
    title = (f"$K = U^\\top U$ of {model_label(info.get('model', '?'))} on "
             f"{dataset_label(info.get('dataset', '?'))}, batch {info.get('batch_size')}"
             f"{order}; {weights}")
    if info.get("scale") == "smoke":
        title += " (smoke scale)"
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    stem = "_".join([info.get("experiment") or "gram", info.get("dataset", "data"),
                     info.get("model", "model"), info.get("scale") or "full", "gram"])
    return _save(figure, out_dir / f"{stem}.png")


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    logger.info("Wrote %s", path)
    return path

