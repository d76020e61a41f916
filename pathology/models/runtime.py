"""The fastest way this machine runs a tile classifier, behind one entry point.

:func:`optimize_for_inference` returns a runner: ``runner(images)`` gives logits and
``runner.logits_and_embeddings(images)`` both, whatever runs underneath:

* ``torch``: :func:`~pathology.models.optimize.fuse_for_inference` (BatchNorm and LayerScale
  folded, channels-last), under bf16 (or fp16) autocast at reduced precision, optionally
  ``torch.compile``.
* ``onnxruntime``: ONNX Runtime's CPU provider on the model's ONNX graph (fp32 only).
* ``openvino``: OpenVINO's CPU plugin on the same graph, at fp32 or bf16.

Precision (Lightning's names): ``32-true`` computes the eager function (to 1e-4); ``bf16-mixed``
runs the matrix products in bfloat16, which hardware with bf16 units (CUDA GPUs; CPUs with
Intel AMX or AVX512-BF16) runs two to several times faster, at ~1e-2 in the probabilities;
``16-mixed`` is fp16 on GPUs. ``"auto"`` takes reduced precision where the hardware has such
units and fp32 elsewhere, and the backend: torch on a GPU; on the CPU the first installed runtime
of :data:`CPU_PREFERENCE` for that precision. ONNX graphs are exported once and cached (see
:func:`~pathology.models.export.cached_onnx`), so a cohort pays the export once.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property, partial
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from pathology.models.export import (
    INPUT_NAME,
    OUTPUT_NAMES,
    LogitsAndEmbeddings,
    PixelInput,
    cached_onnx,
    model_input_size,
)
from pathology.models.optimize import fuse_for_inference

__all__ = ["BACKENDS", "BF16", "CPU_PREFERENCE", "FP16", "FP32", "PRECISIONS", "BackendUnavailable", "InferenceRunner",
           "Normalization", "UnsupportedRun", "choose_backend", "has_bf16_hardware", "has_bf16_matrix_units",
           "optimize_for_inference", "runner_label"]

BACKENDS = ("torch", "onnxruntime", "openvino")
PRECISIONS = ("auto", "32-true", "bf16-mixed", "16-mixed")
FP32, BF16, FP16 = PRECISIONS[1:]
# CPU order of "auto" per precision, from the benchmark in docs/model.md: at fp32 ONNX Runtime was
# fastest at batch 1 and OpenVINO at batch 32; at bf16 OpenVINO ran 3.5x ONNX Runtime's fp32
# (ONNX Runtime has no bf16 CPU kernels). Both runtimes are core dependencies.
CPU_PREFERENCE = {FP32: ("onnxruntime", "openvino", "torch"), BF16: ("openvino", "torch")}
INSTALL_HINT = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}
OPENVINO_HINT = {FP32: "f32", BF16: "bf16"}  # INFERENCE_PRECISION_HINT
MAX_STREAMS = 4  # parallel one-batch-part streams of a runtime (ONNX Runtime holds the weights once per stream)


class BackendUnavailable(ImportError):
    """A backend was asked for whose runtime package is not installed."""


class UnsupportedRun(ValueError):
    """A backend or precision the model's device cannot run (a CPU runtime on a GPU, fp16 on the CPU)."""


Normalization = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) on the [0, 1] scale


