"""Turn grouped runs into the tables: Table II (time to target), Table III (relative epoch
time), final test accuracy or BLEU, and the time breakdown of profiled runs."""

from __future__ import annotations

from typing import Optional

from scripts.tables.compute import (BREAKDOWN_PARTS, Row, breakdown_cells, epoch_time_rows,
                                    final_metric_cells, target_rows)
from scripts.tables.records import (BASELINE_ARM, arm_label, arm_sort_key, dataset_label,
                                    model_label)
from scripts.tables.render import Table, format_mean, format_percent, format_runs

ROW_COLUMNS = ["Experiment", "Dataset", "Model", "Scale", "Device"]

CELL_NOTE = ("Cells: mean ± sample standard deviation over runs; n is the number of runs "
             "behind the cell, followed by their seeds.")
# Epoch times within one run that differ by more than this factor mark the cell as noisy.
NOISY_SPREAD = 1.5

SMOKE_NOTE = ("Rows at scale 'smoke' come from runs shrunk to minutes on a CPU (a subset of "
              "the data, a few epochs, a smaller stand-in for large models); they check the "
              "pipeline and are not comparable with the paper's numbers.")


def row_cells(row: Row) -> list[str]:
    """Return the cells that identify a row: experiment, data set, model, scale, device."""
    model = model_label(row.key.model)
    if row.replaced_model:
        model += f" (for {model_label(row.replaced_model)})"
    return [row.key.experiment, dataset_label(row.key.dataset), model, row.key.scale, row.device]


def row_record(row: Row) -> dict:
    return {"experiment": row.key.experiment, "dataset": row.key.dataset, "model": row.key.model,
            "replaced_model": row.replaced_model, "scale": row.key.scale, "device": row.device}


def common_notes(rows: list[Row]) -> list[str]:
    devices = sorted({row.device for row in rows})
    notes = [f"Devices: {'; '.join(devices)}.", CELL_NOTE]
    if any(row.key.scale == "smoke" for row in rows):
        notes.append(SMOKE_NOTE)
    return notes


def all_arms(rows: list[Row]) -> list[str]:
    return sorted({arm for row in rows for arm in row.arms}, key=arm_sort_key)


def epoch_time_table(rows: list[Row]) -> Optional[Table]:
    """Table III: median training time per epoch after epoch 1, relative to SGD-m."""
    if not rows:
        return None
    arms = all_arms(rows)
    display, records = [], []
    largest_spread = 0.0
    for table_row in epoch_time_rows(rows):
        cells = row_cells(table_row.row)
        for arm in arms:
            cell = table_row.cells.get(arm)
            if cell is None:
                cells.append("")
                continue
            if not cell.times.n:
                cells.append(f"needs ≥ 2 epochs (n={len(table_row.row.arms[arm])})")
            elif table_row.baseline is None:
                runs = format_runs(cell.times.runs)
                cells.append(f"{format_mean(cell.times)} s, no baseline ({runs})")
            elif arm == table_row.baseline:
                cells.append(f"1× = {format_mean(cell.times)} s ({format_runs(cell.times.runs)})")
            else:
                runs = format_runs(cell.ratios.runs)
                cells.append(f"{format_mean(cell.ratios, suffix='×')} ({runs})")
            if cell.spread is not None and cell.spread > NOISY_SPREAD:
                cells[-1] += " †"
                largest_spread = max(largest_spread, cell.spread)
            records.append({**row_record(table_row.row), "arm": arm,
                            "baseline": table_row.baseline, "runs": cell.times.n,
                            "seeds": cell.times.seeds, "single_epoch_runs": cell.single_epoch_runs,
                            "epoch_time_s_mean": cell.times.mean if cell.times.n else None,
                            "epoch_time_s_std": cell.times.std,
                            "ratio_mean": cell.ratios.mean if cell.ratios.n else None,
                            "ratio_std": cell.ratios.std, "epoch_time_spread": cell.spread})
        display.append(cells)

    notes = ["Median training time per epoch over epochs 2 and later (epoch 1 holds cuDNN "
             "autotuning and FNGD's coefficient solves), divided by the mean of SGD-m's on "
             "the same device (AdamW's where a row has no SGD-m, NGD's where it has "
             "neither). Training time covers data loading, forward, backward, "
             "preconditioning and the update; evaluation is excluded.", *common_notes(rows)]
    if largest_spread:
        notes.append(f"† Epoch times within one run of this cell differ by up to "
                     f"{largest_spread:.1f}× (max / min over epochs 2 and later), so other load "
                     "on the device changed them and the ratio is unreliable.")
    return Table("table3_epoch_time", "Table III: training time per epoch relative to SGD-m",
                 ROW_COLUMNS + [arm_label(arm) for arm in arms], display, records, notes)


