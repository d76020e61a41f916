"""Inference throughput: end to end (read, preprocess, model) against the model alone, same run.

The model alone is the optimised EfficientFormer on normalised tensors already in memory; end to
end is :func:`pathology.inference.predict.predict_tiles` over a :class:`pathology.data.TileDataset`
of a real slide's tiles (read lazily from the slide, or from a store holding the pixels), with
DataLoader workers, through Lightning's predict loop (Trainer set-up included). Both use the
same batch size, in the same process, alternating; each side's best of ``--repeats`` runs counts,
the run least disturbed by other jobs on a shared machine. The ratio is the result; the goal is
≥ 0.85.

Usage: python benchmarks/bench_inference.py [--data ../shared/data] [--workers 0,1,2] [--tiles 256] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pathology.checkpoint import ModelSpec
from pathology.data import TileDataset, eval_transform
from pathology.inference.predict import RunOptions, predict_tiles
from pathology.models import create_model
from pathology.models.optimize import fuse_for_inference
from wsi_tiling import Resolution, tile_slide
from wsi_tiling.synthetic import StripesPainter, write_slide

MODEL = "efficientformer_l1"
TILE_PX = 224
MPP = 0.5
CMU = "slides/CMU-1-Small-Region.svs"
FALLBACK_SIZE_PX = (4096, 4096)  # synthetic 0.25 µm/px slide when the real data is absent


def slide_path(data: Path, workdir: Path) -> Path:
    """The real CMU H&E slide, or a synthetic stand-in."""
    if (data / CMU).is_file():
        return data / CMU
    painter = StripesPainter(0.25, 8.0, ((0.0, 0.0, 1024.0, 1024.0),))
    return write_slide(workdir / "stripes.svs", painter, FALLBACK_SIZE_PX, mpp=0.25)


def tile_table(slide: Path, workdir: Path, n_tiles: int, save_tiles: bool) -> pd.DataFrame:
    """Every grid tile of the slide at 0.5 µm/px, repeated to ``n_tiles`` rows."""
    result = tile_slide(slide, workdir / ("stored" if save_tiles else "lazy"), Resolution(MPP, "mpp"), TILE_PX,
                        min_tissue=0.0, save_tiles=save_tiles)
    index = np.resize(np.arange(result.n_tiles), n_tiles)
    return pd.DataFrame({"path": str(result.h5_path), "tile_index": index, "slide_path": str(slide), "label": -1})


def model_alone(model: torch.nn.Module, n_tiles: int, batch_size: int) -> float:
    """Tiles/s of the model on in-memory normalised tensors (the same forward as predict_step)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    batch = torch.randn(batch_size, 3, TILE_PX, TILE_PX, device=device).contiguous(memory_format=torch.channels_last)
    n_batches = -(-n_tiles // batch_size)
    with torch.inference_mode():
        model.forward_head(model.forward_features(batch))  # warm-up
        start = time.perf_counter()
        for _ in range(n_batches):
            model.forward_head(model.forward_features(batch)).float().softmax(dim=1).cpu()
    seconds = time.perf_counter() - start
    model.to("cpu")
    return n_batches * batch_size / seconds


def end_to_end(model: torch.nn.Module, table: pd.DataFrame, spec: ModelSpec, batch_size: int, workers: int,
               workdir: Path) -> float:
    """Tiles/s of predict_tiles: read, preprocess in workers, model, gather (Trainer set-up included)."""
    dataset = TileDataset(table, eval_transform(spec.img_size, spec.mean, spec.std))
    options = RunOptions(batch_size=batch_size, num_workers=workers, accelerator="auto", progress_bar=False)
    start = time.perf_counter()
    predict_tiles(model, dataset, workdir / "shards", options)
    return len(table) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to try")
    parser.add_argument("--tiles", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per case; the best counts")
    args = parser.parse_args()
    spec = ModelSpec(MODEL, {32: 1}, ("a", "b"), TILE_PX, TILE_PX, Resolution(MPP, "mpp"))
    model = fuse_for_inference(create_model(MODEL, num_classes=2, img_size=TILE_PX))
    print(f"{MODEL} at {TILE_PX} px, batch {args.batch_size}, {args.tiles} tiles, best of {args.repeats}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, "
          f"device {'cuda' if torch.cuda.is_available() else 'cpu'}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        slide = slide_path(args.data, workdir)
        print(f"slide: {slide.name}")
        print(f"{'tiles from':<12} {'workers':>7} {'model tiles/s':>14} {'e2e tiles/s':>12} {'ratio':>6}")
        for save_tiles in (False, True):
            table = tile_table(slide, workdir, args.tiles, save_tiles)
            for workers in (int(w) for w in args.workers.split(",")):
                runs = [(model_alone(model, args.tiles, args.batch_size),
                         end_to_end(model, table, spec, args.batch_size, workers, workdir))
                        for _ in range(args.repeats)]
                baseline, e2e = max(r[0] for r in runs), max(r[1] for r in runs)
                source = "h5 pixels" if save_tiles else "slide"
                print(f"{source:<12} {workers:>7} {baseline:>14.1f} {e2e:>12.1f} {e2e / baseline:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
