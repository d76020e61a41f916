"""Tiling throughput against two baselines measured in the same process, and peak memory.

For each case, tiles/s of ``wsi-tile --save-tiles`` (all grid tiles, ``--min-tissue 0``) against
(a) a naive loop reading each tile's level-0 footprint with ``read_region`` and area-resizing it,
(b) the decode limit: reading every native tile of the chosen level once, with the tiler's own
reader (1 thread, and one thread per core) and with OpenSlide's public ``read_region``. Then the
peak resident memory of a child process tiling a 50,000 × 50,000 synthetic slide. Ratios, not
absolute numbers, are the result: on a shared machine the absolute figures move with the load.

Usage: python benchmarks/bench_tiling.py [--data ../shared/data] [--skip-big] [--workdir DIR]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import openslide

from wsi_tiling import Resolution, SlideReader, TileReader, plan_read
from wsi_tiling.cli import main as wsi_tile
from wsi_tiling.synthetic import write_slide

TILE_SIZE = 256
LARGE_SIZE_PX = (20_000, 20_000)  # the multi-level 40x case
HUGE_SIZE_PX = (50_000, 50_000)  # the peak-memory case
MEMORY_LIMIT_MB = 1536
TEXTURE_PX = 1024
GRAIN_SIGMA = 6.0  # grey levels of per-pixel grain in the synthetic tissue
CORES = os.cpu_count() or 1


@dataclass(frozen=True)
class TexturePainter:
    """H&E-like texture (pink stroma, purple nuclei) repeated over a tissue disc; JPEG-realistic."""

    texture: np.ndarray
    size_px: tuple[int, int]

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        step = max(1, int(downsample))
        ys = (np.arange(y, y + height) * step) % TEXTURE_PX
        xs = (np.arange(x, x + width) * step) % TEXTURE_PX
        out = self.texture[ys[:, None], xs[None, :]]
        cx, cy = self.size_px[0] / 2, self.size_px[1] / 2
        gy = (np.arange(y, y + height)[:, None] * downsample - cy) / cy
        gx = (np.arange(x, x + width)[None, :] * downsample - cx) / cx
        out[gx**2 + gy**2 > 0.8] = 240
        return out


def make_texture(seed: int = 0) -> np.ndarray:
    """Pink stroma blending into purple nuclei with fine grain: after JPEG, its tiles deflate to
    ~90 % like real H&E (a flat two-colour texture would deflate to ~55 % and flatter the tiler)."""
    rng = np.random.default_rng(seed)
    blobs = cv2.GaussianBlur(rng.random((TEXTURE_PX, TEXTURE_PX)).astype(np.float32), (0, 0), 3)
    blobs = np.clip(((blobs - blobs.min()) / (blobs.max() - blobs.min()) - 0.4) * 4, 0, 1)[..., None]
    pink, purple = np.array([230, 150, 200], np.float32), np.array([90, 40, 140], np.float32)
    grain = rng.normal(0, GRAIN_SIGMA, (TEXTURE_PX, TEXTURE_PX, 1)) + rng.normal(0, GRAIN_SIGMA / 2, (TEXTURE_PX,
                                                                                                     TEXTURE_PX, 3))
    return np.clip(pink + (purple - pink) * blobs + grain, 0, 255).astype(np.uint8)


def cli_tiles_per_s(slide: Path, out: Path, resolution: Resolution) -> tuple[float, int]:
    os.utime(slide)  # a "new" file: the tiler's remembered tissue map of the last slide must not carry over
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        code = wsi_tile([str(slide), "--out", str(out), "--magnification", f"{resolution.value:g}", "--tile-size",
                         str(TILE_SIZE), "--save-tiles", "--min-tissue", "0", "--workers", str(CORES)])
    seconds = time.perf_counter() - start
    if code != 0:
        raise RuntimeError(f"wsi-tile failed on {slide}")
    n_tiles = len(TileReader(next(out.rglob("*.h5"))))
    return n_tiles / seconds, n_tiles


def naive_tiles_per_s(slide_path: Path, coords: np.ndarray, footprint: int) -> float:
    """What most scripts do: OpenSlide's public read_region of each level-0 footprint, then resize."""
    start = time.perf_counter()
    with openslide.OpenSlide(slide_path) as slide:
        for x, y in coords:
            region = np.asarray(slide.read_region((int(x), int(y)), 0, (footprint, footprint)).convert("RGB"))
            cv2.resize(region, (TILE_SIZE, TILE_SIZE), interpolation=cv2.INTER_AREA)
    return len(coords) / (time.perf_counter() - start)


