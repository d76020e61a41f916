"""Pretrained weights for :class:`~pathology.models.efficientformer.EfficientFormer`.

One filter, :func:`filter_state_dict`, maps timm's EfficientFormer keys (and the snap originals,
and our own) onto our layout by the *role* of each block, never by shape: the k-th pooling block
of a stage goes to our k-th pooling block, the k-th MHSA block to our k-th MHSA block. timm's last
stage holds a parameter-free ``Flat`` between the two kinds, so its block indices shift by one.
MHSA blocks that the checkpoint lacks (e.g. the ones ``{16: 2}`` adds) keep their initialisation;
their LayerScale starts at 1e-5, so the network starts close to the pretrained one.

Attention biases of a 7 x 7 pretrained table are transferred to the model's token grid, see
:func:`transfer_attention_biases`.
"""
from __future__ import annotations

import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models.efficientformer import checkpoint_filter_fn as snap_to_timm
from torch import nn

from pathology.io import CheckpointError, first_line, read_torch_file

__all__ = ["LoadReport", "filter_state_dict", "load_pretrained", "read_state_dict", "transfer_attention_biases"]

log = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = {".pth", ".pt", ".bin", ".ckpt", ".safetensors"}
WRAPPER_KEYS = ("state_dict", "model")  # Lightning / ours, and many training scripts
WRAPPER_PREFIXES = ("model.", "module.")  # LightningModule attribute, DistributedDataParallel
HEAD_PREFIXES = ("head.", "head_dist.")
BIAS_TRANSFERS = ("pad", "interpolate")
_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$")
_BIAS_TABLE = "token_mixer.attention_biases"
_BIAS_INDEX = "token_mixer.attention_bias_idxs"  # a buffer derived from the grid, never transferred


