"""Training throughput of the full pipeline against a bare forward + backward loop, same process.

Full pipeline: PNG tiles → TileDataset (decode, augmentation incl. HED jitter, resize, normalise)
→ DataLoader → Lightning ``Trainer.fit`` of :class:`TileClassifier` (loss, AdamW, scheduler,
logging). Baseline: the same model, batch and optimiser on in-memory random tensors. The ratio
(pipeline tiles/s ÷ bare tiles/s) is what matters; the goal is ≥ 0.8. The baseline runs before and
after the pipeline and is averaged, since a shared CPU drifts.

    python benchmarks/bench_training.py                    # the IDC tiles under ../shared/data
    python benchmarks/bench_training.py --steps 20 --img-size 96 --workers 1
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from pathology.data import ImageFolderSource, TileDataModule
from pathology.models import create_model
from pathology.training import TileClassifier

REPO = Path(__file__).resolve().parents[1]
IDC_TILES = REPO.parent / "shared" / "data" / "tiles" / "idc_breast"
CLASSES = ["non_idc", "idc"]
WARMUP_STEPS = 2


class StepTimer(Callback):
    """Wall-clock time from the start of step ``WARMUP_STEPS`` to the end of the last step."""

    def __init__(self) -> None:
        self.start, self.end, self.steps = 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end, self.steps = time.perf_counter(), trainer.global_step - WARMUP_STEPS


def bare_tiles_per_s(img_size: int, batch: int, steps: int) -> float:
    """Forward + backward + AdamW on one in-memory batch, ``steps`` times after a warm-up."""
    model = create_model("efficientformer_l1", num_classes=len(CLASSES), img_size=img_size).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(batch, 3, img_size, img_size), torch.randint(0, len(CLASSES), (batch,))
    for step in range(WARMUP_STEPS + steps):
        if step == WARMUP_STEPS:
            start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def pipeline_tiles_per_s(tiles: Path, split_csv: Path, img_size: int, batch: int, steps: int, workers: int) -> float:
    """``Trainer.fit`` on real tiles with the training augmentation, timed by :class:`StepTimer`."""
    data = TileDataModule(ImageFolderSource(tiles, r"^(\d+)_idx5"), CLASSES, split_csv, tile_size=50,
                          resolution="2.5x", img_size=img_size, batch_size=batch, num_workers=workers)
    model = TileClassifier(CLASSES, tile_size=50, resolution="2.5x", img_size=img_size)
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", max_steps=WARMUP_STEPS + steps, limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    trainer.fit(model, datamodule=data)
    return timer.steps * batch / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiles", type=Path, default=IDC_TILES, help="folder of class sub-folders of PNG tiles")
    parser.add_argument("--split-csv", type=Path, default=REPO / "configs" / "splits" / "idc_breast_seed0.csv")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    before = bare_tiles_per_s(args.img_size, args.batch_size, args.steps)
    pipeline = pipeline_tiles_per_s(args.tiles, args.split_csv, args.img_size, args.batch_size, args.steps,
                                    args.workers)
    after = bare_tiles_per_s(args.img_size, args.batch_size, args.steps)
    bare = (before + after) / 2
    print(f"efficientformer_l1, {args.img_size} px, batch {args.batch_size}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} torch threads, {args.workers} loader worker(s)")
    print(f"bare loop (in-memory tensors): {bare:.1f} tiles/s (before {before:.1f}, after {after:.1f})")
    print(f"full pipeline (PNG → augment → Lightning): {pipeline:.1f} tiles/s")
    print(f"ratio: {pipeline / bare:.2f} (goal ≥ 0.8)")


if __name__ == "__main__":
    main()
