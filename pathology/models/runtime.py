"""The fastest way this machine runs a tile classifier, behind one entry point.

:func:`optimize_for_inference` returns a runner: ``runner(images)`` gives logits and
``runner.logits_and_embeddings(images)`` both, whatever runs underneath:

* ``torch``: :func:`~pathology.models.optimize.fuse_for_inference` (BatchNorm and LayerScale
  folded, channels-last), under bf16 (or fp16) autocast at reduced precision, optionally
  ``torch.compile``.
* ``onnxruntime``: ONNX Runtime's CPU provider on the model's ONNX graph (fp32 only).
* ``openvino``: OpenVINO's CPU plugin on the same graph, at fp32 or bf16.

Precision (Lightning's names): ``32-true`` computes the eager function (to 1e-4); ``bf16-mixed``
runs the matrix products in bfloat16, which hardware with bf16 matrix units (CUDA GPUs, CPUs
with Intel AMX) runs several times faster, at ~1e-2 in the probabilities; ``16-mixed`` is fp16
on GPUs. ``"auto"`` takes reduced precision where the hardware has such units and fp32
elsewhere, and the backend: torch on a GPU; on the CPU the first installed runtime of
:data:`CPU_PREFERENCE` for that precision. ONNX graphs are exported once and cached (see
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

__all__ = ["BACKENDS", "BF16", "CPU_PREFERENCE", "FP16", "FP32", "PRECISIONS", "BackendUnavailable", "InferenceRunner", "UnsupportedRun",
           "choose_backend", "has_bf16_matrix_units", "optimize_for_inference", "runner_label"]

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
FP32, BF16, FP16 = PRECISIONS[1:]
# CPU order of "auto" per precision, from the benchmark in docs/model.md: at fp32 ONNX Runtime was
# fastest at batch 1 and OpenVINO at batch 32; at bf16 OpenVINO ran 3.2x ONNX Runtime's fp32
# (ONNX Runtime has no bf16 CPU kernels). Both runtimes are core dependencies.
CPU_PREFERENCE = {FP32: ("onnxruntime", "openvino", "torch"), BF16: ("openvino", "torch")}
INSTALL_HINT = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}
OPENVINO_HINT = {FP32: "f32", BF16: "bf16"}  # INFERENCE_PRECISION_HINT


class BackendUnavailable(ImportError):
    """A backend was asked for whose runtime package is not installed."""


class UnsupportedRun(ValueError):
    """A backend or precision the model's device cannot run (a CPU runtime on a GPU, fp16 on the CPU)."""


class InferenceRunner(ABC):
    """Runs a classifier on ``(B, 3, H, W)`` float images normalised as its spec says.

    Attributes:
        backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (see :data:`PRECISIONS`).
        device: where inputs are run and outputs returned (runtimes: the CPU).
        img_size: the ``(H, W)`` in px the runner takes.
    """

    backend: str
    precision: str
    device: torch.device
    img_size: tuple[int, int]

    @property
    def label(self) -> str:
        """What runs, for reports: see :func:`runner_label`."""
        return runner_label(self.backend, self.precision)

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
    """The fused model through torch, channels-last, under autocast below fp32."""

    backend = "torch"

    def __init__(self, model: nn.Module, img_size: tuple[int, int], *, precision: str, compile_model: bool) -> None:
        self.device = _device(model)
        self.img_size, self.precision = img_size, precision
        self.autocast_dtype = None
        if precision == BF16:  # CUDA without bf16 falls back to fp16, as Lightning's bf16-mixed does not
            cuda_fp16 = self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
            self.autocast_dtype = torch.float16 if cuda_fp16 else torch.bfloat16
        elif precision == FP16:
            self.autocast_dtype = torch.float16
        module = LogitsAndEmbeddings(fuse_for_inference(model)).eval()
        self.module = torch.compile(module) if compile_model else module

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, torch.float32, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                    enabled=self.autocast_dtype is not None):
            logits, embeddings = self.module(x)
        return logits.float(), embeddings.float()


class OnnxRuntimeRunner(InferenceRunner):
    """ONNX Runtime's CPU provider on an exported graph, at fp32."""

    backend = "onnxruntime"
    precision = FP32

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
    """OpenVINO's CPU plugin on an exported graph, at fp32 or bf16."""

    backend = "openvino"

    def __init__(self, path: Path, img_size: tuple[int, int], threads: int, precision: str) -> None:
        ov = _import("openvino")
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": OPENVINO_HINT[precision]}
        self.compiled = ov.Core().compile_model(str(path), "CPU", config)
        self.request = self.compiled.create_infer_request()
        self.device, self.img_size, self.precision = torch.device("cpu"), img_size, precision

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        results = self.request.infer({INPUT_NAME: _numpy(images)})
        logits, embeddings = (torch.from_numpy(results[self.compiled.output(name)].copy()) for name in OUTPUT_NAMES)
        return logits, embeddings