class InferenceRunner(ABC):
    """Runs a classifier on ``(B, 3, H, W)`` float images normalised as its spec says or, built with
    ``normalize``, on ``(B, 3, H, W)`` uint8 pixels it normalises itself (:class:`PixelInput`).

    Attributes:
        backend: ``"torch"``, ``"onnxruntime"`` or ``"openvino"``.
        precision: ``"32-true"``, ``"bf16-mixed"`` or ``"16-mixed"`` (see :data:`PRECISIONS`).
        device: where inputs are run and outputs returned (runtimes: the CPU).
        img_size: the ``(H, W)`` in px the runner takes.
        pixels: whether it takes uint8 pixels (else normalised floats).
    """

    backend: str
    precision: str
    device: torch.device
    img_size: tuple[int, int]
    pixels: bool = False

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
            ValueError: images that are not ``(B, 3, H, W)`` at :attr:`img_size`, or uint8 pixels
                given to a runner of normalised floats (or the reverse).
        """
        if images.dim() != 4 or tuple(images.shape[2:]) != self.img_size:
            raise ValueError(f"{self.backend} runner takes (B, 3, {self.img_size[0]}, {self.img_size[1]}) images, "
                             f"got {tuple(images.shape)}")
        if (images.dtype == torch.uint8) != self.pixels:
            wanted = "uint8 pixels" if self.pixels else "normalised float images"
            raise ValueError(f"{self.backend} runner takes {wanted}, got {images.dtype}")
        return self._run(images)

    @property
    def input_dtype(self) -> torch.dtype:
        return torch.uint8 if self.pixels else torch.float32

    @abstractmethod
    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ...


class TorchRunner(InferenceRunner):
    """The fused model through torch, channels-last, under autocast below fp32."""

    backend = "torch"

    def __init__(self, model: nn.Module, img_size: tuple[int, int], *, precision: str, compile_model: bool,
                 pixels: bool) -> None:
        self.device = _device(model)
        self.img_size, self.precision, self.pixels = img_size, precision, pixels
        if precision == BF16 and self.device.type == "cuda" and not torch.cuda.is_bf16_supported():
            self.precision = FP16  # a GPU without bf16 (where Lightning's bf16-mixed would fail)
        self.autocast_dtype = {BF16: torch.bfloat16, FP16: torch.float16}.get(self.precision)
        module = LogitsAndEmbeddings(fuse_for_inference(model)).eval()
        self.module = torch.compile(module) if compile_model else module

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.to(self.device, self.input_dtype, non_blocking=True).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                                    enabled=self.autocast_dtype is not None):
            logits, embeddings = self.module(x)
        return logits.float(), embeddings.float()


class _StreamedRuntime(InferenceRunner):
    """A runtime that runs a batch as parallel streams, one thread each, and a single image on all threads.

    Why streams: with all threads on one batch, the threads meet at every layer, so whenever another
    thread of the process (the slide reader of ``pathology infer``) takes a core, every thread
    waits for the one descheduled. On the 2-core VM, with a thread of numpy work beside it, L1 at
    batch 64 fell from 140 to 68 img/s that way (OpenVINO bf16), against 164 to 106 as two
    one-thread streams, which were also faster alone (ONNX Runtime: 58 to 30, against 64 to 41).
    A batch of one cannot be split, so it takes the all-threads form.
    Outputs equal the unsplit batch's (each image is computed on its own).
    """

    def __init__(self, threads: int, pixels: bool) -> None:
        self.streams = min(threads, MAX_STREAMS)
        self.device, self.pixels = torch.device("cpu"), pixels

    def _run(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.detach().to("cpu", self.input_dtype).contiguous().numpy()
        if self.streams == 1 or len(x) == 1:
            logits, embeddings = self._run_whole(x)
        else:
            outputs = self._run_parts(np.array_split(x, min(self.streams, len(x))))
            logits, embeddings = (np.concatenate(part) for part in zip(*outputs))
        return torch.from_numpy(logits), torch.from_numpy(embeddings)

    @abstractmethod
    def _run_whole(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, embeddings) of ``x`` on all threads."""

    @abstractmethod
    def _run_parts(self, parts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        """(logits, embeddings) of each part, the parts run at once on one stream each."""


class OnnxRuntimeRunner(_StreamedRuntime):
    """ONNX Runtime's CPU provider on an exported graph, at fp32: one session per stream (threads
    shared out) and, once a single image comes, one on all threads."""

    backend = "onnxruntime"
    precision = FP32

    def __init__(self, path: Path, img_size: tuple[int, int], threads: int, pixels: bool) -> None:
        super().__init__(threads, pixels)
        ort = _import("onnxruntime")

        def session(n_threads: int) -> object:
            options = ort.SessionOptions()
            options.intra_op_num_threads = n_threads
            options.inter_op_num_threads = 1
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        self.img_size = img_size
        self._session = partial(session, threads)
        if self.streams > 1:  # ORT frees the GIL, so Python threads run the sessions at once
            self.stream_sessions = [session(n) for n in _share(threads, self.streams)]
            self.pool = ThreadPoolExecutor(self.streams, thread_name_prefix="onnxruntime-stream")

    @cached_property
    def session(self) -> object:
        """The all-threads session, made on the first single image (batches use the streams)."""
        return self._session()

    def _run_whole(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, embeddings = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return logits, embeddings

    def _run_parts(self, parts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        futures = [self.pool.submit(session.run, list(OUTPUT_NAMES), {INPUT_NAME: part})
                   for session, part in zip(self.stream_sessions, parts)]
        return [tuple(future.result()) for future in futures]


class OpenVinoRunner(_StreamedRuntime):
    """OpenVINO's CPU plugin on an exported graph, at fp32 or bf16: one compiled form with a stream
    per thread (sharing the weights) and, once a single image comes, one with all threads in a
    single stream."""

    backend = "openvino"

    def __init__(self, path: Path, img_size: tuple[int, int], threads: int, precision: str, pixels: bool) -> None:
        super().__init__(threads, pixels)
        ov = _import("openvino")
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": OPENVINO_HINT[precision]}
        graph = core.read_model(str(path))
        self._compile_whole = partial(core.compile_model, graph, "CPU", config)
        if self.streams > 1:
            streamed = core.compile_model(graph, "CPU", {**config, "NUM_STREAMS": self.streams})
            self.stream_requests = [streamed.create_infer_request() for _ in range(self.streams)]
        self.img_size, self.precision = img_size, precision

    @cached_property
    def request(self) -> object:
        """The all-threads form's request, compiled on the first single image (0.16 s of one core
        on the 2-core VM, saved at the start of every run that only sends batches)."""
        return self._compile_whole().create_infer_request()

    def _run_whole(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.request.infer({INPUT_NAME: x})
        return _outputs(self.request)

    def _run_parts(self, parts: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        requests = self.stream_requests[:len(parts)]
        for request, part in zip(requests, parts):
            request.start_async({INPUT_NAME: part})
        for request in requests:
            request.wait()
        return [_outputs(request) for request in requests]


def _outputs(request: object) -> tuple[np.ndarray, np.ndarray]:
    """An OpenVINO request's (logits, embeddings), copied out of its reused buffers."""
    logits, embeddings = (request.get_tensor(name).data.copy() for name in OUTPUT_NAMES)
    return logits, embeddings


def _share(threads: int, streams: int) -> list[int]:
    """``threads`` dealt out over ``streams`` (the first get one more when it does not divide)."""
    return [threads // streams + (i < threads % streams) for i in range(streams)]


def runner_label(backend: str, precision: str) -> str:
    """``"onnxruntime"`` at fp32, ``"openvino bf16-mixed"`` below it: what ran, for reports and tables."""
    return backend if precision == FP32 else f"{backend} {precision}"


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _import(backend: str) -> ModuleType:
    """The backend's runtime module; raises :class:`BackendUnavailable` with the install command."""
    try:
        return importlib.import_module(backend)
    except ImportError as err:
        raise BackendUnavailable(f"backend {backend!r} is not installed ({INSTALL_HINT[backend]})") from err


def has_bf16_hardware(device: torch.device) -> bool:
    """Whether ``device`` runs bf16 (or fp16) matrix products much faster than fp32: every CUDA GPU
    (tensor cores; autocast falls back to fp16 where bf16 is missing), CPUs with Intel AMX (bf16
    matrix tiles) and CPUs with AVX512-BF16 (bf16 dot-product instructions: Cooper Lake Xeons, AMD
    Zen 4 and later). On a 2-core AMD EPYC with AVX512-BF16 and no AMX, OpenVINO ran L1 at bf16 2.2x
    as fast as ONNX Runtime at fp32 (docs/model.md); on an AMX Xeon, 3.5x."""
    if device.type == "cuda":
        return True
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch's own dispatch checks (private)
    return device.type == "cpu" and any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


has_bf16_matrix_units = has_bf16_hardware  # its name before AVX512-BF16 CPUs counted


def choose_backend(backend: str, device: torch.device, precision: str = "auto") -> tuple[str, str]:
    """The ``(backend, precision)`` that run: the ones asked for (checked), ``"auto"`` resolved.

    ``precision="auto"``: reduced precision where :func:`has_bf16_hardware` and the backend
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
        reduced = runs_bf16 and has_bf16_hardware(device)
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
                           threads: int | None = None, compile_model: bool = False,
                           normalize: Normalization | None = None) -> InferenceRunner:
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
        normalize: ``(mean, std)``: the runner takes ``(B, 3, H, W)`` uint8 pixels and normalises
            them in its graph (:class:`~pathology.models.export.PixelInput`), which is how
            inference feeds it (much cheaper for the tile reader); None: normalised float images.

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
    pixels = normalize is not None
    model = PixelInput(model, *normalize) if pixels else model  # the one place the normalisation joins the model
    if chosen == "torch":
        return TorchRunner(model, size, precision=precision, compile_model=compile_model, pixels=pixels)
    runtime = _import(chosen)
    path = cached_onnx(model, size, cache_dir, runtime=f"{chosen}{runtime.__version__.split('-')[0]}")
    threads = threads or torch.get_num_threads()
    if chosen == "onnxruntime":
        return OnnxRuntimeRunner(path, size, threads, pixels)
    return OpenVinoRunner(path, size, threads, precision, pixels)
