"""The numbers behind the tables: per-run quantities and their mean and spread per arm.

Runs are grouped into rows by (experiment, data set, model, scale) and, within a row, by
arm. Every quantity that compares runs (time ratios, time gaps) is computed within one row,
and a row whose runs ran on more than one device is rejected with ``MixedDevicesError``.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from scripts.tables.records import BASELINE_ARM, Run, arm_sort_key
from trainer.profile import profile_parts

# Arms a time ratio is taken against, in order of preference: SGD-m for the image models,
# AdamW for the Transformer (the first-order method of Ou et al. there), and NGD for the
# FNGD-against-NGD comparison, which has neither.
RATIO_BASELINES = (BASELINE_ARM, "adamw", "ngd")


class MixedDevicesError(ValueError):
    """Runs from several devices would enter one comparison."""


@dataclass(frozen=True, order=True)
class RowKey:
    """Key of a table row: the experiment, data set, model and scale its runs share."""

    experiment: str
    dataset: str
    model: str
    scale: str


@dataclass
class Summary:
    """Mean and sample standard deviation of one value over several runs."""

    values: list[float]
    runs: list[Run]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> Optional[float]:
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def seeds(self) -> list:
        return sorted({run.seed for run in self.runs}, key=str)


@dataclass
class Row:
    """The runs of one row, by arm, and the device they all ran on."""

    key: RowKey
    arms: dict[str, list[Run]]
    device: str
    replaced_model: Optional[str] = None

    @property
    def sorted_arms(self) -> list[str]:
        return sorted(self.arms, key=arm_sort_key)

    @property
    def runs(self) -> list[Run]:
        return [run for runs in self.arms.values() for run in runs]


def group_rows(runs: Iterable[Run]) -> list[Row]:
    """Group runs into rows; raise ``MixedDevicesError`` if a row has runs from several devices."""
    grouped: dict[RowKey, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        key = RowKey(run.experiment, run.dataset, run.model, run.scale)
        grouped[key][run.arm].append(run)

    rows = []
    for key in sorted(grouped):
        arms = {arm: sorted(arm_runs, key=lambda run: str(run.seed))
                for arm, arm_runs in grouped[key].items()}
        all_runs = [run for arm_runs in arms.values() for run in arm_runs]
        rows.append(Row(key, arms, single_device(all_runs, key),
                        next((run.replaced_model for run in all_runs if run.replaced_model),
                             None)))
    return rows


def single_device(runs: list[Run], key: RowKey) -> str:
    """Return the one device label of ``runs``, or raise naming each device and its runs."""
    by_device: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        by_device[run.device_label].append(f"{run.arm} seed {run.seed} ({run.source})")
    if len(by_device) == 1:
        return next(iter(by_device))
    details = "; ".join(f"{device}: {', '.join(sources)}" for device, sources in by_device.items())
    raise MixedDevicesError(
        f"the runs of {key.experiment} / {key.dataset} / {key.model} / {key.scale} ran on "
        f"{len(by_device)} devices, and times from different devices cannot be compared: "
        f"{details}. Pass --device with one of these labels, or give the runs of each "
        "device to a separate make_tables call")


def summarise(runs: list[Run], value: Callable[[Run], Optional[float]]) -> Summary:
    """Collect ``value(run)`` over the runs where it is defined."""
    kept = [(value(run), run) for run in runs]
    kept = [(number, run) for number, run in kept if number is not None]
    return Summary([number for number, _ in kept], [run for _, run in kept])


# ------------------------------------------------------------------------------------------
# Per-run quantities


def epoch_time_after_first(run: Run) -> Optional[float]:
    """Median training time per epoch over epochs 2 and later; None with one epoch only.

    Epoch 1 includes cuDNN autotuning and FNGD's coefficient solves, so it is left out.
    """
    times = [record["train_time_s"] for record in run.records if record["epoch"] >= 2]
    return statistics.median(times) if times else None


def epoch_time_spread(run: Run) -> Optional[float]:
    """Return max / min of the training times of epochs 2 and later; None with fewer than two.

    Epochs of one run do the same work, so a large spread means that other load on the
    device changed the times.
    """
    times = [record["train_time_s"] for record in run.records if record["epoch"] >= 2]
    if len(times) < 2 or min(times) <= 0:
        return None
    return max(times) / min(times)


def first_epoch_time(run: Run) -> Optional[float]:
    for record in run.records:
        if record["epoch"] == 1:
            return record["train_time_s"]
    return None


def metric_values(run: Run, metric: str) -> list[tuple[int, float]]:
    """Return ``(epoch, value)`` for each record with a finite ``metric``."""
    values = []
    for record in run.records:
        value = record.get(metric)
        if isinstance(value, (int, float)) and math.isfinite(value):
            values.append((record["epoch"], float(value)))
    return values


def final_metric(run: Run, metric: str) -> Optional[float]:
    values = metric_values(run, metric)
    return values[-1][1] if values else None


def best_metric(run: Run, metric: str) -> Optional[float]:
    values = metric_values(run, metric)
    return max(value for _, value in values) if values else None


@dataclass
class TargetResult:
    """When a run first reached a test-accuracy target, or None for a target never reached."""

    epoch: Optional[int]
    time_s: Optional[float]
    best: Optional[float]

    @property
    def reached(self) -> bool:
        return self.epoch is not None


def time_to_target(run: Run, target: float) -> TargetResult:
    """Find the first epoch whose test accuracy is at least ``target`` (a fraction)."""
    best = None
    for record in run.records:
        accuracy = record.get("test_accuracy")
        if not isinstance(accuracy, (int, float)) or not math.isfinite(accuracy):
            continue
        best = accuracy if best is None else max(best, accuracy)
        if accuracy >= target:
            return TargetResult(record["epoch"], record["cumulative_train_time_s"], best)
    return TargetResult(None, None, best)


# ------------------------------------------------------------------------------------------
# Table rows


@dataclass
class RatioCell:
    """Per-epoch time of one arm and its ratio to the baseline arm of the row."""

    arm: str
    times: Summary
    ratios: Summary
    single_epoch_runs: int = 0
    spread: Optional[float] = None    # the largest epoch_time_spread of the cell's runs


@dataclass
class EpochTimeRow:
    row: Row
    baseline: Optional[str]
    cells: dict[str, RatioCell] = field(default_factory=dict)


def epoch_time_rows(rows: list[Row]) -> list[EpochTimeRow]:
    """Table III: median per-epoch time after epoch 1, relative to the row's baseline arm.

    Each run's ratio is its time over the mean time of the baseline's runs, so the cell's
    spread is that of the arm's runs. The baseline is the first of ``RATIO_BASELINES`` that
    the row has.
    """
    result = []
    for row in rows:
        times = {arm: summarise(runs, epoch_time_after_first) for arm, runs in row.arms.items()}
        baseline = next((arm for arm in RATIO_BASELINES if times.get(arm) and times[arm].n), None)
        baseline_time = times[baseline].mean if baseline else None
        table_row = EpochTimeRow(row, baseline)
        for arm in row.sorted_arms:
            ratios = Summary([], [])
            if baseline_time:
                ratios = Summary([value / baseline_time for value in times[arm].values],
                                 times[arm].runs)
            single = sum(1 for run in row.arms[arm] if epoch_time_after_first(run) is None)
            spreads = [spread for spread in map(epoch_time_spread, row.arms[arm])
                       if spread is not None]
            table_row.cells[arm] = RatioCell(arm, times[arm], ratios, single,
                                             max(spreads) if spreads else None)
        result.append(table_row)
    return result


@dataclass
class TargetCell:
    arm: str
    results: list[tuple[Run, TargetResult]]
    epochs: Summary
    times: Summary
    gap: Optional[float]          # mean time / baseline mean time - 1, both reached

    @property
    def reached_runs(self) -> int:
        return sum(1 for _, result in self.results if result.reached)

    @property
    def best(self) -> Optional[float]:
        bests = [result.best for _, result in self.results if result.best is not None]
        return max(bests) if bests else None


@dataclass
class TargetRow:
    row: Row
    target: float
    cells: dict[str, TargetCell] = field(default_factory=dict)


def target_rows(rows: list[Row], target_override: Optional[float] = None) -> list[TargetRow]:
    """Table II: epochs and training time to the target test accuracy, and the gap to SGD-m.

    A row enters when ``target_override`` is given or its runs' preset sets
    ``benchmark.target_test_accuracy``. Means are over the runs that reached the target; the
    gap compares those means, and needs SGD-m to have reached it.
    """
    result = []
    for row in rows:
        targets = {run.target for run in row.runs if run.target is not None}
        if target_override is not None:
            target = target_override
        elif len(targets) == 1:
            target = targets.pop()
        elif not targets:
            continue
        else:
            raise ValueError(f"the runs of {row.key.experiment} / {row.key.model} set different "
                             f"targets {sorted(targets)}; pass --target to choose one")

        table_row = TargetRow(row, target)
        for arm in row.sorted_arms:
            results = [(run, time_to_target(run, target)) for run in row.arms[arm]]
            reached = [(run, res) for run, res in results if res.reached]
            epochs = Summary([float(res.epoch) for _, res in reached], [run for run, _ in reached])
            times = Summary([res.time_s for _, res in reached], [run for run, _ in reached])
            table_row.cells[arm] = TargetCell(arm, results, epochs, times, None)

        baseline = table_row.cells.get(BASELINE_ARM)
        if baseline is not None and baseline.times.n:
            for cell in table_row.cells.values():
                if cell.times.n:
                    cell.gap = cell.times.mean / baseline.times.mean - 1.0
        result.append(table_row)
    return result


@dataclass
class FinalCell:
    arm: str
    metric: str
    final: Summary
    best: Summary
    epochs: Summary
    statuses: dict[str, int]


def final_metric_cells(row: Row) -> list[FinalCell]:
    """The last and the best test accuracy (or BLEU) of each arm of a row."""
    cells = []
    for arm in row.sorted_arms:
        runs = row.arms[arm]
        metric = runs[0].metric
        statuses: dict[str, int] = defaultdict(int)
        for run in runs:
            statuses[run.status] += 1
        cells.append(FinalCell(
            arm, metric,
            summarise(runs, lambda run: final_metric(run, metric)),
            summarise(runs, lambda run: best_metric(run, metric)),
            summarise(runs, lambda run: float(run.records[-1]["epoch"])),
            dict(statuses)))
    return cells


# The parts of a step, in the order the breakdown shows them.
BREAKDOWN_PARTS = ("forward", "backward", "per_sample", "precondition", "update", "other")


@dataclass
class BreakdownCell:
    """Mean time per step of each part, over the runs of one arm and a range of epochs."""

    arm: str
    epochs: str                       # "1" or "2+"
    milliseconds: dict[str, Summary]


def breakdown_cells(row: Row) -> list[BreakdownCell]:
    """Fig. 8: time per step split into parts, for epoch 1 and for the later epochs.

    Only runs trained with ``trainer.profile=true`` have the parts; arms without them are
    left out.
    """
    cells = []
    for arm in row.sorted_arms:
        for label, selects in (("1", lambda epoch: epoch == 1), ("2+", lambda epoch: epoch >= 2)):
            per_part: dict[str, list[tuple[float, Run]]] = defaultdict(list)
            for run in row.arms[arm]:
                per_step = _per_step_parts(run, selects)
                if per_step is None:
                    continue
                for part, milliseconds in per_step.items():
                    per_part[part].append((milliseconds, run))
            if per_part:
                summaries = {part: Summary([value for value, _ in values],
                                           [run for _, run in values])
                             for part, values in per_part.items()}
                cells.append(BreakdownCell(arm, label, summaries))
    return cells


def _per_step_parts(run: Run, selects: Callable[[int], bool]) -> Optional[dict[str, float]]:
    totals: dict[str, float] = defaultdict(float)
    steps = 0
    for record in run.records:
        if not selects(record["epoch"]) or "profile_steps" not in record:
            continue
        steps += record["profile_steps"]
        for part, seconds in profile_parts(record).items():
            totals[part] += seconds
    if steps == 0:
        return None
    return {part: 1000.0 * seconds / steps for part, seconds in totals.items()}
