"""The real result: EfficientFormer-L1 on the IDC breast tiles, trained to a wall-clock budget.

Measures the time of one training step on this machine, sizes a first ``max_epochs`` so that
training (and its per-epoch validation) fits the budget, lets :class:`pathology.training.TimeBudget`
re-plan it after every epoch from the measured epoch time (the CPU is shared, its speed varies),
sets ``max_time`` as a hard stop, trains with
``configs/train_idc.yaml`` and evaluates the best checkpoint (by validation AUROC) on the
held-out test patients. Prints and writes ``results.json`` with tile-level balanced accuracy, F1
and AUROC next to the paper's (Cruz-Roa et al. 2014: balanced accuracy 0.8423, F1 0.718).

    python benchmarks/train_idc.py --minutes 30            # the reported run
    python benchmarks/train_idc.py --minutes 2 --out runs/idc_smoke
    python benchmarks/train_idc.py --minutes 30 --img-size 32 --out runs/idc_32px   # more epochs per minute
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import yaml

from pathology.atomic import atomic_path
from pathology.models import create_model
from pathology.training.fit import fit

REPO = Path(__file__).resolve().parents[1]
PAPER = {"balanced_accuracy": 0.8423, "f1": 0.718}
TIMED_STEPS = 3
EVAL_COST = 1 / 3  # a validation tile costs about a third of a training tile (forward only)
OVERHEAD_MINUTES = 2.0  # start-up, data set-up and the final test pass, outside the trainer's budget
TRAIN_FRACTION = 0.6  # share of tiles in the train split (60 / 20 / 20 % of patients)
MIN_BATCHES = 2
TIME_SAFETY = 1.1  # the hard stop (Lightning's max_time) allows 10 % over the plan when the CPU slows down


def seconds_per_tile(config: dict) -> float:
    """Wall-clock seconds per training tile: forward + backward + AdamW step on one batch."""
    model_cfg, batch = config["model"], config["data"]["batch_size"]
    n_classes = len(config["data"]["class_names"])
    model = create_model(model_cfg["model_name"], num_classes=n_classes, img_size=model_cfg["img_size"])
    optimizer = torch.optim.AdamW(model.parameters())
    images = torch.randn(batch, 3, model_cfg["img_size"], model_cfg["img_size"])
    labels = torch.randint(0, n_classes, (batch,))
    for step in range(TIMED_STEPS + 1):
        if step == 1:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / (TIMED_STEPS * batch)


def plan(train_minutes: float, tile_s: float, n_tiles: int, batch: int) -> tuple[int, int | None]:
    """Whole epochs (training plus validation) that fit the budget, so the cosine schedule ends and
    every epoch is validated; below one epoch, one epoch cut to the training batches that fit.

    Returns:
        (max_epochs, training batches per epoch or None for all of them).
    """
    n_train, n_val = TRAIN_FRACTION * n_tiles, (1 - TRAIN_FRACTION) / 2 * n_tiles
    budget_s, val_s = train_minutes * 60, tile_s * n_val * EVAL_COST
    epoch_s = tile_s * n_train + val_s
    if budget_s >= epoch_s:
        return int(budget_s // epoch_s), None
    return 1, max(MIN_BATCHES, int((budget_s - val_s) / (tile_s * batch)))


def duration(seconds: float) -> str:
    """Lightning's ``DD:HH:MM:SS`` form of a number of seconds."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours // 24:02d}:{hours % 24:02d}:{minutes:02d}:{secs:02d}"


def loggers(out: Path) -> str:
    """The config's CSV and TensorBoard loggers, writing under ``out`` (a JSON list for the CLI)."""
    kinds = {"csv": "CSVLogger", "tensorboard": "TensorBoardLogger"}
    return json.dumps([{"class_path": f"lightning.pytorch.loggers.{cls}",
                        "init_args": {"save_dir": str(out), "name": name}}
                       for name, cls in kinds.items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock budget of the whole run")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train_idc.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/idc"), help="logs, checkpoints, results.json")
    parser.add_argument("--n-tiles", type=int, default=7431, help="tiles in the set (IDC: 7,431)")
    parser.add_argument("--img-size", type=int, default=None,
                        help="model input edge (multiple of 32), overriding the config's; 32 is ~3x faster than 64")
    args, overrides = parser.parse_known_args()
    started = time.perf_counter()
    config = yaml.safe_load(args.config.read_text())
    if args.img_size is not None:
        config["model"]["img_size"] = args.img_size
        overrides = ["--model.img_size", str(args.img_size), *overrides]
    tile_s = seconds_per_tile(config)
    train_minutes = max(0.5, args.minutes - OVERHEAD_MINUTES - (time.perf_counter() - started) / 60)
    epochs, batches = plan(train_minutes, tile_s, args.n_tiles, config["data"]["batch_size"])
    print(f"{1 / tile_s:.1f} training tiles/s measured; {epochs} epoch(s) of {batches or 'all'} batches "
          f"planned in {train_minutes:.1f} min")
    limit = [] if batches is None else ["--trainer.limit_train_batches", str(batches)]
    budget = {"class_path": "pathology.training.TimeBudget", "init_args": {"minutes": train_minutes}}
    result = fit(["--config", str(args.config), "--trainer.max_epochs", str(epochs), *limit,
                  f"--trainer.callbacks+={json.dumps(budget)}",
                  "--trainer.max_time", duration(train_minutes * 60 * TIME_SAFETY),
                  "--trainer.default_root_dir", str(args.out), "--trainer.logger", loggers(args.out), *overrides])
    report = {
        "test": {k: result.metrics.get(f"test/{k}") for k in ("balanced_accuracy", "f1", "auroc", "accuracy")},
        "val": {k: result.metrics.get(f"val/{k}") for k in ("balanced_accuracy", "f1", "auroc")},
        "decision_threshold": result.metrics.get("val/decision_threshold"),  # model.decision_rule: youden
        "paper": PAPER, "epochs_planned": epochs, "batches_per_epoch": batches,
        "minutes": (time.perf_counter() - started) / 60,
        "best_checkpoint": str(result.best_checkpoint), "config": str(args.config),
        "img_size": config["model"]["img_size"], "training_tiles_per_s": 1 / tile_s,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads",
    }
    with atomic_path(args.out / "results.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
