"""ONNX export of a tile classifier: the graph other runtimes run (``pathology export`` writes one
for a checkpoint, :mod:`pathology.export`).

The graph takes ``images`` ``(batch, 3, H, W)`` float32 (normalised as the spec says), or uint8
pixels for a :class:`PixelInput` model (which normalises them itself), with a dynamic batch, and
returns ``logits`` ``(batch, classes)`` and ``embeddings`` ``(batch, D)``
(``forward_head(pre_logits=True)``), so inference gets both from one run. The model is exported
unfused: ONNX Runtime and OpenVINO fold BatchNorm themselves, and they ran our unfused graph
faster than the torch-fused one (the lerp and SDPA forms suit oneDNN, not their fusers).

We use torch's ``torch.export``-based exporter (``dynamo=True``, needs ``onnxscript``): it is
torch's default since 2.9 and the TorchScript exporter warns that it will be removed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from pathology.atomic import atomic_path

__all__ = ["ExportError", "LogitsAndEmbeddings", "PixelInput", "cached_onnx", "default_cache_dir", "export_onnx",
           "model_input_size", "weights_hash"]

INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "embeddings")
MAX_PIXEL = 255.0
TRACE_BATCH = 2  # a batch of 1 lets the exporter specialise the batch dimension
HASH_CHARS = 16

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The model could not be exported (a missing exporter package, or an unsupported operator)."""


class LogitsAndEmbeddings(nn.Module):
    """``images -> (logits, embeddings)`` of a timm-style classifier, as one graph to export."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(images)
        return self.model.forward_head(features), self.model.forward_head(features, pre_logits=True)


class PixelInput(nn.Module):
    """A classifier that takes raw ``(B, 3, H, W)`` uint8 pixels and normalises them itself.

    Why: normalising a tile on the CPU (a float copy, then a subtraction and a multiplication over
    it) cost the reader of ``pathology infer`` 0.17-0.5 ms per 224 px tile, up to as much as
    decoding its JPEG, on the same cores as the model; inside the model's graph the runtime does it
    with the first layer, and the batch it is handed is 4x smaller (also over PCIe to a GPU).

    Args:
        model: a timm-style classifier (``forward_features`` / ``forward_head``).
        mean, std: its per-channel normalisation on the [0, 1] scale (the spec's).
    """

    input_dtype = torch.uint8

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model
        self.img_size = model_input_size(model)
        self.register_buffer("shift", torch.tensor([m * MAX_PIXEL for m in mean]).view(1, -1, 1, 1))
        self.register_buffer("scale", torch.tensor([1 / (s * MAX_PIXEL) for s in std]).view(1, -1, 1, 1))
        self.train(model.training)  # a new module is in training mode; the wrapped model's mode is kept

    def forward_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features((pixels.float() - self.shift) * self.scale)

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.model.forward_head(features, pre_logits=pre_logits)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(pixels))


def model_input_size(model: nn.Module) -> tuple[int, int]:
    """The ``(H, W)`` in px a model was built for: ours record ``img_size``, timm's ``pretrained_cfg``."""
    size = getattr(model, "img_size", None) or model.pretrained_cfg["input_size"][1:]
    return int(size[0]), int(size[1])


def weights_hash(model: nn.Module) -> str:
    """A hex digest of the model's function: its structure (``repr``: blocks, activations) and every tensor."""
    digest = hashlib.sha256(repr(model).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:HASH_CHARS]


def export_onnx(model: nn.Module, path: str | Path, img_size: tuple[int, int],
                metadata: dict[str, str] | None = None) -> Path:
    """Writes ``model`` (left unchanged) as an ONNX graph, atomically.

    Args:
        model: a timm-style classifier (``forward_features`` / ``forward_head``), any mode.
        path: the ``.onnx`` file to write.
        img_size: input ``(H, W)`` in px (fixed; the batch dimension is dynamic).
        metadata: key -> value pairs stored in the graph's ``metadata_props``.

    Returns:
        ``path``.

    Raises:
        ExportError: ``onnx``/``onnxscript`` missing, or the exporter failed.
    """
    try:
        import onnx  # noqa: F401  (the exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as err:
        raise ExportError(f"ONNX export needs the onnx and onnxscript packages ({err}); pip install onnxscript") \
            from err
    was_training = model.training
    wrapper = LogitsAndEmbeddings(model).eval()
    example = torch.zeros(TRACE_BATCH, 3, *img_size, device=next(model.parameters()).device,
                          dtype=getattr(model, "input_dtype", torch.float32))
    path = Path(path)
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # timm's Attention caches its bias table on first use; the exporter notes the assignment
        warnings.filterwarnings("ignore", message=".*attention_bias_cache.*")
        try:
            program = torch.onnx.export(
                wrapper, (example,), dynamo=True, verbose=False, input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES), dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
            )
        except (RuntimeError, torch.onnx.errors.OnnxExporterError) as err:
            raise ExportError(f"{path}: ONNX export failed ({str(err).splitlines()[0]})") from err
        finally:
            model.train(was_training)
        for key, value in (metadata or {}).items():
            program.model.metadata_props[key] = value
        program.save(tmp, external_data=False)
    return path


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/pathology/onnx`` (``~/.cache/pathology/onnx``): graphs of models given without a folder."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pathology" / "onnx"


def cached_onnx(model: nn.Module, img_size: tuple[int, int], cache_dir: str | Path | None, *, runtime: str) -> Path:
    """The ONNX graph of ``model`` for ``img_size``, exported only if no earlier call did.

    The file name holds the model's :func:`weights_hash`, the input size, torch's version (the
    exporter) and ``runtime`` (name and version of what runs it), so new weights, another size or
    an upgrade export anew, and every slide of a cohort after the first reuses the file.

    Args:
        model: the classifier (left unchanged).
        img_size: input ``(H, W)`` in px.
        cache_dir: the folder (e.g. the checkpoint's); None: :func:`default_cache_dir`.
        runtime: e.g. ``"onnxruntime1.32.0"``.

    Returns:
        The cached graph's path.

    Raises:
        ExportError: see :func:`export_onnx`.
    """
    name = (f"{type(model).__name__}-{weights_hash(model)}-{img_size[0]}x{img_size[1]}"
            f"-torch{torch.__version__}-{runtime}.onnx")
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name)  # "+cu130" and the like
    path = Path(cache_dir or default_cache_dir()) / name
    if not path.is_file():
        log.info("exporting %s (once for these weights, size and runtime)", path)
        export_onnx(model, path, img_size)
    return path
