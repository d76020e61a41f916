"""timm EfficientFormer weights with every tensor randomised, saved as timm would ship them.

timm's own initialisation sets LayerScale to 1e-5, which makes most blocks near-identity; a
test comparing two models with such weights would pass even with blocks swapped. Random
weights everywhere make every block matter.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

WEIGHT_STD = 0.1
RUNNING_VAR_RANGE = (0.9, 1.1)


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Fills every float tensor of ``model`` (parameters and BatchNorm statistics) with noise."""
    generator = torch.Generator().manual_seed(seed)
    low, high = RUNNING_VAR_RANGE
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            noise = torch.rand(tensor.shape, generator=generator) if "running_var" in name else \
                torch.randn(tensor.shape, generator=generator)
            tensor.copy_(low + (high - low) * noise if "running_var" in name else WEIGHT_STD * noise)
    return model


@pytest.fixture(scope="session")
def timm_l1() -> nn.Module:
    """timm's ``efficientformer_l1`` as it ships (1000 classes, 7 x 7 biases), random weights, eval."""
    return randomize_(timm.create_model("efficientformer_l1")).eval()


@pytest.fixture(scope="session")
def timm_l1_file(timm_l1: nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``timm_l1``'s state dict saved with ``torch.save``, timm key names."""
    path = tmp_path_factory.mktemp("weights") / "efficientformer_l1.pth"
    torch.save(timm_l1.state_dict(), path)
    return path


@pytest.fixture(scope="session")
def randomize() -> Callable[[nn.Module], nn.Module]:
    """:func:`randomize_`, for tests that need every block of their own model to matter."""
    return randomize_


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread for these tests, restored afterwards.

    On a 2-core machine shared with other processes, two OpenMP threads wait on each other at
    every barrier: a 224 px L1 forward took 2 s with 2 threads and 70 ms with 1 (measured).
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
