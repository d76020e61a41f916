"""pathology/models/runtime.py: every backend computes the eager function; choice, errors, export cache."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pathology.models import create_model, export, optimize_for_inference
from pathology.models.runtime import BackendUnavailable, choose_backend

ATOL = 1e-4  # the interface's promise: float32 rounding of another operator order
IMG = 64
N_CLASSES = 3
TINY_WIDTH = 128  # efficientformer_tiny's last stage: the embedding size


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    """The tiny variant with MHSA at /16 and /32, LayerScale 1 so every block changes the output."""
    torch.manual_seed(0)
    return create_model("efficientformer_tiny", mhsa_blocks={16: 1, 32: 1}, num_classes=N_CLASSES, img_size=IMG,
                        layer_scale_init_value=1.0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(5, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One export cache for the module: the tiny model's graph is exported once (seconds each)."""
    return tmp_path_factory.mktemp("onnx_cache")


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_runner_equals_eager(backend: str, tiny: nn.Module, images: torch.Tensor, cache_dir: Path) -> None:
    if backend == "openvino":
        pytest.importorskip("openvino", reason="the optional [cpu-fast] extra is not installed")
    with torch.inference_mode():
        features = tiny.forward_features(images)
        expected_logits, expected_embeddings = tiny.forward_head(features), tiny.forward_head(features, pre_logits=True)
    assert expected_logits.std() > 0.1
    runner = optimize_for_inference(tiny, backend=backend, cache_dir=cache_dir)
    logits, embeddings = runner.logits_and_embeddings(images)  # batch 5: not the export's trace batch of 2
    assert runner.backend == backend
    assert logits.dtype == embeddings.dtype == torch.float32
    assert embeddings.shape == (5, TINY_WIDTH)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(embeddings, expected_embeddings, rtol=0, atol=ATOL)
    torch.testing.assert_close(runner(images[:1]), expected_logits[:1], rtol=0, atol=ATOL)


def test_runner_names_the_size_it_takes(tiny: nn.Module) -> None:
    runner = optimize_for_inference(tiny, backend="torch")
    with pytest.raises(ValueError, match=f"3, {IMG}, {IMG}"):
        runner(torch.zeros(1, 3, 2 * IMG, 2 * IMG))


def test_auto_takes_the_first_installed_runtime_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert choose_backend("auto", cpu) == "onnxruntime"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    monkeypatch.setitem(sys.modules, "openvino", None)
    assert choose_backend("auto", cpu) == "torch"
    assert choose_backend("auto", torch.device("cuda")) == "torch"


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_forced_missing_backend_says_how_to_install(backend: str, tiny: nn.Module,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, backend, None)
    with pytest.raises(BackendUnavailable, match=f"backend '{backend}' is not installed.*pip install"):
        optimize_for_inference(tiny, backend=backend)


def test_unknown_backend_lists_the_choices(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match="'tensorrt' is not one of auto, torch, onnxruntime, openvino"):
        optimize_for_inference(tiny, backend="tensorrt")


def _count_exports(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    written: list[Path] = []
    real = export.export_onnx

    def counting(model: nn.Module, path: Path, *args: object) -> Path:
        written.append(Path(path))
        return real(model, path, *args)

    monkeypatch.setattr(export, "export_onnx", counting)
    return written


def test_second_runner_reuses_the_cached_graph(tiny: nn.Module, images: torch.Tensor, cache_dir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    exports = _count_exports(monkeypatch)
    first = optimize_for_inference(tiny, backend="onnxruntime", cache_dir=cache_dir)  # exports unless done before
    graphs = sorted(cache_dir.iterdir())
    exports.clear()
    second = optimize_for_inference(tiny, backend="onnxruntime", cache_dir=cache_dir)
    assert exports == []
    assert sorted(cache_dir.iterdir()) == graphs  # no second file, no temporary left
    [name] = [p.name for p in graphs if "onnxruntime" in p.name]  # one graph per runtime
    # the key: weights, input size, exporter and runtime versions
    assert all(part in name for part in (export.weights_hash(tiny), f"-{IMG}x{IMG}-", "-torch2.", "-onnxruntime1."))
    torch.testing.assert_close(second(images), first(images), rtol=0, atol=0)


def test_cache_key_changes_with_weights_and_activation(tiny: nn.Module, randomize: Callable[[nn.Module], nn.Module]) -> None:
    base = export.weights_hash(tiny)
    other_weights = randomize(create_model("efficientformer_tiny", mhsa_blocks={16: 1, 32: 1},
                                           num_classes=N_CLASSES, img_size=IMG))
    relu = create_model("efficientformer_tiny", mhsa_blocks={16: 1, 32: 1}, num_classes=N_CLASSES, img_size=IMG,
                        act_layer="relu")
    relu.load_state_dict(tiny.state_dict())
    assert export.weights_hash(tiny) == base  # deterministic
    assert export.weights_hash(other_weights) != base
    assert export.weights_hash(relu) != base  # same tensors, another function
