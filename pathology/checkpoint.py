"""What a trained tile classifier carries so inference can rebuild it and feed it the same tiles.

A checkpoint is a plain dict that ``torch.load(weights_only=True)`` can read: ``state_dict``
with keys ``model.<timm key>`` (as the LightningModule saves them) and, under :data:`SPEC_KEY`,
the :class:`ModelSpec` as plain types. Lightning checkpoints and :func:`save_checkpoint` share
this layout, so inference never needs to know which wrote the file. An ensemble of ``k`` models
(:func:`save_ensemble_checkpoint`) has ``ensemble_size = k`` and keys ``model.members.<i>.<timm key>``;
:func:`load_inference_model` rebuilds it as one :class:`~pathology.models.ensemble.Ensemble`.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pathology.atomic import atomic_path
from pathology.io import CheckpointError, read_torch_file
from pathology.models import create_model
from pathology.models.ensemble import Ensemble
from pathology.models.mhsa import MhsaBlocks
from pathology.stain import StainReference
from wsi_tiling import Resolution

__all__ = [
    "SPEC_KEY", "CheckpointError", "ModelSpec", "save_checkpoint", "save_ensemble_checkpoint", "load_checkpoint",
    "load_inference_model", "rewrite_spec",
]

SPEC_KEY = "pathology_spec"
STATE_PREFIX = "model."
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ACT_LAYER = "gelu"  # what checkpoints written before act_layer was recorded used
# fields added after checkpoints were first written, with what older checkpoints meant by their absence
LATER_FIELDS = {"act_layer": DEFAULT_ACT_LAYER, "tta": False, "decision_threshold": None, "stain_reference": None}

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    """Everything inference needs besides the weights: architecture, classes and preprocessing.

    Attributes:
        model_name: registered model name, e.g. ``efficientformer_l1``.
        mhsa_blocks: output stride -> number of attention blocks at the end of that stage.
        class_names: one name per output logit, in logit order.
        img_size: model input edge in pixels (tiles are resized to it).
        tile_size: tile edge in pixels as cut by the tiler, at ``resolution``.
        resolution: the resolution training tiles were asked at (e.g. ``20x``).
        mean: per-channel normalisation mean, for RGB in [0, 1].
        std: per-channel normalisation standard deviation.
        tile_mpp: the µm/px the training tiles were delivered at (median over their tile stores);
            None when unknown (image tiles, or a checkpoint older than this field).
        tile_mpp_spread: (max - min) / median of the stores' delivered µm/px; None when unknown.
        act_layer: the MLPs' activation, a timm name (``gelu``, ``relu``, ``hard_swish``, ...).
        ensemble_size: how many models of this architecture the checkpoint holds (1: a single model;
            more: an :class:`~pathology.models.ensemble.Ensemble` of them, e.g. the CV fold models).
        tta: predict by averaging the softmax over the 8 dihedral views of each tile
            (:mod:`pathology.models.tta`), as training evaluated the model.
        decision_threshold: two classes only: a tile is class 1 when its class-1 probability is at
            least this (chosen on the validation patients); None: argmax.
        stain_reference: tiles are stain-normalised to it (:mod:`pathology.stain`) before
            anything else, as in training; None: no stain normalisation.
    """

    model_name: str
    mhsa_blocks: MhsaBlocks
    class_names: tuple[str, ...]
    img_size: int
    tile_size: int
    resolution: Resolution
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    tile_mpp: float | None = None
    tile_mpp_spread: float | None = None
    act_layer: str = DEFAULT_ACT_LAYER
    ensemble_size: int = 1
    tta: bool = False
    decision_threshold: float | None = None
    stain_reference: StainReference | None = None

    def __post_init__(self) -> None:
        """Raises ValueError: a decision threshold for other than two classes."""
        object.__setattr__(self, "mhsa_blocks", MhsaBlocks.parse(self.mhsa_blocks))  # a plain dict is accepted
        if self.decision_threshold is not None and self.num_classes != 2:
            raise ValueError(f"a decision threshold needs two classes, not {list(self.class_names)}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to_dict(self) -> dict[str, Any]:
        """Plain types only, so the checkpoint loads with ``weights_only=True``."""
        data = asdict(self)
        data["mhsa_blocks"] = self.mhsa_blocks.to_dict()
        data["class_names"] = list(self.class_names)
        data["resolution"] = {"value": float(self.resolution.value), "unit": self.resolution.unit}
        data["mean"], data["std"] = list(self.mean), list(self.std)
        data["stain_reference"] = None if self.stain_reference is None else self.stain_reference.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        """The spec from :meth:`to_dict`'s plain types; fields older checkpoints lack get defaults."""
        for name in LATER_FIELDS.keys() - data.keys():
            log.warning("checkpoint spec has no %s (written before it was recorded); using %r",
                        name, LATER_FIELDS[name])
        return cls(
            model_name=data["model_name"],
            mhsa_blocks=MhsaBlocks.parse(data["mhsa_blocks"]),  # int keys; str keys in JSON copies
            class_names=tuple(data["class_names"]),
            img_size=int(data["img_size"]),
            tile_size=int(data["tile_size"]),
            resolution=Resolution(float(data["resolution"]["value"]), data["resolution"]["unit"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
            tile_mpp=_optional_float(data.get("tile_mpp")),
            tile_mpp_spread=_optional_float(data.get("tile_mpp_spread")),
            act_layer=data.get("act_layer", DEFAULT_ACT_LAYER),
            ensemble_size=int(data.get("ensemble_size", 1)),  # older checkpoints hold one model
            tta=bool(data.get("tta", False)),
            decision_threshold=_optional_float(data.get("decision_threshold")),
            stain_reference=None if data.get("stain_reference") is None
            else StainReference.from_dict(data["stain_reference"]),
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


def save_checkpoint(path: str | Path, model: nn.Module, spec: ModelSpec) -> Path:
    """Writes ``model``'s weights and ``spec`` atomically (temporary file, then rename)."""
    payload = {
        "state_dict": {STATE_PREFIX + k: v.detach().cpu() for k, v in model.state_dict().items()},
        SPEC_KEY: spec.to_dict(),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def rewrite_spec(path: str | Path, **changes: Any) -> ModelSpec:
    """Changes fields of a checkpoint's spec in place, atomically; weights and everything else
    in the file (a Lightning checkpoint's optimiser state, hyper-parameters) are kept.

    Args:
        path: a checkpoint of this project.
        changes: :class:`ModelSpec` fields and their new values, e.g. ``decision_threshold=0.4``.

    Returns:
        The spec now in the file.

    Raises:
        CheckpointError: not a readable checkpoint of this project.
        TypeError: a name that is not a ModelSpec field.
    """
    ckpt = _read_checkpoint(Path(path))
    spec = replace(ModelSpec.from_dict(ckpt[SPEC_KEY]), **changes)
    ckpt[SPEC_KEY] = spec.to_dict()
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return spec


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint's dict, refused unless it holds a spec and a state_dict."""
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or SPEC_KEY not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a pathology tile-classifier checkpoint (no '{SPEC_KEY}')")
    return ckpt


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelSpec]:
    """Reads a checkpoint safely (never unpickles code) and returns (model state_dict, spec).

    Raises:
        CheckpointError: missing, truncated, unsafe or not written by this project.
    """
    path = Path(path)
    ckpt = _read_checkpoint(path)
    state = {k[len(STATE_PREFIX):]: v for k, v in ckpt["state_dict"].items() if k.startswith(STATE_PREFIX)}
    if "tile_mpp" not in ckpt[SPEC_KEY]:
        log.warning("%s: written before checkpoints recorded the training tiles' µm/px; inference can only "
                    "ask for the requested resolution (%s)", path, ckpt[SPEC_KEY].get("resolution"))
    return state, ModelSpec.from_dict(ckpt[SPEC_KEY])


def save_ensemble_checkpoint(path: str | Path, members: list[str | Path],
                             decision_threshold: float | None = None) -> Path:
    """Writes the models of the checkpoints ``members`` as one ensemble checkpoint, atomically.

    Args:
        path: the ensemble checkpoint to write.
        members: checkpoints of one architecture, classes and preprocessing.
        decision_threshold: the ensemble's (a member's own was chosen for that member alone); None: argmax.

    Raises:
        CheckpointError: an unreadable member, or members whose specs differ (architecture,
            classes, preprocessing).
    """
    models, specs = zip(*(load_inference_model(member) for member in members))
    specs = [replace(spec, decision_threshold=decision_threshold) for spec in specs]
    if any(spec != specs[0] for spec in specs):
        raise CheckpointError(f"{path}: the members {[str(m) for m in members]} differ in their specs")
    return save_checkpoint(path, Ensemble(list(models)), replace(specs[0], ensemble_size=len(models)))


def load_inference_model(path: str | Path) -> tuple[nn.Module, ModelSpec]:
    """Rebuilds the classifier a checkpoint describes (an :class:`Ensemble` when it holds several),
    with its weights, in eval mode.

    Raises:
        CheckpointError: unreadable file, or weights that do not fit the recorded architecture.
    """
    state, spec = load_checkpoint(path)
    models = [create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=spec.num_classes,
                           img_size=spec.img_size, act_layer=spec.act_layer) for _ in range(spec.ensemble_size)]
    model = models[0] if spec.ensemble_size == 1 else Ensemble(models)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{path}: weights do not match {spec.model_name} mhsa_blocks={spec.mhsa_blocks} "
                              f"ensemble_size={spec.ensemble_size} ({str(err).splitlines()[0]})") from err
    log.info("loaded %s%s from %s", spec.model_name,
             f" x {spec.ensemble_size}" if spec.ensemble_size > 1 else "", path)
    return model.eval(), spec