def target_table(rows: list[Row], target_override: Optional[float] = None) -> Optional[Table]:
    """Table II: epochs and training time to the target test accuracy, and the gap to SGD-m."""
    table_rows = target_rows(rows, target_override)
    if not table_rows:
        return None
    display, records = [], []
    for table_row in table_rows:
        for arm, cell in table_row.cells.items():
            total = len(cell.results)
            if cell.reached_runs == 0:
                epochs = f"not reached (best {format_percent(cell.best)})"
                seconds = gap = "–"
            else:
                epochs = format_mean(cell.epochs, digits=1)
                seconds = format_mean(cell.times, digits=0)
                if cell.reached_runs < total:
                    epochs += f" ({cell.reached_runs} of {total} runs reached it)"
                gap = "–" if cell.gap is None else f"{100 * cell.gap:+.1f}%"
            display.append(row_cells(table_row.row) + [
                format_percent(table_row.target, 1), arm_label(arm), epochs, seconds, gap,
                format_runs([run for run, _ in cell.results])])
            records.append({**row_record(table_row.row), "target": table_row.target, "arm": arm,
                            "runs": total, "reached_runs": cell.reached_runs,
                            "seeds": sorted({run.seed for run, _ in cell.results}, key=str),
                            "epochs_mean": cell.epochs.mean if cell.epochs.n else None,
                            "epochs_std": cell.epochs.std,
                            "time_s_mean": cell.times.mean if cell.times.n else None,
                            "time_s_std": cell.times.std, "gap_to_sgdm": cell.gap,
                            "best_test_accuracy": cell.best})

    notes = ["Epochs and cumulative training time (evaluation excluded) until the test "
             "accuracy first reaches the target; means over the runs that reached it. The gap "
             f"compares mean times with {arm_label(BASELINE_ARM)}'s on the same device.",
             *common_notes([table_row.row for table_row in table_rows])]
    return Table("table2_time_to_target", "Table II: time to the target test accuracy",
                 ROW_COLUMNS + ["Target", "Method", "Epochs", "Time (s)",
                                f"Gap to {arm_label(BASELINE_ARM)}", "Runs"],
                 display, records, notes)


def final_metric_table(rows: list[Row]) -> Optional[Table]:
    """Build the table of the last and best test accuracy (BLEU for translation) of every arm."""
    if not rows:
        return None
    display, records = [], []
    for row in rows:
        for cell in final_metric_cells(row):
            is_bleu = cell.metric == "test_bleu"
            scale, suffix = (1.0, "") if is_bleu else (100.0, "%")
            statuses = ", ".join(f"{count} {status}"
                                 for status, count in sorted(cell.statuses.items()))
            display.append(row_cells(row) + [
                arm_label(cell.arm), "test BLEU" if is_bleu else "test accuracy",
                format_mean(cell.final, scale=scale, suffix=suffix),
                format_mean(cell.best, scale=scale, suffix=suffix),
                format_mean(cell.epochs, digits=0), format_runs(cell.final.runs), statuses])
            records.append({**row_record(row), "arm": cell.arm, "metric": cell.metric,
                            "runs": cell.final.n, "seeds": cell.final.seeds,
                            "final_mean": cell.final.mean if cell.final.n else None,
                            "final_std": cell.final.std,
                            "best_mean": cell.best.mean if cell.best.n else None,
                            "best_std": cell.best.std,
                            "epochs_mean": cell.epochs.mean if cell.epochs.n else None,
                            "statuses": statuses})
    notes = ["Final: the metric after the last epoch; best: its maximum over epochs. BLEU is "
             "sacreBLEU's corpus score on the test split, with the signature in each run's "
             "metrics.jsonl.", *common_notes(rows)]
    return Table("final_metrics", "Final test accuracy and BLEU",
                 ROW_COLUMNS + ["Method", "Metric", "Final", "Best", "Epochs", "Runs", "Status"],
                 display, records, notes)


def breakdown_table(rows: list[Row]) -> Optional[Table]:
    """Fig. 8 as numbers: milliseconds per step in each part, for profiled runs."""
    display, records, used_rows = [], [], []
    for row in rows:
        cells = breakdown_cells(row)
        if cells:
            used_rows.append(row)
        for cell in cells:
            total = sum(cell.milliseconds[part].mean for part in BREAKDOWN_PARTS
                        if part in cell.milliseconds)
            values = [format_mean(cell.milliseconds[part], digits=1)
                      if part in cell.milliseconds else "–" for part in BREAKDOWN_PARTS]
            runs = next(iter(cell.milliseconds.values()))
            display.append(row_cells(row) + [arm_label(cell.arm), cell.epochs, *values,
                                             f"{total:.1f}", format_runs(runs.runs)])
            records.append({**row_record(row), "arm": cell.arm, "epochs": cell.epochs,
                            "runs": runs.n, "seeds": runs.seeds,
                            **{f"{part}_ms_mean": cell.milliseconds[part].mean
                               for part in BREAKDOWN_PARTS if part in cell.milliseconds},
                            "total_ms": total})
    if not display:
        return None
    notes = ["Milliseconds per training step, from runs with trainer.profile=true. forward, "
             "backward and update exclude the optimizer's own sections: per_sample (patch "
             "extraction, per-sample gradients, Gram matrices) and precondition (statistics, "
             "inverses, solves). other is the rest of the epoch's training time (data "
             "loading, zero_grad, bookkeeping). On CUDA the parts are device time between CUDA "
             "events; on a CPU, wall time.", *common_notes(used_rows)]
    return Table("time_breakdown", "Time per training step by part",
                 ROW_COLUMNS + ["Method", "Epochs", *BREAKDOWN_PARTS, "total", "Runs"],
                 display, records, notes)
