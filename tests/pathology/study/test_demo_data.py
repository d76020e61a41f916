"""The demo slides: classes that differ by design only at the scales the docs claim."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from pathology.study.demo_data import DemoTissuePainter, make_demo_slides, read_manifest

MPP = 0.5  # level-0 µm/px of the demo slides (20x)
SIZE_UM = (512.0, 512.0)
NEST_UM = 30.0  # nests 60 µm across: a 128 µm field holds about two, a 32 µm field part of one
TILES_PER_SLIDE = 24
TILE_PX = 64  # the demo's tiles
HIGH, LOW = 1, 4  # downsamples: 0.5 µm/px (20x, 32 µm field) and 2 µm/px (5x, 128 µm field), the demo's
STEPS, BATCH = 150, 16  # 16 tiles of 64 px: as many pixels a step as the 64 tiles of 32 px this test used before


def _painter(coarse: bool, cords: bool, seed: int) -> DemoTissuePainter:
    return DemoTissuePainter(MPP, SIZE_UM, coarse, cords, seed, nest_um=NEST_UM)


def test_epithelium_is_half_the_tissue_in_both_layouts() -> None:
    """Nests (hexagonal discs) and cords (stripes) are built to cover exactly half the area."""
    grid_um = np.meshgrid(np.arange(0, 2000, 2.0), np.arange(0, 2000, 2.0))
    for cords in (False, True):
        fraction = DemoTissuePainter(MPP, (2000.0, 2000.0), False, cords, seed=1)._epithelium(*grid_um).mean()
        assert fraction == pytest.approx(0.5, abs=0.01)


def test_chromatin_grain_averages_to_the_same_colour_at_low_magnification() -> None:
    """A 1 µm checkerboard is gone in 2 µm pixels: coarse and smooth slides then differ only at nuclear borders."""
    smooth, coarse = _painter(False, False, 5), _painter(True, False, 5)  # same seed: same nuclei
    high = np.abs(coarse(256, 256, 256, 256, 1).astype(float) - smooth(256, 256, 256, 256, 1))
    low = np.abs(coarse(64, 64, 64, 64, 4).astype(float) - smooth(64, 64, 64, 64, 4))
    nuclear_fraction = (smooth(256, 256, 256, 256, 1)[..., 0] < 150).mean()
    # Level 0: every nuclear pixel is 48/36/36 grey levels off the mean (0.5 µm px inside 1 µm cells).
    assert high.mean() == pytest.approx(nuclear_fraction * (48 + 36 + 36) / 3, rel=0.05)
    assert low.mean() < 0.1 * high.mean()


def _tiles(painter: DemoTissuePainter, downsample: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """n random TILE_PX tiles cut at ``downsample`` from inside the elliptical section."""
    size = round(SIZE_UM[0] / MPP / downsample)
    image = painter(0, 0, size, size, downsample)
    lo, hi = int(0.15 * size), int(0.85 * size) - TILE_PX
    xs, ys = rng.integers(lo, hi, n), rng.integers(lo, hi, n)
    return np.stack([image[y:y + TILE_PX, x:x + TILE_PX] for x, y in zip(xs, ys)])


def _dataset(task: str, downsample: int, seeds: range, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Tiles of both classes of ``task``; the other task's label alternates with the seed (a nuisance)."""
    images, labels = [], []
    for seed in seeds:
        for label in (0, 1):
            other = seed % 2 == 1
            coarse, cords = (bool(label), other) if task == "chromatin" else (other, bool(label))
            images.append(_tiles(_painter(coarse, cords, seed), downsample, TILES_PER_SLIDE, rng))
            labels += [label] * TILES_PER_SLIDE
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).float() / 255 - 0.5
    return x, torch.tensor(labels)


def _block(channels_in: int, channels_out: int) -> list[nn.Module]:
    return [nn.Conv2d(channels_in, channels_out, 3, padding=1), nn.BatchNorm2d(channels_out), nn.ReLU()]


def _tiny_cnn_accuracy(task: str, downsample: int) -> float:
    """Held-out tile accuracy of a 4-layer CNN trained briefly (with flips and rotations) on other slides."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    x_train, y_train = _dataset(task, downsample, range(8), rng)
    x_test, y_test = _dataset(task, downsample, range(100, 104), rng)
    model = nn.Sequential(*_block(3, 16), nn.MaxPool2d(2), *_block(16, 16), nn.MaxPool2d(2), *_block(16, 32),
                          nn.MaxPool2d(2), *_block(32, 32), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(STEPS):
        batch = torch.randint(len(x_train), (BATCH,))
        x = torch.rot90(x_train[batch], int(torch.randint(4, ())), (2, 3))
        x = x.flip(3) if torch.rand(()) < 0.5 else x
        loss = nn.functional.cross_entropy(model(x), y_train[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        return (model.eval()(x_test).argmax(1) == y_test).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize(("task", "visible", "invisible"), [("chromatin", HIGH, LOW), ("architecture", LOW, HIGH)])
def test_task_is_learnable_only_at_its_scale(task: str, visible: int, invisible: int) -> None:
    """Chance is 0.5: a tiny CNN must beat it clearly where the class is visible, and not where it is not."""
    assert _tiny_cnn_accuracy(task, visible) > 0.85
    assert _tiny_cnn_accuracy(task, invisible) < 0.65


def test_make_demo_slides_writes_balanced_labelled_slides(tmp_path, capsys: pytest.CaptureFixture) -> None:
    """(1, 1, 1) slides per label pair: 12 slides, each split holding every label pair once; a progress
    bar counts them on stderr (the demo painted for a minute in silence before)."""
    import openslide

    manifest = make_demo_slides(tmp_path, per_group=(1, 1, 1), size_um=(256.0, 256.0))
    slides = read_manifest(manifest)
    assert len(slides) == 12
    err = capsys.readouterr().err
    assert "painting demo slides: 100%" in err and "12/12" in err
    for split in ("train", "val", "test"):
        pairs = {(s.chromatin, s.architecture) for s in slides if s.split == split}
        assert pairs == {(c, a) for c in ("smooth", "coarse") for a in ("nests", "cords")}
    with openslide.OpenSlide(str(slides[0].slide_path)) as slide:
        assert slide.dimensions == (512, 512)
        assert float(slide.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(MPP)
        assert slide.level_downsamples == pytest.approx((1.0, 4.0, 16.0))
    assert not list(tmp_path.glob("**/*.tmp*"))
    assert math.isclose(slides[0].mpp, MPP)
