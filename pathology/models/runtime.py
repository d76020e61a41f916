"""The fastest way this machine runs a tile classifier, behind one entry point.

:func:`optimize_for_inference` returns a runner: ``runner(images)`` gives logits and
``runner.logits_and_embeddings(images)`` both, whatever runs underneath:

* ``torch``: :func:`~pathology.models.optimize.fuse_for_inference` (BatchNorm and LayerScale
  folded, channels-last); on CUDA under bf16 (or fp16) autocast, optionally ``torch.compile``.
* ``onnxruntime``: ONNX Runtime's CPU provider on the model's ONNX graph.
* ``openvino``: OpenVINO's CPU plugin on the same graph, at fp32 (its CPU default is bf16 where
  the CPU has it, which is not the same function).

``"auto"`` takes torch on a GPU and, on the CPU, the first installed runtime of
:data:`CPU_PREFERENCE`. ONNX graphs are exported once and cached (see
:func:`~pathology.models.export.cached_onnx`), so a cohort pays the export once.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from pathology.models.export import INPUT_NAME, OUTPUT_NAMES, LogitsAndEmbeddings, cached_onnx, model_input_size
from pathology.models.optimize import fuse_for_inference

__all__ = ["BACKENDS", "CPU_PREFERENCE", "BackendUnavailable", "InferenceRunner", "choose_backend",
           "optimize_for_inference"]

BACKENDS = ("torch", "onnxruntime", "openvino")
# CPU order of "auto", from the screening in docs/model.md (ONNX Runtime is a core dependency, so
# the default install always has a runtime faster than torch eager)
CPU_PREFERENCE = ("onnxruntime", "openvino", "torch")
INSTALL_HINT = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install 'pathology[cpu-fast]'"}


class BackendUnavailable(ImportError):
    """A backend was asked for whose runtime package is not installed."""


class InferenceRunner(ABC):
    """Runs a classifier on ``(B, 3, H, W)`` float images normalised as its spec says.

    Attributes:
        backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        device: where inputs are run and outputs returned (runtimes: the CPU).
        img_size: the ``(H, W)`` in px the runner takes.
    """

    backend: str
    device: torch.device
    img_size: tuple[int, int]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes)`` float32 on :attr:`device`."""
        return self.logits_and_embeddings(images)[0]

    def logits_and_embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits ``(B, classes)`` and embeddings ``(B, D)`` (``forward_head(pre_logits=True)``), float32.

        Raises:
            ValueError: images that are not ``(B, 3, H, W)`` at :attr:`img_size`.
        """
        if images.dim() != 4 or tuple(images.shape[2:]) != self.img_size:
            raise ValueError(f"{self.backend} runner takes (B, 3, {self.img_size[0]}, {self.img_size[1]}) images, "
                             f"got {tuple(images.shape)}")
        return self._run(images)

    @abstractmethod
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class TorchRunner(InferenceRunner):
    """The fused model through torch, channels-last, autocast on CUDA when ``autocast_dtype``."""

    backend = "torch"

    def __init__(self, model: nn.Module, img_size: tuple[int, int], *, autocast_dtype: torch.dtype | None,
                 compile_model: bool) -> None:
        self.device = _device(model)
        self.img_size = img_size
        self.autocast_dtype = autocast_dtype
        module = LogitsAndEmbeddings(fuse_for_inference(model)).eval()
        self.module = torch.compile(module) if compile_model else module

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                    enabled=self.autocast_dtype is not None):
            logits, embeddings = self.module(x)
        return logits.float(), embeddings.float()


class OnnxRuntimeRunner(InferenceRunner):
    """ONNX Runtime's CPU provider on an exported graph."""

    backend = "onnxruntime"

    def __init__(self, path: Path, img_size: tuple[int, int], threads: int) -> None:
        ort = _import("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.device, self.img_size = torch.device("cpu"), img_size

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, embeddings = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: _numpy(images)})
        return torch.from_numpy(logits), torch.from_numpy(embeddings)


class OpenVinoRunner(InferenceRunner):
    """OpenVINO's CPU plugin on an exported graph, at fp32 precision."""

    backend = "openvino"

    def __init__(self, path: Path, img_size: tuple[int, int], threads: int) -> None:
        ov = _import("openvino")
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.device, self.img_size = torch.device("cpu"), img_size

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        results = self.request.infer({INPUT_NAME: _numpy(images)})
        logits, embeddings = (torch.from_numpy(results[self.compiled.output(name)].copy()) for name in OUTPUT_NAMES)
        return logits, embeddings


def _numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().to("cpu", torch.float32).contiguous().numpy()


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _import(backend: str) -> ModuleType:
    """The backend's runtime module; raises :class:`BackendUnavailable` with the install command."""
    try:
        return importlib.import_module(backend)
    except ImportError as err:
        raise BackendUnavailable(f"backend {backend!r} is not installed ({INSTALL_HINT[backend]})") from err


def choose_backend(backend: str, device: torch.device) -> str:
    """The backend that runs: ``backend`` itself (checked), or for ``"auto"`` the fastest installed.

    Raises:
        ValueError: an unknown name, or a runtime backend for a model on a GPU.
        BackendUnavailable: a forced runtime that is not installed.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type != "cpu":
            return "torch"
        return next(name for name in CPU_PREFERENCE if name == "torch" or _installed(name))
    if backend != "torch":
        if device.type != "cpu":
            raise ValueError(f"backend {backend!r} runs on the CPU but the model is on {device}; use torch")
        _import(backend)
    return backend


def _installed(backend: str) -> bool:
    try:
        _import(backend)
    except BackendUnavailable:
        return False
    return True


def optimize_for_inference(model: nn.Module, *, backend: str = "auto", img_size: tuple[int, int] | None = None,
                           cache_dir: str | Path | None = None, threads: int | None = None,
                           compile_model: bool = False, autocast: bool = True) -> InferenceRunner:
    """The fastest runner for ``model`` (left unchanged) on its device; same function to 1e-4 in fp32.

    Args:
        model: an EfficientFormer from :func:`~pathology.models.create_model` (or timm's), on its device.
        backend: ``"auto"``, ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        img_size: input ``(H, W)`` in px; None: the size the model was built for.
        cache_dir: where exported graphs are kept (pass the checkpoint's folder); None: the user
            cache (``$XDG_CACHE_HOME/pathology/onnx``).
        threads: CPU threads of a runtime; None: ``torch.get_num_threads()``.
        compile_model: torch backend: ``torch.compile`` the fused model (slow first call).
        autocast: torch backend on CUDA: run under bf16 (fp16 where bf16 is missing) autocast,
            logits then differ from fp32 by ~1e-2.

    Returns:
        The runner; ``runner.backend`` says which backend was chosen.

    Raises:
        ValueError: an unknown backend, or a runtime backend for a model on a GPU.
        BackendUnavailable: a forced backend whose package is not installed.
        ExportError: the ONNX export failed.
    """
    device = _device(model)
    chosen = choose_backend(backend, device)
    size = img_size or model_input_size(model)
    if chosen == "torch":
        half = None
        if autocast and device.type == "cuda":
            half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return TorchRunner(model, size, autocast_dtype=half, compile_model=compile_model)
    runtime = _import(chosen)
    path = cached_onnx(model, size, cache_dir, runtime=f"{chosen}{runtime.__version__.split('-')[0]}")
    runner = OnnxRuntimeRunner if chosen == "onnxruntime" else OpenVinoRunner
    return runner(path, size, threads or torch.get_num_threads())
