"""The real result: ``pathology train --config configs/train_idc.yaml`` on the IDC breast tiles, over seeds.

Each seed trains with the config (plus any ``pathology train`` override given after the options),
then its best checkpoint (by validation AUROC) predicts the validation and the held-out test
patients with and without test-time augmentation (TTA). Four rows come out of one training run:
argmax, the threshold chosen on the validation patients (Youden's J), TTA, TTA with its own
validation threshold. Test patients choose nothing. Each seed's ``seed_<k>/result.json`` is written
when it finishes (a rerun skips finished seeds, so seeds can also run as separate processes, e.g.
one per core with ``OMP_NUM_THREADS=1``); ``results.json`` holds the mean and sample sd over seeds
next to the paper's figures (Cruz-Roa et al. 2014: balanced accuracy 0.8423, F1 0.718).

    python benchmarks/train_idc.py --seeds 0 1 2 --out runs/idc             # the reported runs
    python benchmarks/train_idc.py --seeds 0 --out runs/idc_mix --model.mixup_alpha 0.2   # an override
    python benchmarks/train_idc.py --seeds 0 1 2 --out runs/idc --report    # only gather finished seeds
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pathology.atomic import atomic_path
from pathology.checkpoint import load_inference_model
from pathology.inference.predict import RunOptions
from pathology.training.fit import fit
from pathology.training.metrics import classification_metrics, youden_tile_threshold
from pathology.training.predict_tiles import tile_probabilities

REPO = Path(__file__).resolve().parents[1]
PAPER = {"balanced_accuracy": 0.8423, "f1": 0.718}
METRICS = ("balanced_accuracy", "f1", "auroc", "accuracy")
VARIANTS = {"argmax": (False, False), "threshold": (False, True), "tta": (True, False), "tta+threshold": (True, True)}


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def evaluate(checkpoint: Path, tables: dict[str, pd.DataFrame]) -> dict[str, dict[str, float]]:
    """Test metrics of every :data:`VARIANTS` row; each threshold is chosen on the validation tiles."""
    model, spec = load_inference_model(checkpoint)
    options = RunOptions(progress_bar=False, backend="torch")
    rows = {}
    for name, (tta, threshold_on) in VARIANTS.items():
        probs = {split: tile_probabilities(model, spec, tables[split], options, tta) for split in ("val", "test")}
        labels = {split: tables[split]["label"].to_numpy() for split in probs}
        threshold = youden_tile_threshold(labels["val"], probs["val"]) if threshold_on else None
        metrics = classification_metrics(labels["test"], probs["test"], threshold)
        rows[name] = {k: metrics[k] for k in METRICS} | {"threshold": threshold}
    return rows


def run_seed(config: Path, seed: int, out: Path, overrides: list[str]) -> dict:
    """Trains one seed (unless its result file exists) and evaluates its best checkpoint."""
    folder = out / f"seed_{seed}"
    if (folder / "result.json").is_file():
        return json.loads((folder / "result.json").read_text())
    start, load_before = time.perf_counter(), os.getloadavg()[0]
    result = fit(["--config", str(config), "--seed_everything", str(seed),
                  "--trainer.default_root_dir", str(folder), *overrides])
    minutes = (time.perf_counter() - start) / 60
    record = {
        "seed": seed, "config": str(config), "overrides": overrides, "train_minutes": minutes,
        "best_checkpoint": str(result.best_checkpoint),
        "best_epoch": int(torch.load(result.best_checkpoint, map_location="cpu", weights_only=True)["epoch"]),
        "val": {k: result.metrics.get(f"val/{k}") for k in ("balanced_accuracy", "f1", "auroc")},
        "test": evaluate(result.best_checkpoint, result.tables),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"{torch.get_num_threads()} torch threads, load average {load_before:.1f} at start, "
                   f"{os.getloadavg()[0]:.1f} at end",
    }
    _write_json(folder / "result.json", record)
    return record


def summarise(records: list[dict]) -> dict:
    """Mean and sample sd over seeds of every variant's test metrics."""
    summary = {}
    for name in VARIANTS:
        values = pd.DataFrame([r["test"][name] for r in records])[list(METRICS)]
        summary[name] = {"mean": values.mean().to_dict(),
                         "sd": values.std(ddof=1).to_dict() if len(values) > 1 else None}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "train_idc.yaml")
    parser.add_argument("--out", type=Path, default=Path("runs/idc"), help="seed_<k>/ folders and results.json")
    parser.add_argument("--report", action="store_true", help="only gather the seeds already finished")
    args, overrides = parser.parse_known_args()
    records = []
    for seed in args.seeds:
        done = (args.out / f"seed_{seed}" / "result.json").is_file()
        if done or not args.report:
            records.append(run_seed(args.config, seed, args.out, overrides))
    summary = summarise(records)
    _write_json(args.out / "results.json", {"seeds": [r["seed"] for r in records], "test": summary,
                                            "paper": PAPER, "runs": records})
    print(f"{len(records)} seed(s); test patients, mean ± sd:")
    for name, stats in summary.items():
        sd = stats["sd"] or dict.fromkeys(METRICS, float("nan"))
        print(f"  {name:14s} " + "  ".join(f"{k} {stats['mean'][k]:.3f} ± {sd[k]:.3f}" for k in METRICS[:3]))
    minutes = np.array([r["train_minutes"] for r in records])
    print(f"training minutes per seed: {', '.join(f'{m:.1f}' for m in minutes)}")


if __name__ == "__main__":
    main()
