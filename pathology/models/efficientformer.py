"""EfficientFormer with multi-head self-attention (MHSA) at a configurable set of output strides.

Built from timm's ``timm.models.efficientformer`` pieces (stem, downsample, pooling and attention
blocks). Two differences from timm's ``EfficientFormer``:

* ``mhsa_blocks`` maps an output stride (4, 8, 16, 32) to the number of MHSA blocks appended after
  that stage's pooling blocks. ``{32: 1}`` is the paper's L1; ``{16: 2, 32: 1}`` adds two MHSA
  blocks at /16. Every stage takes and returns a 4D ``(B, C, H, W)`` tensor: tokens are flattened
  only inside the attention blocks and folded back, so the next stage's convolutional downsample
  works unchanged.
* attention biases are built for the real token grid of ``img_size`` (timm's are fixed at 7 x 7,
  so its L1 crashes on 256 and 512 px tiles).

Pretrained weights are mapped onto this layout by :func:`pathology.models.checkpoint.filter_state_dict`.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, to_2tuple, trunc_normal_
from timm.models._manipulate import checkpoint_seq
from timm.models.efficientformer import Attention, Downsample, MetaBlock1d, MetaBlock2d, Stem4
from torch import nn

from pathology.models.checkpoint import load_pretrained
from pathology.models.mhsa import STAGE_STRIDES, MhsaBlocks

MAX_STRIDE = STAGE_STRIDES[-1]


@dataclass(frozen=True)
class VariantConfig:
    """One registered EfficientFormer variant (a row of the registry).

    Attributes:
        widths: channels of each stage.
        pool_depths: pooling (MetaBlock2d) blocks per stage, before any MHSA blocks.
        default_mhsa: MHSA blocks per output stride when the user gives none (the paper's layout).
    """

    widths: tuple[int, int, int, int]
    pool_depths: tuple[int, int, int, int]
    default_mhsa: dict[int, int]


# timm's depths minus its ``num_vit`` MHSA blocks in the last stage: (3,2,6,4)-1, (4,4,12,6)-4, (6,6,18,8)-8.
MODEL_CONFIGS: dict[str, VariantConfig] = {
    "efficientformer_l1": VariantConfig((48, 96, 224, 448), (3, 2, 6, 3), {32: 1}),
    "efficientformer_l3": VariantConfig((64, 128, 320, 512), (4, 4, 12, 2), {32: 4}),
    "efficientformer_l7": VariantConfig((96, 192, 384, 768), (6, 6, 18, 0), {32: 8}),
    # Not a paper variant: a narrow, shallow model for the demo and tests (as timm's ``test_*`` models),
    # trainable from scratch in a minute on a laptop CPU. No pretrained weights exist for it.
    "efficientformer_tiny": VariantConfig((16, 32, 64, 128), (1, 1, 2, 1), {32: 1}),
}


def token_grid(img_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Token grid ``(rows, cols)`` of a stage with output ``stride`` for an ``(H, W)`` input in px."""
    return img_size[0] // stride, img_size[1] // stride


class MhsaBlock(MetaBlock1d):
    """timm's MetaBlock1d (pre-norm MHSA + MLP with LayerScale) with biases for a ``grid`` of tokens.

    Takes and returns ``(B, N, C)`` tokens, N = rows * cols of ``grid``.
    """

    def __init__(self, dim: int, grid: tuple[int, int], **kwargs: float) -> None:
        super().__init__(dim, **kwargs)
        self.token_mixer = Attention(dim, resolution=grid)


class EfficientFormerStage(nn.Module):
    """Optional strided-conv downsample, pooling blocks, then MHSA blocks; 4D in and 4D out."""

    def __init__(
        self,
        dim_in: int,
        dim: int,
        *,
        n_pool: int,
        n_mhsa: int,
        grid: tuple[int, int],
        downsample: bool,
        drop_path: list[float],
        layer_scale_init_value: float,
        proj_drop: float,
    ) -> None:
        super().__init__()
        self.grad_checkpointing = False
        self.grid = grid
        self.n_pool, self.n_mhsa = n_pool, n_mhsa
        self.downsample = Downsample(dim_in, dim) if downsample else nn.Identity()
        common = dict(layer_scale_init_value=layer_scale_init_value, proj_drop=proj_drop)
        pool = [MetaBlock2d(dim, drop_path=drop_path[i], **common) for i in range(n_pool)]
        mhsa = [MhsaBlock(dim, grid, drop_path=drop_path[n_pool + i], **common) for i in range(n_mhsa)]
        self.blocks = nn.Sequential(*pool, *mhsa)

    def _run(self, blocks: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(blocks, x)
        return blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.n_pool:
            x = self._run(self.blocks[: self.n_pool], x)
        if not self.n_mhsa:
            return x
        batch, channels, rows, cols = x.shape
        if (rows, cols) != self.grid:
            raise ValueError(
                f"input gives a {rows}x{cols} token grid but the attention biases were built for "
                f"{self.grid[0]}x{self.grid[1]}; create the model with img_size matching the input"
            )
        tokens = self._run(self.blocks[self.n_pool :], x.flatten(2).transpose(1, 2))
        return tokens.transpose(1, 2).reshape(batch, channels, rows, cols)


class EfficientFormer(nn.Module):
    """EfficientFormer backbone + distilled classifier heads, MHSA at the strides in ``mhsa_blocks``.

    ``forward_features`` returns normalized ``(B, C, H/32, W/32)`` features; ``forward_head``
    average-pools them and returns ``(B, num_features)`` embeddings (``pre_logits=True``) or the mean
    of the two heads' logits, as timm does.
    """

    def __init__(
        self,
        config: VariantConfig,
        *,
        mhsa_blocks: MhsaBlocks,
        num_classes: int,
        img_size: tuple[int, int],
        in_chans: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init_value: float = 1e-5,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.img_size = img_size
        self.mhsa_blocks = mhsa_blocks
        self.stem = Stem4(in_chans, config.widths[0])
        depths = [n + mhsa_blocks.get(stride, 0) for n, stride in zip(config.pool_depths, STAGE_STRIDES)]
        rates = torch.linspace(0, drop_path_rate, sum(depths)).split(depths)
        stages, dim_in = [], config.widths[0]
        for i, (dim, stride) in enumerate(zip(config.widths, STAGE_STRIDES)):
            stages.append(EfficientFormerStage(
                dim_in, dim, n_pool=config.pool_depths[i], n_mhsa=mhsa_blocks.get(stride, 0),
                grid=token_grid(img_size, stride), downsample=i > 0, drop_path=rates[i].tolist(),
                layer_scale_init_value=layer_scale_init_value, proj_drop=proj_drop_rate,
            ))
            dim_in = dim
        self.stages = nn.Sequential(*stages)
        self.num_features = self.head_hidden_size = config.widths[-1]
        self.norm = LayerNorm2d(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._linear_head()
        self.head_dist = self._linear_head()
        self.apply(_init_linear)

    def _linear_head(self) -> nn.Module:
        return nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Parameter names to exclude from weight decay (the attention bias tables)."""
        return {name for name, _ in self.named_parameters() if "attention_biases" in name}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recomputes block activations in the backward pass to save memory when ``enable``."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> tuple[nn.Module, nn.Module]:
        """The two classifier heads (class and distillation), as timm's."""
        return self.head, self.head_dist

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces both heads with freshly initialised ones for ``num_classes`` (0: no head)."""
        self.num_classes = num_classes
        self.head, self.head_dist = self._linear_head(), self._linear_head()
        self.head.apply(_init_linear)
        self.head_dist.apply(_init_linear)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` normalized images -> ``(B, num_features, H/32, W/32)`` features."""
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pools features over the grid; returns embeddings if ``pre_logits`` else logits ``(B, classes)``."""
        x = self.head_drop(x.mean(dim=(2, 3)))
        if pre_logits:
            return x
        return (self.head(x) + self.head_dist(x)) / 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for ``(B, 3, H, W)`` normalized images."""
        return self.forward_head(self.forward_features(x))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return list(MODEL_CONFIGS)


def create_model(
    name: str,
    *,
    mhsa_blocks: MhsaBlocks | Mapping[int | str, int] | str | None = None,
    num_classes: int = 1000,
    img_size: int | tuple[int, int] = 224,
    pretrained: str | None = None,
    in_chans: int = 3,
    drop_rate: float = 0.0,
    proj_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    layer_scale_init_value: float = 1e-5,
    bias_transfer: str = "pad",
) -> EfficientFormer:
    """Builds a registered EfficientFormer variant, optionally with pretrained weights.

    Args:
        name: one of :func:`list_models`.
        mhsa_blocks: ``{output stride: n}`` MHSA blocks appended after the stage's pooling blocks, in
            any form :meth:`MhsaBlocks.parse` reads (``"16:2,32:1"``, string keys). None: the paper's
            layout (``{32: 1}`` L1, ``{32: 4}`` L3, ``{32: 8}`` L7).
        num_classes: classifier outputs; 0 for a model without heads.
        img_size: input ``H`` (= ``W``) or ``(H, W)`` in px, multiples of 32; attention biases are
            built for this grid.
        pretrained: a local ``.pth``/``.safetensors`` file with timm (or our) key names, or a timm
            hub name (``efficientformer_l1.snap_dist_in1k``); heads are dropped if shapes differ.
        in_chans, drop_rate, proj_drop_rate, drop_path_rate, layer_scale_init_value: as in timm.
        bias_transfer: how a pretrained 7 x 7 attention-bias table fills a larger grid: ``"pad"``
            (same bias per token offset, the edge value beyond it) or ``"interpolate"`` (bicubic).

    Returns:
        The model in train mode, with ``pretrained_cfg`` (mean, std, input_size, ...).

    Raises:
        KeyError: unknown ``name``.
        ValueError: bad ``mhsa_blocks`` or ``img_size``.
        CheckpointError: ``pretrained`` cannot be read or is for another architecture.
    """
    if name not in MODEL_CONFIGS:
        raise KeyError(f"unknown model {name!r}; choose one of {list_models()}")
    config = MODEL_CONFIGS[name]
    size = tuple(int(s) for s in to_2tuple(img_size))
    if any(s <= 0 or s % MAX_STRIDE for s in size):
        raise ValueError(f"img_size {img_size!r} must be positive multiples of {MAX_STRIDE} px")
    blocks = MhsaBlocks.parse(config.default_mhsa if mhsa_blocks is None else mhsa_blocks)
    model = EfficientFormer(
        config, mhsa_blocks=blocks, num_classes=num_classes,
        img_size=size, in_chans=in_chans, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
        drop_path_rate=drop_path_rate, layer_scale_init_value=layer_scale_init_value,
    )
    model.pretrained_cfg = {
        "architecture": name, "mhsa_blocks": model.mhsa_blocks.to_dict(), "num_classes": num_classes,
        "input_size": (in_chans, *size), "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "interpolation": "bicubic", "pretrained": pretrained,
    }
    if pretrained:
        load_pretrained(model, pretrained, bias_transfer=bias_transfer)
    return model
