"""Macenko stain normalisation against Beer–Lambert truth: tiles rendered from the same stain
amounts with other stain colours come back as the reference's rendering."""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from pathology.stain import StainNormalizer, StainReference, fit_stain_reference

IO = 240.0  # the transmitted light the normaliser assumes
# optical density per unit stain, rows R, G, B; columns haematoxylin, eosin (Macenko's usual reference)
REFERENCE_STAINS = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
OTHER_STAINS = np.array([[0.70, 0.30], [0.65, 0.85], [0.30, 0.43]])  # another lab's redder H, pinker E


def _render(stains: np.ndarray, concentrations: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of (H, W, 2) H and E amounts: I = Io · exp(-stains · c)."""
    od = concentrations @ stains.T
    return np.clip(np.rint(IO * np.exp(-od)), 0, 255).astype(np.uint8)


def _amounts(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """H and E amounts with pure-H, pure-E and mixed pixels, as in tissue (nuclei, stroma, both),
    dense enough that every channel of a pure pixel counts as stained."""
    kind = rng.integers(0, 3, (size, size))
    h = np.where(kind != 1, rng.uniform(0.8, 1.5, (size, size)), 0.0)
    e = np.where(kind != 0, rng.uniform(0.8, 1.5, (size, size)), 0.0)
    return np.stack([h, e], axis=-1)


def test_a_tile_is_rerendered_with_the_reference_stains() -> None:
    rng = np.random.default_rng(0)
    reference = fit_stain_reference([_render(REFERENCE_STAINS, _amounts(rng)) for _ in range(4)])
    fitted = np.asarray(reference.stain_matrix)
    np.testing.assert_allclose(fitted / np.linalg.norm(fitted, axis=0),
                               REFERENCE_STAINS / np.linalg.norm(REFERENCE_STAINS, axis=0), atol=0.03)
    amounts = _amounts(rng)
    other, truth = _render(OTHER_STAINS, amounts), _render(REFERENCE_STAINS, amounts)
    normalized = StainNormalizer(reference)(other)
    before, after = np.abs(other.astype(int) - truth).mean(), np.abs(normalized.astype(int) - truth).mean()
    assert before > 10 and after < 2, (before, after)


def test_glass_is_left_as_it_is_and_cannot_be_a_reference() -> None:
    glass = np.full((32, 32, 3), 235, np.uint8)
    rng = np.random.default_rng(1)
    normalizer = StainNormalizer(fit_stain_reference([_render(REFERENCE_STAINS, _amounts(rng))]))
    assert normalizer(glass) is glass
    with pytest.raises(ValueError, match="2 tiles have under 2% stained pixels"):
        fit_stain_reference([glass, glass])


def test_the_reference_survives_plain_types_and_pickling() -> None:
    rng = np.random.default_rng(2)
    reference = fit_stain_reference([_render(OTHER_STAINS, _amounts(rng))])
    assert StainReference.from_dict(reference.to_dict()) == reference
    tile = _render(OTHER_STAINS, _amounts(rng, 32))
    normalizer = StainNormalizer(reference)
    assert np.array_equal(pickle.loads(pickle.dumps(normalizer))(tile), normalizer(tile))
