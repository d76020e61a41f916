"""``pathology infer`` over a cohort: end-to-end speed against the model alone, and memory against cohort size.

1. **Speed.** A cohort of ``--slides`` generated slides is predicted from raw slides (tiling
   included, a fresh tile folder every time, so no store is reused) with
   :func:`pathology.inference.infer.infer_slides`; its tiles/s (tiles over the call's wall time,
   model loading and Fabric set-up included) is compared with the model alone on normalised
   tensors already in memory (the same :class:`~pathology.inference.predict.Predictor`, batch
   size and tile count), in the same process, alternating; each side's best of ``--repeats``
   runs counts (the run least disturbed by other jobs on a shared machine). Goal: ratio ≥ 0.9,
   i.e. tiling and reading hidden behind the model. The runtime's graph export, which a cohort
   pays once per checkpoint (it is cached next to it), is done and timed before, not inside,
   the measured runs. ``--threads`` runs the model on fewer CPU threads than the machine has, so
   the reader has cores of its own, as on a machine where the model is the bottleneck: on the
   2-core VM, ``--threads 1`` measures that case, the default the case where reader and model
   share every core.
2. **Memory.** Peak RSS of ``pathology infer --embeddings`` on ``--rss-slides`` cohorts (default
   5 and 40 slides), each in a fresh process (``os.wait4``'s ``ru_maxrss``). Streaming holds one
   slide's worth, so the goal is large/small ≤ 1.2.

Slides are ``--distinct`` generated files (H&E-like stripes over a tissue box, JPEG, 0.25 µm/px,
pyramid 1/4/16) listed under as many slide ids as the cohort needs (a CSV), so generating them
stays cheap; every slide id is tiled and predicted on its own.

Usage: python benchmarks/bench_inference.py [--slides 20] [--rss-slides 5,40] [--model efficientformer_l1]
       [--img-size 224] [--batch-size 64] [--workers N] [--threads N] [--repeats 2] [--quick]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pathology.checkpoint import ModelSpec, save_checkpoint
from pathology.inference.infer import infer_slides
from pathology.inference.predict import DEFAULT_WORKERS, RunOptions, make_predictor, start_devices
from pathology.models import create_model
from wsi_tiling import Resolution
from wsi_tiling.synthetic import StripesPainter, write_slide

SLIDE_MPP = 0.25  # a 40x scan
MODEL_MPP = 0.5
STRIPES_PERIOD_UM = 8.0
WARM_UP_BATCHES = 3  # oneDNN picks its kernels on the first calls
BYTES_PER_KIB = 1024  # Linux reports ru_maxrss in KiB
QUICK = {"slides": 4, "rss_slides": "2,4", "model": "efficientformer_tiny", "img_size": 64, "slide_px": 1024,
         "distinct": 2, "repeats": 1, "batch_size": 16}


def make_slides(folder: Path, distinct: int, slide_px: int) -> list[Path]:
    """``distinct`` slides of ``slide_px``² level-0 pixels, tissue over the middle 80 %."""
    side_um = slide_px * SLIDE_MPP
    paths = []
    for i in range(distinct):
        margin = side_um * (0.1 + 0.01 * i)  # slightly different tissue boxes
        painter = StripesPainter(SLIDE_MPP, STRIPES_PERIOD_UM, ((margin, margin, side_um - 2 * margin,
                                                                 side_um - 2 * margin),))
        paths.append(write_slide(folder / f"distinct_{i}.svs", painter, (slide_px, slide_px), mpp=SLIDE_MPP))
    return paths


def cohort_csv(path: Path, slides: list[Path], n_slides: int) -> Path:
    """A slide list naming ``n_slides`` slide ids, cycling over the generated files."""
    pd.DataFrame({"slide_path": [str(slides[i % len(slides)]) for i in range(n_slides)],
                  "slide_id": [f"slide_{i:04d}" for i in range(n_slides)]}).to_csv(path, index=False)
    return path


def model_alone(checkpoint_model: torch.nn.Module, spec: ModelSpec, options: RunOptions, n_tiles: int) -> float:
    """Tiles/s of the predictor on an in-memory batch of uint8 tiles (its input), ``n_tiles`` tiles in batches."""
    predictor = make_predictor(checkpoint_model, start_devices(options), (spec.mean, spec.std),
                               backend=options.backend, precision=options.precision)
    batch = torch.randint(0, 256, (options.batch_size, 3, spec.img_size, spec.img_size), dtype=torch.uint8)
    n_batches = -(-n_tiles // options.batch_size)
    for _ in range(WARM_UP_BATCHES):
        predictor.predict(batch)
    start = time.perf_counter()
    for _ in range(n_batches):
        predictor.predict(batch)
    return n_batches * options.batch_size / (time.perf_counter() - start)


def end_to_end(checkpoint: Path, listing: Path, workdir: Path, options: RunOptions, run: int) -> tuple[float, int]:
    """(tiles/s, tiles) of ``infer_slides`` from raw slides into a fresh run folder."""
    out = workdir / f"e2e_{run}"
    start = time.perf_counter()
    table = infer_slides(checkpoint, [listing], out, aggregations=["mean"], calibration=None, run=options)
    seconds = time.perf_counter() - start
    n_tiles = int(table.loc[table["status"] == "ok", "n_tiles"].sum())
    return n_tiles / seconds, n_tiles


def peak_rss_mib(checkpoint: Path, listing: Path, out: Path, options: RunOptions) -> float:
    """Peak RSS (MiB) of ``pathology infer --embeddings`` in a fresh process."""
    command = [sys.executable, "-m", "pathology.cli", "infer", str(listing), "--checkpoint", str(checkpoint),
               "--out", str(out), "--embeddings", "--aggregation", "mean", "--calibration", "none",
               "--batch-size", str(options.batch_size), "--num-workers", str(options.num_workers)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"pathology infer failed: {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss / BYTES_PER_KIB


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slides", type=int, default=20, help="cohort size for the speed comparison")
    parser.add_argument("--rss-slides", default="5,40", help="small,large cohort sizes for peak RSS")
    parser.add_argument("--distinct", type=int, default=8, help="distinct slide files generated")
    parser.add_argument("--slide-px", type=int, default=8192, help="level-0 edge of each slide (px)")
    parser.add_argument("--model", default="efficientformer_l1")
    parser.add_argument("--img-size", type=int, default=224, help="model input and tile edge (px)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS, help="DataLoader reader processes")
    parser.add_argument("--threads", type=int, help="CPU threads the model runs on (default: all of torch's); "
                                                     "fewer leave the reader cores of its own")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    parser.add_argument("--quick", action="store_true", help="tiny settings, to check the script runs")
    return parser


def main() -> None:
    args = _parser().parse_args()
    if args.quick:
        vars(args).update(QUICK)
    if args.threads:
        torch.set_num_threads(args.threads)  # the runtimes take torch's thread count
    options = RunOptions(batch_size=args.batch_size, num_workers=args.workers, progress_bar=False)
    spec = ModelSpec(args.model, {32: 1}, ("a", "b"), args.img_size, args.img_size, Resolution(MODEL_MPP, "mpp"))
    model = create_model(args.model, mhsa_blocks=spec.mhsa_blocks, num_classes=2, img_size=args.img_size).eval()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"{args.model} at {args.img_size} px ({MODEL_MPP} µm/px), batch {args.batch_size}, {args.workers} "
          f"workers, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, device {device}")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        checkpoint = save_checkpoint(workdir / "model.ckpt", model, spec)
        start = time.perf_counter()  # the export a cohort pays once, cached beside the checkpoint
        backend = make_predictor(model, start_devices(options), (spec.mean, spec.std), backend=options.backend,
                                 cache_dir=checkpoint.parent, precision=options.precision).runner.label
        print(f"backend {backend}: graph export and load {time.perf_counter() - start:.1f} s (once per checkpoint)")
        slides = make_slides(workdir, args.distinct, args.slide_px)
        listing = cohort_csv(workdir / "cohort.csv", slides, args.slides)
        alone, e2e = [], []
        for run in range(args.repeats):
            rate, n_tiles = end_to_end(checkpoint, listing, workdir, options, run)
            e2e.append(rate)
            alone.append(model_alone(model, spec, options, n_tiles))
            print(f"run {run}: {n_tiles} tiles, end to end {rate:.1f} tiles/s, model alone {alone[-1]:.1f} tiles/s",
                  flush=True)
        print(f"speed, {args.slides} slides from raw: end to end {max(e2e):.1f} tiles/s, model alone "
              f"{max(alone):.1f} tiles/s, ratio {max(e2e) / max(alone):.2f} (goal >= 0.9)")
        sizes = [int(n) for n in args.rss_slides.split(",")]
        rss = {n: peak_rss_mib(checkpoint, cohort_csv(workdir / f"rss_{n}.csv", slides, n), workdir / f"rss_{n}",
                               options) for n in sizes}
        print("peak RSS with --embeddings: " + ", ".join(f"{n} slides {mib:.0f} MiB" for n, mib in rss.items())
              + f"; ratio {rss[sizes[-1]] / rss[sizes[0]]:.2f} (goal <= 1.2)")


if __name__ == "__main__":
    main()
