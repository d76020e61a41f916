"""A two-task synthetic slide set whose classes are visible only at known scales.

Every demo slide carries two independent labels, so one set of slides (tiled once per
resolution) answers two questions of a resolution study:

* ``chromatin`` (``smooth`` / ``coarse``): nuclei are either uniformly stained or carry a
  checkerboard chromatin grain of ``grain_um`` µm cells around the *same* mean colour. The grain
  is resolved only while a pixel is smaller than a grain cell; once a pixel covers two cells or
  more (``mpp >= 2 * grain_um``) area averaging turns it into exactly the mean, so the two
  classes look the same at low magnification. Only the nuclear borders, which both classes share,
  leak a trace of it.
* ``architecture`` (``nests`` / ``cords``): epithelium (dense nuclei on a purple-pink ground) fills
  half of the tissue in both classes, either as round nests of radius ``nest_um`` on a hexagonal
  lattice or as parallel cords ``nest_um`` wide. The two layouts have the same epithelial area
  fraction (1/2) and the same boundary length per area (1 / ``nest_um``), so a field of view much
  smaller than a nest (a straight-looking boundary, or all epithelium, or all stroma) cannot tell
  them apart; a field of a few nest radii sees discs versus stripes.

Painters render level-0 pixels from absolute coordinates (so tiles join seamlessly) and
area-average them for lower pyramid levels, which is what a microscope's larger pixels do.
"""
from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from pathology.atomic import atomic_path
from wsi_tiling.resolution import mpp_to_power
from wsi_tiling.synthetic import WHITE, write_slide

__all__ = ["TASKS", "DemoTissuePainter", "DemoSlide", "make_demo_slides", "read_manifest"]

log = logging.getLogger(__name__)

TASKS: dict[str, tuple[str, str]] = {"chromatin": ("smooth", "coarse"), "architecture": ("nests", "cords")}
NUCLEUS_RADIUS_UM = 3.0
EPITHELIUM_NUCLEI_PER_UM2 = 0.012  # about 34 % of the epithelium covered by nuclei
STROMA_KEEP = 0.2  # stroma holds a fifth of the epithelial nuclear density
STROMA_RGB = np.array([236, 172, 206], np.float32)  # eosin pink
EPITHELIUM_RGB = np.array([222, 160, 212], np.float32)  # purpler cytoplasm
NUCLEUS_RGB = np.array([100, 58, 145], np.float32)  # haematoxylin, the mean of both chromatin classes
GRAIN_CONTRAST_RGB = np.array([48, 36, 36], np.float32)  # +/- around the nuclear mean
HEX_SPACING_PER_RADIUS = math.sqrt(4 * math.pi / math.sqrt(3))  # hexagonal lattice with half its area in discs
SUBPIXEL_SHIFT = 4  # cv2 drawing with 1/16-pixel precision
MANIFEST_COLUMNS = ("slide_id", "slide_path", "split", "chromatin", "architecture", "mpp")