def decode_seconds(slide_path: Path, level: int, threads: int, openslide_api: bool = False) -> float:
    """Seconds to read every native tile of ``level`` once, through the tiler's own reader or
    OpenSlide's public ``read_region``."""
    with SlideReader(slide_path) as slide, openslide.OpenSlide(slide_path) as plain:
        tile_w, tile_h = slide.native_tile_size(level) or (256, 256)
        width, height = slide.level_dimensions[level]
        downsample = slide.level_downsamples[level]
        origins = [(x, y) for y in range(0, height, tile_h) for x in range(0, width, tile_w)]

        def read(origin: tuple[int, int]) -> None:
            x, y = origin
            size = (min(tile_w, width - x), min(tile_h, height - y))
            xy_level0 = (round(x * downsample), round(y * downsample))
            if openslide_api:
                np.asarray(plain.read_region(xy_level0, level, size).convert("RGB"))
            else:
                slide.read_region(xy_level0, level, size)

        start = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(read, origins))
        return time.perf_counter() - start


def bench_case(name: str, slide_path: Path, resolution: Resolution, workdir: Path, repeats: int) -> None:
    """One table row; each figure is the best of ``repeats`` runs (the machine is shared)."""
    out = workdir / f"{name}_{resolution}".replace(" ", "_")
    rate, n_tiles = max(cli_tiles_per_s(slide_path, out / str(i), resolution) for i in range(repeats))
    reader = TileReader(next(out.rglob("*.h5")))
    with SlideReader(slide_path) as slide:
        plan = plan_read(resolution, slide)
    footprint = round(TILE_SIZE * plan.target_downsample)
    naive = max(naive_tiles_per_s(slide_path, reader.coords, footprint) for _ in range(repeats))
    decode_1 = n_tiles / min(decode_seconds(slide_path, plan.read_level, 1) for _ in range(repeats))
    decode_n = n_tiles / min(decode_seconds(slide_path, plan.read_level, CORES) for _ in range(repeats))
    decode_os = n_tiles / min(decode_seconds(slide_path, plan.read_level, 1, True) for _ in range(repeats))
    print(f"| {name} → {resolution} | {n_tiles} | level {plan.read_level} ×{plan.resize_factor:.3g} | "
          f"{rate:.0f} | {naive:.0f} ({rate / naive:.1f}×) | {decode_1:.0f} ({rate / decode_1:.2f}×) | "
          f"{decode_n:.0f} ({rate / decode_n:.2f}×) | {decode_os:.0f} ({rate / decode_os:.2f}×) |", flush=True)


def peak_memory_mb(slide: Path, workdir: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of a child ``wsi-tile --save-tiles`` at 20x on a huge slide."""
    command = [sys.executable, "-m", "wsi_tiling.cli", str(slide), "--out", str(workdir / "huge_out"),
               "--magnification", "20", "--tile-size", str(TILE_SIZE), "--save-tiles", "--workers", str(CORES)]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--workdir", type=Path, default=None, help="keep slides and outputs here")
    parser.add_argument("--skip-big", action="store_true", help="skip the 50,000 × 50,000 memory case")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"{CORES} cores; tiles {TILE_SIZE} px, every grid tile (--min-tissue 0)\n")
        print("| case | tiles | read | wsi-tile tiles/s | (a) naive tiles/s | (b) decode, 1 thread | "
              f"(b) decode, {CORES} threads | (b) decode, OpenSlide API |")
        print("|---|---|---|---|---|---|---|---|")
        shared_cmu = args.data / "slides" / "CMU-1-Small-Region.svs"
        if shared_cmu.is_file():
            cmu = workdir / shared_cmu.name  # a writable copy, see cli_tiles_per_s
            shutil.copyfile(shared_cmu, cmu)
            for power in (10, 5):
                bench_case("CMU", cmu, Resolution(power, "power"), workdir, repeats=3)
        large = workdir / "large_40x.svs"
        if not large.is_file():
            write_slide(large, TexturePainter(make_texture(), LARGE_SIZE_PX), LARGE_SIZE_PX, mpp=0.25,
                        objective_power=40, downsamples=(1, 4, 16))
        for power in (20, 10):
            bench_case("synthetic 40x 20k²", large, Resolution(power, "power"), workdir, repeats=3)
        if not args.skip_big:
            huge = workdir / "huge_40x.svs"
            if not huge.is_file():
                write_slide(huge, TexturePainter(make_texture(), HUGE_SIZE_PX), HUGE_SIZE_PX, mpp=0.25,
                            objective_power=40, downsamples=(1, 4, 16, 64))
            peak, seconds = peak_memory_mb(huge, workdir)
            verdict = "under" if peak < MEMORY_LIMIT_MB else "OVER"
            print(f"\npeak RSS tiling 50,000 × 50,000 at 20x with --save-tiles: {peak:.0f} MB "
                  f"({verdict} {MEMORY_LIMIT_MB} MB), {seconds:.0f} s")


if __name__ == "__main__":
    main()
