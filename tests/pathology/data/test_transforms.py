"""HED stain jitter against Beer-Lambert physics, and the shared preprocessing."""
from __future__ import annotations

import albumentations as A
import numpy as np
import torch
from torch import nn

from pathology.data import (AugmentConfig, HEDJitter, collate_tiles, eval_transform, hed_jitter, resize_transform,
                            stack_tiles, train_transform)
from pathology.models.export import PixelInput

# Ruifrok & Johnston's unit optical-density vectors (rows of scikit-image's rgb_from_hed).
HAEMATOXYLIN_OD = np.array([0.65, 0.70, 0.29])
EOSIN_OD = np.array([0.07, 0.99, 0.11])


def _render(od: np.ndarray) -> np.ndarray:
    """Beer-Lambert: transmitted intensity of an optical density (natural log), as uint8."""
    return np.rint(255 * np.exp(-od)).astype(np.uint8).reshape(1, 1, 3)


def test_identity_jitter_keeps_the_tile(rng: np.random.Generator) -> None:
    tile = rng.integers(1, 256, (8, 8, 3), dtype=np.uint8)
    out = hed_jitter(tile, np.ones(3), np.zeros(3))
    assert np.abs(out.astype(int) - tile).max() <= 1


def test_doubling_haematoxylin_doubles_its_optical_density() -> None:
    nuclei = _render(0.5 * HAEMATOXYLIN_OD / np.linalg.norm(HAEMATOXYLIN_OD))
    expected = _render(1.0 * HAEMATOXYLIN_OD / np.linalg.norm(HAEMATOXYLIN_OD))
    out = hed_jitter(nuclei, np.array([2.0, 1.0, 1.0]), np.zeros(3))
    assert np.abs(out.astype(int) - expected).max() <= 2


def test_eosin_shift_stains_white_glass_pink() -> None:
    glass = np.full((1, 1, 3), 255, np.uint8)  # optical density 0
    out = hed_jitter(glass, np.ones(3), np.array([0.0, 0.3, 0.0]))
    expected = _render(0.3 * EOSIN_OD / np.linalg.norm(EOSIN_OD))
    assert np.abs(out.astype(int) - expected).max() <= 2


def test_hed_jitter_transform_is_random_per_call_and_off_at_p0(rng: np.random.Generator) -> None:
    tile = rng.integers(60, 200, (16, 16, 3), dtype=np.uint8)
    jitter = A.Compose([HEDJitter(alpha_sigma=0.3, beta_sigma=0.1, p=1.0)], seed=0)
    first, second = jitter(image=tile)["image"], jitter(image=tile)["image"]
    assert not np.array_equal(first, tile) and not np.array_equal(first, second)
    assert np.array_equal(A.Compose([HEDJitter(p=0.0)])(image=tile)["image"], tile)


def test_eval_transform_resizes_and_normalises_with_model_statistics() -> None:
    mean, std = (0.5, 0.25, 0.75), (0.1, 0.2, 0.3)
    tile = np.empty((50, 50, 3), np.uint8)
    tile[...] = (153, 51, 255)  # 0.6, 0.2, 1.0 in [0, 1]
    out = eval_transform(64, mean, std)(image=tile)["image"]
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    expected = [(0.6 - 0.5) / 0.1, (0.2 - 0.25) / 0.2, (1.0 - 0.75) / 0.3]
    np.testing.assert_allclose(out.mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


class _Features(nn.Module):
    """A 'model' whose features are its input, to read what :class:`PixelInput` feeds a model."""

    img_size = (64, 64)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_stacked_tiles_normalised_in_the_graph_equal_eval_transform_per_tile(rng: np.random.Generator) -> None:
    """Inference's path (resize per tile, stack as uint8 per batch, normalise inside the runner's
    graph) feeds the model what training's eval transform does; batches go into a reused buffer
    when one of the right shape is given."""
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    tiles = [rng.integers(0, 256, (50, 50, 3), dtype=np.uint8) for _ in range(5)]
    expected = torch.stack([eval_transform(64, mean, std)(image=tile)["image"] for tile in tiles])
    resize = resize_transform(64)
    resized = [resize(image=tile)["image"] for tile in tiles]
    assert resized[0].dtype == np.uint8 and resized[0].shape == (64, 64, 3)
    batch = stack_tiles(resized)
    assert batch.shape == (5, 3, 64, 64) and batch.dtype == torch.uint8 and batch.is_contiguous()
    normalise = PixelInput(_Features(), mean, std).forward_features
    torch.testing.assert_close(normalise(batch), expected, atol=1e-5, rtol=0)
    again = stack_tiles(resized[::-1], out=batch)
    assert again.data_ptr() == batch.data_ptr()
    torch.testing.assert_close(normalise(again), expected.flip(0), atol=1e-5, rtol=0)
    assert stack_tiles(resized[:2], out=batch).shape == (2, 3, 64, 64)  # another shape: a new tensor
    assert torch.equal(collate_tiles([(t, 0) for t in resized]), batch.flip(0))


def test_train_transform_ends_at_model_input_size(rng: np.random.Generator) -> None:
    tile = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    out = train_transform(AugmentConfig(hed_p=1.0, blur_p=1.0, jpeg_p=1.0), 96, (0.5,) * 3, (0.5,) * 3)(image=tile)
    assert out["image"].shape == (3, 96, 96)


def test_free_rotation_turns_the_tile_and_reflects_its_corners(rng: np.random.Generator) -> None:
    """A uniform tile stays uniform (a zero-filled border would blacken the corners); a striped one turns."""
    affine_only = AugmentConfig(flip_p=0, rotate90_p=0, affine_p=1.0, affine_scale=0.1, hed_p=0, color_p=0, blur_p=0,
                                jpeg_p=0)
    transform = train_transform(affine_only, 50, (0.0,) * 3, (1.0,) * 3)
    uniform = np.full((50, 50, 3), 200, np.uint8)
    for _ in range(5):
        out = transform(image=uniform)["image"]
        assert torch.allclose(out, torch.full_like(out, 200 / 255), atol=1e-6)
    stripes = np.zeros((50, 50, 3), np.uint8)
    stripes[:, ::10] = 255  # vertical lines
    original = torch.from_numpy(stripes).permute(2, 0, 1) / 255
    assert all(not torch.allclose(transform(image=stripes)["image"], original, atol=0.1) for _ in range(5))


def test_an_augmentation_policy_changes_tiles_and_follows_torch_seed(rng: np.random.Generator) -> None:
    tile = rng.integers(0, 256, (50, 50, 3), dtype=np.uint8)
    original = torch.from_numpy(tile).permute(2, 0, 1) / 255
    for policy in ("randaugment", "autoaugment"):
        policy_only = AugmentConfig(flip_p=0, rotate90_p=0, hed_p=0, color_p=0, blur_p=0, jpeg_p=0, policy=policy)
        transform = train_transform(policy_only, 50, (0.0,) * 3, (1.0,) * 3)
        torch.manual_seed(0)
        first = [transform(image=tile)["image"] for _ in range(6)]
        torch.manual_seed(0)
        assert all(torch.equal(transform(image=tile)["image"], out) for out in first)
        assert sum(not torch.allclose(out, original, atol=1e-3) for out in first) >= 3, policy