@dataclass(frozen=True)
class DemoTissuePainter:
    """Paints one demo slide: an elliptical tissue section on glass (a :class:`Painter`).

    Attributes:
        mpp: level-0 µm/px.
        size_um: slide (width, height) in µm.
        coarse_chromatin: True for the ``coarse`` chromatin class.
        cords: True for the ``cords`` architecture class, False for ``nests``.
        seed: makes nuclei, layout angle and phase reproducible.
        nest_um: nest radius and cord width in µm.
        grain_um: chromatin checkerboard cell edge in µm.
    """

    mpp: float
    size_um: tuple[float, float]
    coarse_chromatin: bool
    cords: bool
    seed: int
    nest_um: float = 60.0
    grain_um: float = 1.0
    _nuclei_um: np.ndarray = field(init=False, repr=False, compare=False)
    _layout: tuple[float, float, float] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        angle, phase_x, phase_y = rng.uniform(0, math.pi), rng.uniform(0, 1), rng.uniform(0, 1)
        object.__setattr__(self, "_layout", (angle, phase_x, phase_y))
        width_um, height_um = self.size_um
        n = rng.poisson(EPITHELIUM_NUCLEI_PER_UM2 * width_um * height_um)
        centres = rng.uniform((0, 0), (width_um, height_um), size=(n, 2))
        keep = self._epithelium(centres[:, 0], centres[:, 1]) | (rng.uniform(size=n) < STROMA_KEEP)
        radii = NUCLEUS_RADIUS_UM * rng.uniform(0.8, 1.2, size=n)
        object.__setattr__(self, "_nuclei_um", np.column_stack([centres, radii])[keep])

    def _epithelium(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True where level-0 µm coordinates fall in epithelium (nests or cords)."""
        angle, phase_x, phase_y = self._layout
        u = np.cos(angle) * x_um + np.sin(angle) * y_um
        v = -np.sin(angle) * x_um + np.cos(angle) * y_um
        if self.cords:
            return np.mod(u / (2 * self.nest_um) + phase_x, 1.0) < 0.5
        spacing = HEX_SPACING_PER_RADIUS * self.nest_um
        row_height = spacing * math.sqrt(3) / 2  # hexagonal lattice as two interleaved rectangular ones
        best = np.full(np.broadcast(u, v).shape, np.inf)
        for shift_x, shift_y in ((0.0, 0.0), (0.5, 0.5)):
            du = np.mod(u / spacing + phase_x + shift_x, 1.0) - 0.5
            dv = np.mod(v / (2 * row_height) + phase_y + shift_y, 1.0) - 0.5
            best = np.minimum(best, np.hypot(du * spacing, dv * 2 * row_height))
        return best < self.nest_um

    def _inside_section(self, x_um: np.ndarray, y_um: np.ndarray) -> np.ndarray:
        """True inside the elliptical section, which leaves a glass margin of 5 % per side."""
        width_um, height_um = self.size_um
        return ((x_um / width_um - 0.5) / 0.45) ** 2 + ((y_um / height_um - 0.5) / 0.45) ** 2 < 1.0

    def _nucleus_mask(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """(height, width) bool mask of nuclei in a level-0 pixel region."""
        mask = np.zeros((height, width), np.uint8)
        margin = 2 * NUCLEUS_RADIUS_UM / self.mpp
        cx, cy, r = (self._nuclei_um / self.mpp).T
        near = (cx > x - margin) & (cx < x + width + margin) & (cy > y - margin) & (cy < y + height + margin)
        scale = 1 << SUBPIXEL_SHIFT
        for px, py, pr in zip(cx[near] - x - 0.5, cy[near] - y - 0.5, r[near]):
            cv2.circle(mask, (round(px * scale), round(py * scale)), round(pr * scale), 1, -1, cv2.LINE_8,
                       SUBPIXEL_SHIFT)
        return mask.astype(bool)

    def level0(self, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Renders a level-0 region; (x, y) top-left and size in level-0 pixels; (H, W, 3) uint8."""
        xs_um = (x + np.arange(width) + 0.5) * self.mpp
        ys_um = (y + np.arange(height) + 0.5) * self.mpp
        xx, yy = np.meshgrid(xs_um, ys_um)
        epithelium = self._epithelium(xx, yy)
        image = np.where(epithelium[..., None], EPITHELIUM_RGB, STROMA_RGB)
        nuclei = self._nucleus_mask(x, y, width, height)
        colour = np.broadcast_to(NUCLEUS_RGB, image.shape)
        if self.coarse_chromatin:
            sign = 1 - 2 * ((np.floor(xx / self.grain_um) + np.floor(yy / self.grain_um)) % 2)
            colour = colour + sign[..., None] * GRAIN_CONTRAST_RGB
        image = np.where(nuclei[..., None], colour, image)
        image = np.where(self._inside_section(xx, yy)[..., None], image, float(WHITE))
        return np.clip(np.rint(image), 0, 255).astype(np.uint8)

    def __call__(self, x: int, y: int, width: int, height: int, downsample: float) -> np.ndarray:
        if downsample == 1:
            return self.level0(x, y, width, height)
        x0, y0 = round(x * downsample), round(y * downsample)
        x1, y1 = round((x + width) * downsample), round((y + height) * downsample)
        region = self.level0(x0, y0, x1 - x0, y1 - y0)
        return cv2.resize(region, (width, height), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class DemoSlide:
    """One generated slide and its labels (a row of the manifest)."""

    slide_id: str
    slide_path: Path
    split: str
    chromatin: str
    architecture: str
    mpp: float


def _splits(n_train: int, n_val: int, n_test: int) -> list[str]:
    return ["train"] * n_train + ["val"] * n_val + ["test"] * n_test


def make_demo_slides(
    out_dir: str | Path,
    *,
    per_group: tuple[int, int, int] = (3, 1, 1),
    size_um: tuple[float, float] = (1024.0, 1024.0),
    mpp: float = 0.5,
    seed: int = 0,
    nest_um: float = 60.0,
) -> Path:
    """Writes demo slides for every (chromatin, architecture) pair and a ``slides.csv`` manifest, with a
    progress bar on stderr (painting the demo's 20 slides takes about a minute).

    Args:
        out_dir: folder for ``slides/*.svs`` and ``slides.csv``.
        per_group: (train, val, test) slides per label pair; four pairs in all.
        size_um: slide (width, height) in µm.
        mpp: level-0 µm/px (0.5 is a 20x scan); pyramid levels at downsamples 1, 4 and 16.
        seed: base seed; slide ``i`` uses ``seed * 1000 + i``.
        nest_um: nest radius and cord width in µm.

    Returns:
        The manifest path; columns ``slide_id, slide_path, split, chromatin, architecture, mpp``.
    """
    out_dir = Path(out_dir)
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    size_px = (round(size_um[0] / mpp), round(size_um[1] / mpp))
    power = mpp_to_power(mpp)  # the convention wsi_tiling reads back: 0.25 µm/px is 40x
    groups = [(chromatin, architecture, split) for chromatin in TASKS["chromatin"]
              for architecture in TASKS["architecture"] for split in _splits(*per_group)]
    slides: list[DemoSlide] = []
    for index, (chromatin, architecture, split) in enumerate(tqdm(groups, desc="painting demo slides", unit="slide")):
        slide_id = f"demo_{index:03d}_{chromatin}_{architecture}"
        painter = DemoTissuePainter(mpp, size_um, chromatin == "coarse", architecture == "cords",
                                    seed * 1000 + index, nest_um=nest_um)
        path = out_dir / "slides" / f"{slide_id}.svs"
        with atomic_path(path) as tmp:
            write_slide(tmp, painter, size_px, mpp=mpp, objective_power=power, downsamples=(1, 4, 16))
        slides.append(DemoSlide(slide_id, path, split, chromatin, architecture, mpp))
        log.info("wrote %s", path)
    return _write_manifest(out_dir / "slides.csv", slides)


def _write_manifest(path: Path, slides: list[DemoSlide]) -> Path:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(MANIFEST_COLUMNS)
        for s in slides:
            writer.writerow([s.slide_id, s.slide_path.resolve(), s.split, s.chromatin, s.architecture, s.mpp])
    return path


def read_manifest(path: str | Path) -> list[DemoSlide]:
    """Reads a ``slides.csv`` written by :func:`make_demo_slides`."""
    with Path(path).open(newline="") as f:
        return [DemoSlide(r["slide_id"], Path(r["slide_path"]), r["split"], r["chromatin"], r["architecture"],
                          float(r["mpp"])) for r in csv.DictReader(f)]
