"""pathology/models/runtime.py: every backend computes the eager function at fp32 and nearly it at bf16;
choice of backend and precision, errors, export cache."""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from pathology.models import create_model, export, optimize_for_inference
from pathology.models import runtime
from pathology.models.runtime import BF16, FP32, BackendUnavailable, UnsupportedRun, choose_backend

ATOL = 1e-4  # the interface's promise: float32 rounding of another operator order
BF16_PROB_ATOL = 0.02  # bf16 keeps 8 bits of mantissa: probabilities move by ~1e-2 at most (docs/model.md)
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
    with torch.inference_mode():
        features = tiny.forward_features(images)
        expected_logits, expected_embeddings = tiny.forward_head(features), tiny.forward_head(features, pre_logits=True)
    assert expected_logits.std() > 0.1
    runner = optimize_for_inference(tiny, backend=backend, precision=FP32, cache_dir=cache_dir)
    logits, embeddings = runner.logits_and_embeddings(images)  # batch 5: not the export's trace batch of 2
    assert (runner.backend, runner.precision, runner.label) == (backend, FP32, backend)
    assert logits.dtype == embeddings.dtype == torch.float32
    assert embeddings.shape == (5, TINY_WIDTH)
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=ATOL)
    torch.testing.assert_close(embeddings, expected_embeddings, rtol=0, atol=ATOL)
    torch.testing.assert_close(runner(images[:1]), expected_logits[:1], rtol=0, atol=ATOL)


