"""The torch backend's eval form of an EfficientFormer: BatchNorm and LayerScale folded, same function.

What the CPU profile showed (see ``benchmarks/bench_model.py``): most time goes to the 1 x 1
convolutions of the pooling blocks' MLPs, their BatchNorms, GELU and the element-wise residual
arithmetic, and NCHW convolutions pay for layout reorders. So: fold every BatchNorm into the
convolution before it, fold LayerScale into the layer before it, compute the pooling branch
``x + gamma * (avgpool(x) - x)`` as one ``lerp`` (half the memory traffic), run MHSA through
``scaled_dot_product_attention`` (fused kernel; matters for the 1024 tokens of /16 attention on
a 512 px tile), and store weights
channels-last, which makes oneDNN convolutions run in their native layout and lets the MHSA
blocks' flatten/unflatten be free views.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from timm.layers import LayerScale, LayerScale2d
from timm.models.efficientformer import Attention, ConvMlpWithNorm, Downsample, MetaBlock1d, MetaBlock2d, Stem4
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["fuse_for_inference"]

# (conv, following BatchNorm) attribute pairs of timm's EfficientFormer modules
_CONV_BN_PAIRS: dict[type[nn.Module], tuple[tuple[str, str], ...]] = {
    Stem4: (("conv1", "norm1"), ("conv2", "norm2")),
    Downsample: (("conv", "norm"),),
    ConvMlpWithNorm: (("fc1", "norm1"), ("fc2", "norm2")),
}


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Returns an eval-mode copy with BatchNorm and LayerScale folded and channels-last weights.

    The copy computes the same function as ``model.eval()`` (to float rounding) and keeps its
    methods (``forward_features``, ``forward_head``); ``model`` itself is left unchanged. Feed it
    with ``torch.inference_mode()``; NCHW inputs work, channels-last inputs avoid one reorder.

    Args:
        model: an EfficientFormer from :func:`pathology.models.create_model` (or timm's).

    Returns:
        The optimised copy, in eval mode, with gradients disabled.
    """
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        for conv_name, bn_name in _CONV_BN_PAIRS.get(type(module), ()):
            bn = getattr(module, bn_name)
            if isinstance(bn, nn.BatchNorm2d):
                setattr(module, conv_name, fuse_conv_bn_eval(getattr(module, conv_name), bn))
                setattr(module, bn_name, nn.Identity())
    for module in list(model.modules()):  # after fusion: LayerScale multiplies the fused fc2's output
        if isinstance(module, nn.Sequential):
            for name, child in module.named_children():
                if isinstance(child, MetaBlock2d) and isinstance(child.ls1, LayerScale2d):
                    _fold_layer_scale(child, "ls2", child.mlp.fc2)
                    setattr(module, name, PoolingBlockLerp(child))
        elif isinstance(module, MetaBlock1d):
            _fold_layer_scale(module, "ls1", module.token_mixer.proj)
            _fold_layer_scale(module, "ls2", module.mlp.fc2)
            module.token_mixer = AttentionSdpa(module.token_mixer)
    model = model.to(memory_format=torch.channels_last)
    return model.requires_grad_(False)


class PoolingBlockLerp(nn.Module):
    """A MetaBlock2d in eval form: ``x = lerp(x, avgpool(x), gamma)``, then ``x + mlp(x)``.

    ``lerp(x, p, g) = x + g * (p - x)``: the block's LayerScaled pooling branch in one pass over
    memory instead of three (sub, mul, add). Drop-path is the identity in eval.
    """

    def __init__(self, block: MetaBlock2d) -> None:
        super().__init__()
        self.pool = block.token_mixer.pool
        self.register_buffer("gamma", block.ls1.gamma.detach().reshape(1, -1, 1, 1).clone())
        self.mlp = block.mlp
        self.ls2 = block.ls2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.lerp(x, self.pool(x), self.gamma.to(x.dtype))  # autocast leaves lerp's weight in fp32
        return x + self.ls2(self.mlp(x))


class AttentionSdpa(nn.Module):
    """timm's EfficientFormer ``Attention`` (same weights and biases) through the fused SDPA kernel.

    Takes and returns ``(B, N, C)`` tokens; the bias table is gathered once per device and cached.
    """

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention
        batch, tokens, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, attn.num_heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([attn.key_dim, attn.key_dim, attn.val_dim], dim=3)
        bias = attn.get_attention_biases(x.device).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scale)
        return attn.proj(out.transpose(1, 2).reshape(batch, tokens, attn.val_attn_dim))


@torch.no_grad()
def _fold_layer_scale(block: nn.Module, name: str, layer: nn.Conv2d | nn.Linear) -> None:
    """Scales ``layer``'s output channels by the LayerScale ``block.<name>``, then drops it.

    Only valid when ``layer`` is the last operation before the LayerScale (dropout is identity in
    eval), which holds for the MLP's ``fc2`` and the attention's ``proj``.
    """
    scale = getattr(block, name)
    if not isinstance(scale, (LayerScale, LayerScale2d)) or getattr(scale, "inplace", False):
        return
    gamma = scale.gamma.detach()
    layer.weight.mul_(gamma.reshape(-1, *([1] * (layer.weight.dim() - 1))))
    if layer.bias is not None:
        layer.bias.mul_(gamma)
    setattr(block, name, nn.Identity())
