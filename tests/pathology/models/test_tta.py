"""``pathology.models.tta``: the 8 dihedral views, and probabilities averaged over them."""
from __future__ import annotations

import pytest
import torch

from pathology.models import create_model
from pathology.models.tta import N_VIEWS, dihedral_views, mean_over_views, tta_probabilities

IMG_PX = 32


def _by_hand(x: torch.Tensor) -> list[torch.Tensor]:
    """The dihedral group of the square generated differently from the code: the 4 flips (none, width,
    height, both) of the image and of its transpose."""
    flips = [(), (-1,), (-2,), (-2, -1)]
    return [torch.flip(base, dims) if dims else base for base in (x, x.transpose(-2, -1)) for dims in flips]


def test_views_of_a_2x2_tile_by_hand() -> None:
    views = dihedral_views(torch.tensor([[1, 2], [3, 4]]).reshape(1, 1, 2, 2))
    assert views[0].flatten().tolist() == [1, 2, 3, 4]
    assert views[1].flatten().tolist() == [2, 4, 1, 3]  # 90° counter-clockwise
    assert views[2].flatten().tolist() == [4, 3, 2, 1]  # 180°
    assert views[4].flatten().tolist() == [2, 1, 4, 3]  # mirrored left-right


def test_the_eight_views_are_the_dihedral_group() -> None:
    x = torch.arange(9.0).reshape(1, 1, 3, 3)  # no symmetry: all 8 views differ
    code = {tuple(v.flatten().tolist()) for v in dihedral_views(x)}
    assert len(code) == N_VIEWS
    assert code == {tuple(v.flatten().tolist()) for v in _by_hand(x)}


def test_tta_probabilities_are_the_mean_softmax_of_the_views_by_hand() -> None:
    torch.manual_seed(0)
    model = create_model("efficientformer_tiny", num_classes=3, img_size=IMG_PX).eval()
    x = torch.rand(2, 3, IMG_PX, IMG_PX)
    x[:, :, :8] += 2.0  # a bright band along the top edge: the views really differ
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(dim=1) for v in _by_hand(x)]).mean(dim=0)
        got = tta_probabilities(model, x)
        plain = model(x).softmax(dim=1)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2))
    assert (got - plain).abs().max() > 1e-4  # TTA changes the answer on a non-symmetric input


def test_every_output_is_averaged() -> None:
    x = torch.arange(8.0).reshape(2, 1, 2, 2)
    means = mean_over_views(lambda v: (v.flatten(1), v.sum(dim=(1, 2, 3))), x)
    torch.testing.assert_close(means[1], torch.tensor([6.0, 22.0]))  # views keep the sum
    # every pixel visits every place (twice): each place holds the mean of the tile
    torch.testing.assert_close(means[0], x.flatten(1).mean(dim=1, keepdim=True).expand(2, 4))


def test_non_square_tiles_are_refused() -> None:
    with pytest.raises(ValueError, match="square"):
        dihedral_views(torch.zeros(1, 3, 32, 64))