@pytest.mark.parametrize("backend", ["torch", "openvino"])
def test_bf16_runner_is_near_eager_and_not_equal(backend: str, tiny: nn.Module, images: torch.Tensor,
                                                 cache_dir: Path) -> None:
    """bf16-mixed is a different function: within 2e-2 in probability, but not the fp32 one. Forced, it
    runs on any CPU (OpenVINO and autocast emulate bf16 where the CPU lacks it), so this holds everywhere."""
    with torch.inference_mode():
        expected = tiny(images).softmax(dim=1)
    runner = optimize_for_inference(tiny, backend=backend, precision=BF16, cache_dir=cache_dir)
    logits, embeddings = runner.logits_and_embeddings(images)
    assert (runner.precision, runner.label) == (BF16, f"{backend} bf16-mixed")
    assert logits.dtype == embeddings.dtype == torch.float32
    difference = (logits.softmax(dim=1) - expected).abs().max().item()
    assert 1e-6 < difference < BF16_PROB_ATOL


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_batch_runs_as_parallel_streams_and_equals_image_by_image(backend: str, tiny: nn.Module,
                                                                   images: torch.Tensor, cache_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    runner = optimize_for_inference(tiny, backend=backend, precision=FP32, cache_dir=cache_dir, threads=2)
    assert runner.streams == 2
    split: list[list[int]] = []
    real = runner._run_parts
    monkeypatch.setattr(runner, "_run_parts", lambda parts: split.append([len(p) for p in parts]) or real(parts))
    whole = "request" if backend == "openvino" else "session"
    batch = runner(images)
    assert whole not in vars(runner)  # the all-threads form is made on the first single image, not before
    one_by_one = torch.cat([runner(images[i:i + 1]) for i in range(len(images))])  # single images: all threads
    assert whole in vars(runner)
    assert split == [[3, 2]]
    torch.testing.assert_close(batch, one_by_one, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_a_pixel_runner_normalises_uint8_tiles_as_the_eager_model_sees_them(backend: str, tiny: nn.Module,
                                                                           cache_dir: Path) -> None:
    """Built with ``normalize``, a runner takes uint8 pixels and computes the eager model on the
    normalised floats (the normalisation is in its graph), and refuses floats; the float runner
    refuses pixels (they would be silently unnormalised)."""
    mean, std = (0.7, 0.5, 0.6), (0.2, 0.25, 0.15)
    pixels = torch.randint(0, 256, (5, 3, IMG, IMG), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    floats = (pixels.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        expected = tiny(floats)
    runner = optimize_for_inference(tiny, backend=backend, precision=FP32, cache_dir=cache_dir, normalize=(mean, std))
    assert runner.pixels
    torch.testing.assert_close(runner(pixels), expected, rtol=0, atol=ATOL)
    with pytest.raises(ValueError, match="takes uint8 pixels"):
        runner(floats)
    with pytest.raises(ValueError, match="takes normalised float images"):
        optimize_for_inference(tiny, backend=backend, precision=FP32, cache_dir=cache_dir)(pixels)


def test_runner_names_the_size_it_takes(tiny: nn.Module) -> None:
    runner = optimize_for_inference(tiny, backend="torch")
    with pytest.raises(ValueError, match=f"3, {IMG}, {IMG}"):
        runner(torch.zeros(1, 3, 2 * IMG, 2 * IMG))


@pytest.mark.parametrize(("amx", "avx512_bf16", "expected"), [
    (True, False, True), (False, True, True), (True, True, True), (False, False, False)])
def test_bf16_hardware_is_amx_or_avx512_bf16_on_the_cpu(amx: bool, avx512_bf16: bool, expected: bool,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert runtime.has_bf16_hardware(torch.device("cpu")) is expected
    assert runtime.has_bf16_matrix_units(torch.device("cpu")) is expected  # the old name still answers
    assert runtime.has_bf16_hardware(torch.device("cuda")) is True


def test_bf16_hardware_is_false_where_torch_lacks_the_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert runtime.has_bf16_hardware(torch.device("cpu")) is False


@pytest.mark.parametrize("amx", [True, False])
def test_auto_takes_bf16_where_the_cpu_has_bf16_units_and_the_first_installed_runtime(
        amx: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "has_bf16_hardware", lambda device: amx)
    assert choose_backend("auto", cpu) == (("openvino", BF16) if amx else ("onnxruntime", FP32))
    assert choose_backend("auto", cpu, FP32) == ("onnxruntime", FP32)
    assert choose_backend("onnxruntime", cpu) == ("onnxruntime", FP32)  # auto: the precision the backend runs
    assert choose_backend("torch", cpu) == ("torch", FP32)  # torch's bf16 on the CPU is slower than a runtime's fp32
    assert choose_backend("openvino", cpu) == ("openvino", BF16 if amx else FP32)
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    assert choose_backend("auto", cpu) == ("onnxruntime", FP32)
    assert choose_backend("auto", cpu, BF16) == ("torch", BF16)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert choose_backend("auto", cpu) == ("torch", FP32)
    assert choose_backend("auto", torch.device("cuda")) == ("torch", BF16)
    assert choose_backend("auto", torch.device("cuda"), FP32) == ("torch", FP32)


@pytest.mark.parametrize(("backend", "precision", "device", "message"), [
    ("onnxruntime", BF16, "cpu", "'onnxruntime' runs only 32-true on the CPU"),
    ("auto", "16-mixed", "cpu", "'16-mixed' runs on GPUs only"),
    ("openvino", "auto", "cuda", "runs on the CPU but the model is on cuda"),
])
def test_a_combination_the_device_cannot_run_says_why(backend: str, precision: str, device: str,
                                                      message: str) -> None:
    with pytest.raises(UnsupportedRun, match=message):
        choose_backend(backend, torch.device(device), precision)


def test_unknown_precision_lists_the_choices(tiny: nn.Module) -> None:
    with pytest.raises(ValueError, match="'fp8' is not one of auto, 32-true, bf16-mixed, 16-mixed"):
        optimize_for_inference(tiny, precision="fp8")


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
    # one graph per runtime (a PixelInput wrapper of the same model is another graph, another name)
    [name] = [p.name for p in graphs if "onnxruntime" in p.name and p.name.startswith(f"{type(tiny).__name__}-")]
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
