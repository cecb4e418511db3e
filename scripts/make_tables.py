"""Turn finished runs into the paper's tables (Markdown, CSV, LaTeX) and figures (PNG).

    python -m scripts.make_tables --runs multirun/ --out results/
    python -m scripts.make_tables --runs outputs/ multirun/ --out results/ --device "NVIDIA H200"
    python -m scripts.make_tables --wandb ENTITY/PROJECT --out results/

Reads every run.json and metrics.jsonl under the --runs folders (or the same records from
W&B), groups the runs by experiment, data set, model, scale and method, and writes:

    table2_time_to_target.*   epochs and training time to the target test accuracy
    table3_epoch_time.*       per-epoch training time relative to SGD-m on the same device
    final_metrics.*           final and best test accuracy or BLEU
    time_breakdown.*          time per step by part, for runs with trainer.profile=true
    runs.csv                  every run used: folder, device, seed, status, git commit
    *_curves.png              test metric against epochs and training time, per row
    *_time_breakdown.png      the time breakdown as stacked bars
    *_gram.png                Gram-matrix heat maps from python -m scripts.gram_heatmap

Exit status 2 on invalid input (no runs, runs from several devices in one comparison).
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

from scripts.tables.build import breakdown_table, epoch_time_table, final_metric_table, target_table
from scripts.tables.compute import group_rows
from scripts.tables.figures import find_gram_files, plot_breakdown, plot_curves, plot_gram
from scripts.tables.records import Run, load_runs, load_wandb_runs

logger = logging.getLogger("scripts.make_tables")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.make_tables",
        description="Build the paper's tables and figures from training runs.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--runs", nargs="+", metavar="DIR",
                        help="folders searched recursively for run.json and metrics.jsonl")
    source.add_argument("--wandb", metavar="ENTITY/PROJECT",
                        help="read the runs of this W&B project instead (needs network access "
                             "and `wandb login`)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="folder for the tables and figures (created if missing)")
    parser.add_argument("--device", metavar="LABEL",
                        help="use only the runs of this device, as labelled in the tables "
                             "(e.g. 'NVIDIA H200')")
    parser.add_argument("--experiment", nargs="+", metavar="NAME",
                        help="use only the runs of these experiments (benchmark.name)")
    parser.add_argument("--target", type=float, metavar="ACCURACY",
                        help="test-accuracy target of Table II as a fraction (e.g. 0.935) for "
                             "every row; by default each preset's benchmark.target_test_accuracy")
    parser.add_argument("--include-unfinished", action="store_true",
                        help="also use runs that are still running, were interrupted or failed")
    parser.add_argument("--normalise-gram", action="store_true",
                        help="draw Gram matrices as cosine similarities instead of raw K")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only")
    args = parser.parse_args(argv)
    if args.target is not None and not 0.0 < args.target <= 1.0:
        parser.error(f"--target {args.target} is invalid; give a fraction in (0, 1], "
                     "e.g. 0.935 for 93.5%")
    return args


def select_runs(runs: list[Run], device: Optional[str], experiments: Optional[list[str]]
                ) -> list[Run]:
    if device is not None:
        labels = sorted({run.device_label for run in runs})
        runs = [run for run in runs if run.device_label == device]
        if not runs:
            raise ValueError(f"no run ran on --device {device!r}; the devices of the runs "
                             f"are: {'; '.join(labels)}")
    if experiments:
        names = sorted({run.experiment for run in runs})
        runs = [run for run in runs if run.experiment in experiments]
        if not runs:
            raise ValueError(f"no run belongs to --experiment {' '.join(experiments)}; the "
                             f"experiments of the runs are: {', '.join(names)}")
    return runs


def write_run_list(runs: list[Run], path: Path) -> None:
    """Write ``runs.csv``: one line per run used, so each number can be traced to its run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file, lineterminator="\n")
        writer.writerow(["source", "experiment", "dataset", "model", "scale", "arm", "seed",
                         "device", "status", "epochs", "git_commit", "git_dirty"])
        for run in sorted(runs, key=lambda run: run.source):
            git = run.git or {}
            writer.writerow([run.source, run.experiment, run.dataset, run.model, run.scale,
                             run.arm, run.seed, run.device_label, run.status,
                             run.records[-1]["epoch"], git.get("commit") or "",
                             "" if git.get("dirty") is None else git.get("dirty")])


def make_tables(args: argparse.Namespace) -> list[Path]:
    """Read the runs, then write the tables and figures; return the files written."""
    if args.wandb:
        runs, skipped = load_wandb_runs(args.wandb, args.include_unfinished)
        roots = []
    else:
        runs, skipped = load_runs(args.runs, args.include_unfinished)
        roots = args.runs
    for message in skipped:
        logger.warning("Skipped %s", message)
    if not runs:
        raise ValueError(f"no usable run found in {args.wandb or ' '.join(args.runs)}"
                         + (f" ({len(skipped)} skipped, see the warnings above)" if skipped else
                            "; each run folder holds run.json and metrics.jsonl"))
    runs = select_runs(runs, args.device, args.experiment)
    logger.info("Read %d runs (%d skipped)", len(runs), len(skipped))

    rows = group_rows(runs)
    out_dir = Path(args.out)
    written = []
    for table in (target_table(rows, args.target), epoch_time_table(rows),
                  final_metric_table(rows), breakdown_table(rows)):
        if table is not None:
            written += table.write(out_dir)
    write_run_list(runs, out_dir / "runs.csv")
    written.append(out_dir / "runs.csv")

    if not args.no_figures:
        for row in rows:
            for plot in (plot_curves, plot_breakdown):
                path = plot(row, out_dir)
                if path is not None:
                    written.append(path)
        for gram_path in find_gram_files(roots):
            written.append(plot_gram(gram_path, out_dir, args.normalise_gram))
    return written


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = parse_args(argv)
    try:
        written = make_tables(args)
    except (ValueError, FileNotFoundError) as error:
        logger.error("%s", error)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
