"""pathology/models/optimize.py: the inference form computes the same function, without BatchNorm."""
from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from timm.layers import LayerScale, LayerScale2d
from torch import nn

from pathology.models import create_model, fuse_for_inference

ATOL = 1e-4  # float32 rounding of folded weights, logits of order 1


def _count(model: nn.Module, kinds: tuple[type, ...]) -> int:
    return sum(isinstance(m, kinds) for m in model.modules())


@pytest.mark.parametrize(("mhsa", "img_size"), [({32: 1}, 64), ({16: 2, 32: 1}, 96)])
def test_same_function_without_batchnorm(randomize: Callable, mhsa: dict[int, int], img_size: int) -> None:
    model = randomize(create_model("efficientformer_l1", mhsa_blocks=mhsa, num_classes=4, img_size=img_size))
    fast = fuse_for_inference(model)
    assert _count(fast, (nn.BatchNorm2d, LayerScale, LayerScale2d)) == 0
    assert fast.stem.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert model.training and _count(model, (nn.BatchNorm2d,)) > 0  # the original is untouched
    x = torch.randn(3, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = model.eval()(x)
        embedding = model.forward_head(model.forward_features(x), pre_logits=True)
        assert expected.std() > 0.1
        torch.testing.assert_close(fast(x), expected, rtol=0, atol=ATOL)
        torch.testing.assert_close(fast.forward_head(fast.forward_features(x), pre_logits=True), embedding,
                                   rtol=0, atol=ATOL)


def test_timm_model_too(timm_l1: nn.Module) -> None:
    fast = fuse_for_inference(timm_l1)
    assert _count(fast, (nn.BatchNorm2d,)) == 0
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), timm_l1(x), rtol=0, atol=ATOL)