@dataclass
class LoadReport:
    """What a pretrained load did, key by key (our key names unless said otherwise).

    Attributes:
        loaded: keys copied unchanged.
        reshaped: attention-bias tables transferred to a new token grid.
        dropped_heads: classifier keys skipped because ``num_classes`` differs.
        missing: our keys the checkpoint does not provide (new MHSA blocks, heads).
        unexpected: checkpoint keys (its names) with no place in the model.
    """

    loaded: list[str] = field(default_factory=list)
    reshaped: list[str] = field(default_factory=list)
    dropped_heads: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line of counts, then one line per non-empty list of exceptions."""
        lines = [f"loaded {len(self.loaded)}, reshaped {len(self.reshaped)}, dropped heads "
                 f"{len(self.dropped_heads)}, missing {len(self.missing)}, unexpected {len(self.unexpected)}"]
        for name in ("reshaped", "dropped_heads", "missing", "unexpected"):
            if keys := getattr(self, name):
                lines.append(f"  {name}: {', '.join(_compact(keys))}")
        return "\n".join(lines)


def _compact(keys: list[str]) -> list[str]:
    """Collapses the keys of one block into ``stages.S.blocks.B.* (n keys)``, keeping order."""
    groups: dict[str, int] = {}
    for key in keys:
        match = _BLOCK_KEY.match(key)
        name = f"stages.{match[1]}.blocks.{match[2]}.*" if match else key
        groups[name] = groups.get(name, 0) + 1
    return [f"{name} ({n} keys)" if name.endswith("*") else name for name, n in groups.items()]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads tensors from a ``.safetensors`` or torch file, unwrapping Lightning/DDP containers.

    Raises:
        CheckpointError: missing, truncated, unsafe (code in the pickle) or holding no tensors.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        state = read_torch_file(path, "pretrained weights file")
    elif not path.is_file():
        raise CheckpointError(f"{path}: pretrained weights file not found")
    else:
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a loadable pretrained weights file ({first_line(err)})") from err
    for key in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def transfer_attention_biases(table: torch.Tensor, grid: tuple[int, int], method: str = "pad") -> torch.Tensor:
    """Maps a square ``(heads, r*r)`` bias table (bias per |dy|, |dx| token offset) to ``grid``.

    ``"pad"`` keeps the bias of every offset the table knows and repeats the edge offset beyond it:
    tokens keep their physical size (one token = 32 px at the same µm/px), a larger tile only
    shows more of them, so a 3-token offset must keep its pretrained bias. ``"interpolate"``
    resamples the table bicubically, for inputs that show the same field at a finer scale.

    Args:
        table: ``(heads, r * r)`` biases, row-major over (|dy|, |dx|).
        grid: target token grid ``(rows, cols)``.
        method: ``"pad"`` or ``"interpolate"``.

    Returns:
        ``(heads, rows * cols)`` biases in the same layout.

    Raises:
        ValueError: a non-square table or an unknown ``method``.
    """
    heads, size = table.shape
    side = math.isqrt(size)
    if side * side != size:
        raise ValueError(f"attention-bias table of {size} offsets is not square; cannot transfer it")
    square = table.reshape(heads, side, side)
    if method == "pad":
        rows = torch.arange(grid[0]).clamp(max=side - 1)
        cols = torch.arange(grid[1]).clamp(max=side - 1)
        out = square[:, rows[:, None], cols[None, :]]
    elif method == "interpolate":
        out = F.interpolate(square[None], size=grid, mode="bicubic", align_corners=True)[0]
    else:
        raise ValueError(f"bias_transfer must be one of {BIAS_TRANSFERS}, got {method!r}")
    return out.reshape(heads, grid[0] * grid[1]).to(table.dtype)


def _block_roles(keys: list[str]) -> dict[tuple[int, int], tuple[str, int]]:
    """(stage, block index) -> ("pool" | "mhsa", rank of that kind in the stage), from key names."""
    blocks: dict[int, set[int]] = defaultdict(set)
    mhsa: set[tuple[int, int]] = set()
    for key in keys:
        if match := _BLOCK_KEY.match(key):
            stage, block, rest = int(match[1]), int(match[2]), match[3]
            blocks[stage].add(block)
            if rest.startswith("token_mixer."):
                mhsa.add((stage, block))
    roles = {}
    for stage, indices in blocks.items():
        ranks = {"pool": 0, "mhsa": 0}
        for block in sorted(indices):
            kind = "mhsa" if (stage, block) in mhsa else "pool"
            roles[stage, block] = (kind, ranks[kind])
            ranks[kind] += 1
    return roles


def _target_key(key: str, roles: dict[tuple[int, int], tuple[str, int]], model: nn.Module) -> str | None:
    """Our name for checkpoint ``key``, or None if our model has no such block."""
    match = _BLOCK_KEY.match(key)
    if not match:
        return key
    stage_idx, block = int(match[1]), int(match[2])
    if stage_idx >= len(model.stages):
        return None
    stage = model.stages[stage_idx]
    kind, rank = roles[stage_idx, block]
    if kind == "pool":
        return f"stages.{stage_idx}.blocks.{rank}.{match[3]}" if rank < stage.n_pool else None
    return f"stages.{stage_idx}.blocks.{stage.n_pool + rank}.{match[3]}" if rank < stage.n_mhsa else None


def filter_state_dict(
    state_dict: dict[str, torch.Tensor], model: nn.Module, *, bias_transfer: str = "pad", source: str = "state dict"
) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """Maps a timm/snap/our EfficientFormer state dict onto ``model``'s keys and shapes.

    Args:
        state_dict: checkpoint tensors with timm, snap-original or our key names.
        model: the :class:`EfficientFormer` to load into.
        bias_transfer: see :func:`transfer_attention_biases`.
        source: the file name, for error messages.

    Returns:
        (tensors to pass to ``load_state_dict(strict=False)``, report).

    Raises:
        CheckpointError: a tensor whose shape does not fit (another architecture), or model
            weights other than new MHSA blocks and heads that the checkpoint lacks.
        ValueError: an unknown ``bias_transfer``.
    """
    if bias_transfer not in BIAS_TRANSFERS:
        raise ValueError(f"bias_transfer must be one of {BIAS_TRANSFERS}, got {bias_transfer!r}")
    if any(k.startswith(("network.", "patch_embed.")) for k in state_dict):
        state_dict = snap_to_timm(state_dict, model)
    ours = model.state_dict()
    roles = _block_roles(list(state_dict))
    report, out = LoadReport(), {}
    for key, value in state_dict.items():
        if key.endswith(_BIAS_INDEX):
            continue
        target = _target_key(key, roles, model)
        if target is None or target not in ours:
            (report.dropped_heads if key.startswith(HEAD_PREFIXES) else report.unexpected).append(key)
        elif value.shape == ours[target].shape:
            out[target] = value
            report.loaded.append(target)
        elif key.startswith(HEAD_PREFIXES):
            report.dropped_heads.append(target)
        elif target.endswith(_BIAS_TABLE):
            grid = model.stages[int(target.split(".")[1])].grid
            out[target] = _transfer(value, grid, bias_transfer, source, key)
            report.reshaped.append(target)
        else:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)} but the model needs "
                                  f"{tuple(ours[target].shape)}; weights for another architecture?")
    report.missing = [k for k in ours if k not in out and not k.endswith(_BIAS_INDEX)]
    unexplained = [k for k in report.missing if not _is_new(k, roles, model)]
    if unexplained:
        raise CheckpointError(f"{source}: lacks {len(unexplained)} weights of the model, e.g. {unexplained[0]}; "
                              f"weights for another architecture?")
    return out, report


def _transfer(table: torch.Tensor, grid: tuple[int, int], method: str, source: str, key: str) -> torch.Tensor:
    try:
        return transfer_attention_biases(table, grid, method)
    except ValueError as err:
        raise CheckpointError(f"{source}: {key}: {err}") from err


def _is_new(key: str, roles: dict[tuple[int, int], tuple[str, int]], model: nn.Module) -> bool:
    """Whether our ``key`` is a head or belongs to an MHSA block the checkpoint does not have."""
    if key.startswith(HEAD_PREFIXES):
        return True
    match = _BLOCK_KEY.match(key)
    if not match:
        return False
    stage_idx, block = int(match[1]), int(match[2])
    n_source_mhsa = sum(1 for (s, _), (kind, _) in roles.items() if s == stage_idx and kind == "mhsa")
    return block >= model.stages[stage_idx].n_pool + n_source_mhsa


def load_pretrained(model: nn.Module, pretrained: str, *, bias_transfer: str = "pad") -> LoadReport:
    """Loads a local weights file, or a timm hub name when no such file exists, into ``model``.

    Args:
        model: the :class:`EfficientFormer` to fill in place.
        pretrained: a path ending in one of :data:`CHECKPOINT_SUFFIXES`, or a timm name such as
            ``efficientformer_l1.snap_dist_in1k`` (downloads; needs the network).
        bias_transfer: see :func:`transfer_attention_biases`.

    Returns:
        The report, also logged (warning level when keys are missing or unexpected).

    Raises:
        CheckpointError: unreadable file, unreachable hub name, or weights of another architecture.
    """
    if Path(pretrained).suffix in CHECKPOINT_SUFFIXES or Path(pretrained).exists():
        state = read_state_dict(pretrained)
    else:
        state = _hub_state_dict(pretrained)
    out, report = filter_state_dict(state, model, bias_transfer=bias_transfer, source=pretrained)
    model.load_state_dict(out, strict=False)
    level = logging.WARNING if report.missing or report.unexpected else logging.INFO
    log.log(level, "pretrained weights from %s: %s", pretrained, report.summary())
    return report


def _hub_state_dict(name: str) -> dict[str, torch.Tensor]:
    try:
        return timm.create_model(name, pretrained=True).state_dict()
    except (OSError, RuntimeError, ValueError) as err:
        raise CheckpointError(f"{name}: neither a local weights file nor a downloadable timm model ({err})") from err
