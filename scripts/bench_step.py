"""Time full training steps of several optimizers, interleaved in one process.

    python -m scripts.bench_step --model resnet32 --batch-size 128 \
        --optimizers sgdm,fngd,ngd --steps 20 --device cpu --out results/bench.json

Each optimizer trains its own copy of the model (same initial weights) on synthetic batches
of the model's input shape: CIFAR images for the ResNets, Multi30K-length token sequences
(batch of sentences) for ``--model transformer``. After a warm-up, one timed round runs one step of every optimizer,
in an order that rotates from round to round, so that drift in the machine's speed (other
processes, thermal limits) falls on all of them alike. A step is forward, backward,
preconditioning and update, timed between device synchronisations. FNGD is timed twice: in its
first epoch, where every step solves for coefficients (``fngd/solve``), and in a later epoch,
where it reuses them (``fngd/reuse``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from torch.nn import functional as F

from data.text import synthetic_token_batch
from models.transformer import Transformer
from trainer.optim import build_optimizer

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"

# Datasets whose shapes the synthetic batches take, by model.
DATASET_OF_MODEL = {"resnet32": "cifar10", "resnet110": "cifar10",
                    "resnet18": "cifar100", "resnet34": "cifar100", "transformer": "multi30k"}

# Vocabulary sizes of Multi30K (German source, English target, lower-cased, min_freq 2).
SOURCE_VOCAB_SIZE = 7851
TARGET_VOCAB_SIZE = 5892


class Contender:
    """One optimizer under test: its model copy, optimizer and the phase it is timed in."""

    def __init__(self, label: str, phase: str, model, optimizer):
        self.label = label
        self.phase = phase
        self.model = model
        self.optimizer = optimizer
        self.times: list[float] = []


def compose_config(model: str, optimizer: str, extra: list[str]):
    dataset = DATASET_OF_MODEL.get(model, "cifar10")
    overrides = [f"model={model}", f"optimizer={optimizer}", f"dataset={dataset}"] + extra
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def make_contenders(args, device) -> list[Contender]:
    names = [name.strip() for name in args.optimizers.split(",") if name.strip()]
    if "sgdm" not in names:
        names.insert(0, "sgdm")  # every ratio is relative to SGD-m

    base_cfg = compose_config(args.model, "sgdm", args.override)
    torch.manual_seed(args.seed)
    if is_translation(args.model):
        base_model = instantiate(base_cfg.model, source_vocab_size=SOURCE_VOCAB_SIZE,
                                 target_vocab_size=TARGET_VOCAB_SIZE)
    else:
        base_model = instantiate(base_cfg.model, num_classes=base_cfg.dataset.num_classes)
    base_model = base_model.to(device)

    contenders = []
    for name in names:
        cfg = compose_config(args.model, name, args.override)
        if name == "fngd":
            # Epoch 0 never ends for the solve contender; the reuse contender's first epoch is
            # its warm-up, so every timed step reuses coefficients.
            phases = [("solve", 10 ** 9), ("reuse", args.warmup)]
        else:
            phases = [("every_step", args.warmup)]
        for phase, steps_per_epoch in phases:
            model = copy.deepcopy(base_model)
            optimizer = build_optimizer(cfg.optimizer, model, steps_per_epoch)
            contenders.append(Contender(name, phase, model, optimizer))
    return contenders


def is_translation(model_name: str) -> bool:
    return DATASET_OF_MODEL.get(model_name) == "multi30k"


def synthetic_batches(model_name: str, batch_size: int, count: int, device, seed: int):
    """Return ``count`` batches: CIFAR-shaped images and labels, or Multi30K-shaped token ids."""
    if is_translation(model_name):
        return [synthetic_token_batch(batch_size, SOURCE_VOCAB_SIZE, TARGET_VOCAB_SIZE,
                                      seed=seed + i, device=device) for i in range(count)]
    generator = torch.Generator().manual_seed(seed)
    classes = 100 if DATASET_OF_MODEL.get(model_name) == "cifar100" else 10
    batches = []
    for _ in range(count):
        images = torch.randn(batch_size, 3, 32, 32, generator=generator)
        labels = torch.randint(0, classes, (batch_size,), generator=generator)
        batches.append((images.to(device), labels.to(device)))
    return batches


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(contender: Contender, batch, autocast: bool, device) -> None:
    inputs, targets = batch
    contender.optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        if isinstance(contender.model, Transformer):
            summed, tokens = contender.model.loss(inputs, targets)
            loss = summed / tokens
        else:
            loss = F.cross_entropy(contender.model(inputs), targets)
    loss.backward()
    contender.optimizer.step()


def run(args) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    contenders = make_contenders(args, device)
    batches = synthetic_batches(args.model, args.batch_size, 4, device, args.seed)
    for contender in contenders:
        contender.model.train()

    for step in range(args.warmup):
        for contender in contenders:
            train_step(contender, batches[step % len(batches)], args.autocast, device)
    synchronize(device)

    for step in range(args.steps):
        shift = step % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            batch = batches[step % len(batches)]
            synchronize(device)
            start = time.perf_counter()
            train_step(contender, batch, args.autocast, device)
            synchronize(device)
            contender.times.append(time.perf_counter() - start)
        print(f"\rround {step + 1}/{args.steps}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)

    sgdm_median = statistics.median(contenders[0].times)
    results = []
    for contender in contenders:
        median = statistics.median(contender.times)
        entry = {"optimizer": contender.label, "phase": contender.phase,
                 "median_step_s": median, "ratio_to_sgdm": median / sgdm_median,
                 "min_step_s": min(contender.times),
                 # The mean includes the steps that refresh statistics or inverses only every
                 # so often (KFAC, Shampoo), which the median leaves out.
                 "mean_step_s": statistics.fmean(contender.times),
                 "steps": len(contender.times)}
        stats = getattr(contender.optimizer, "stats", None)
        if stats is not None:
            entry["optimizer_stats"] = stats()
        results.append(entry)

    return {
        "command": "python -m scripts.bench_step " + " ".join(args.argv),
        "device": device_name(device),
        "model": args.model,
        "batch_size": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "autocast_bf16": args.autocast,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "overrides": args.override,
        "results": results,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(report: dict) -> str:
    lines = [f"{report['model']}, batch {report['batch_size']}, {report['device']}, "
             f"median of {report['steps']} interleaved steps",
             f"{'optimizer':<10} {'phase':<11} {'median s':>9} {'x SGD-m':>8} {'mean s':>8}"]
    for entry in report["results"]:
        lines.append(f"{entry['optimizer']:<10} {entry['phase']:<11} "
                     f"{entry['median_step_s']:>9.4f} {entry['ratio_to_sgdm']:>8.3f} "
                     f"{entry['mean_step_s']:>8.4f}")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet32", help="model config name (configs/model)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizers", default="sgdm,fngd,ngd",
                        help="comma-separated optimizer config names (configs/optimizer)")
    parser.add_argument("--steps", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per optimizer first")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--autocast", action="store_true", help="bf16 autocast")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the report as JSON here")
    parser.add_argument("override", nargs="*", help="extra Hydra overrides, e.g. optimizer.alpha=0.1")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 1:
        parser.error("--batch-size, --steps and --warmup must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: CUDA is not available on this machine")
    return args


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    try:
        report = run(args)
    except MissingConfigException as error:
        # An unknown --model or --optimizers name; Hydra's message lists the valid ones.
        sys.exit(f"bench_step: {error}")
    print(format_table(report))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
