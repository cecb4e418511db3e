"""Train a model configured by Hydra.

    python -m scripts.train                                   # ResNet-32, CIFAR-10, SGD-m
    python -m scripts.train experiment=demo                   # a few minutes on a CPU
    python -m scripts.train optimizer=adamw trainer.epochs=10 dataset.train_subset=5000
    python -m scripts.train -m optimizer=sgdm,adamw seed=0,1  # a sweep, one job per combination
    python -m scripts.train trainer.resume=outputs/DATE/TIME  # continue an interrupted run

Each job writes metrics.jsonl, run.json and checkpoint.pt to its Hydra run directory.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from scripts import gpu_slots
from trainer.train import train

# ${fngd_gpu_count:} and ${fngd_worker_gpu:} of hydra/launcher=joblib_gpus.
gpu_slots.register_resolvers()


@hydra.main(config_path="../configs", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Run one training job; return the last test accuracy (BLEU for translation) for sweepers."""
    # Joblib workers receive this function without running this module's top level.
    gpu_slots.register_resolvers()
    try:
        records = train(cfg)
    except KeyboardInterrupt:
        # The trainer has logged where the last checkpoint is; 130 is the shell's code for
        # a process ended by Ctrl-C.
        sys.exit(130)
    if not records:
        return None
    last = records[-1]
    return last.get("test_accuracy", last.get("test_bleu"))


if __name__ == "__main__":
    main()