def runner_label(backend: str, precision: str) -> str:
    """``"onnxruntime"`` at fp32, ``"openvino bf16-mixed"`` below it: what ran, for reports and tables."""
    return backend if precision == FP32 else f"{backend} {precision}"


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


def has_bf16_matrix_units(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 (or fp16) matrix products much faster than fp32: every CUDA GPU
    (tensor cores; autocast falls back to fp16 where bf16 is missing) and CPUs with Intel AMX."""
    if device.type == "cuda":
        return True
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch's own dispatch check (private)
    return device.type == "cpu" and amx is not None and bool(amx())


def choose_backend(backend: str, device: torch.device, precision: str = "auto") -> tuple[str, str]:
    """The ``(backend, precision)`` that run: the ones asked for (checked), ``"auto"`` resolved.

    ``precision="auto"``: reduced precision where :func:`has_bf16_matrix_units` and the backend
    supports it (``bf16-mixed``; on a GPU without bf16, autocast's fp16), else ``32-true``.
    ``backend="auto"``: torch on a GPU; on the CPU the first installed of :data:`CPU_PREFERENCE`
    for the precision.

    Raises:
        ValueError: an unknown backend or precision name.
        UnsupportedRun: a runtime backend for a model on a GPU, or a precision the backend cannot
            run (ONNX Runtime below fp32, fp16 on the CPU).
        BackendUnavailable: a forced runtime that is not installed.
    """
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if device.type != "cpu":
        if backend not in ("auto", "torch"):
            raise UnsupportedRun(f"backend {backend!r} runs on the CPU but the model is on {device}; use torch")
        return "torch", BF16 if precision == "auto" else precision
    if precision == FP16:
        raise UnsupportedRun("precision '16-mixed' runs on GPUs only; on the CPU use bf16-mixed or 32-true")
    if precision == "auto":
        runs_bf16 = backend == "openvino" or (backend == "auto" and _installed("openvino"))
        reduced = runs_bf16 and has_bf16_matrix_units(device)
        precision = BF16 if reduced else FP32
    if backend == "auto":
        return next(name for name in CPU_PREFERENCE[precision] if name == "torch" or _installed(name)), precision
    if backend == "onnxruntime" and precision != FP32:
        raise UnsupportedRun(f"backend 'onnxruntime' runs only 32-true on the CPU, not {precision!r}; "
                         "use openvino or torch for bf16-mixed")
    if backend != "torch":
        _import(backend)
    return backend, precision


def _installed(backend: str) -> bool:
    try:
        _import(backend)
    except BackendUnavailable:
        return False
    return True


def optimize_for_inference(model: nn.Module, *, backend: str = "auto", precision: str = "auto",
                           img_size: tuple[int, int] | None = None, cache_dir: str | Path | None = None,
                           threads: int | None = None, compile_model: bool = False) -> InferenceRunner:
    """The fastest runner for ``model`` (left unchanged) on its device.

    Args:
        model: an EfficientFormer from :func:`~pathology.models.create_model` (or timm's), on its device.
        backend: ``"auto"``, ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"auto"``, ``"32-true"`` (the eager function to 1e-4), ``"bf16-mixed"`` or
            ``"16-mixed"`` (GPUs); see :func:`choose_backend`. Below fp32 the probabilities differ
            by ~1e-2 at most (docs/model.md).
        img_size: input ``(H, W)`` in px; None: the size the model was built for.
        cache_dir: where exported graphs are kept (pass the checkpoint's folder); None: the user
            cache (``$XDG_CACHE_HOME/pathology/onnx``).
        threads: CPU threads of a runtime; None: ``torch.get_num_threads()``.
        compile_model: torch backend: ``torch.compile`` the fused model (slow first call).

    Returns:
        The runner; ``runner.backend`` and ``runner.precision`` say what was chosen.

    Raises:
        ValueError: an unknown backend or precision.
        UnsupportedRun: a combination the device cannot run.
        BackendUnavailable: a forced backend whose package is not installed.
        ExportError: the ONNX export failed.
    """
    device = _device(model)
    chosen, precision = choose_backend(backend, device, precision)
    size = img_size or model_input_size(model)
    if chosen == "torch":
        return TorchRunner(model, size, precision=precision, compile_model=compile_model)
    runtime = _import(chosen)
    path = cached_onnx(model, size, cache_dir, runtime=f"{chosen}{runtime.__version__.split('-')[0]}")
    threads = threads or torch.get_num_threads()
    if chosen == "onnxruntime":
        return OnnxRuntimeRunner(path, size, threads)
    return OpenVinoRunner(path, size, threads, precision)
