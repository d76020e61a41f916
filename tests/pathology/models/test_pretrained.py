"""pathology/models/checkpoint.py: timm equivalence, partial loading, bias transfer, bad files."""
from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file
from torch import nn

from pathology.checkpoint import CheckpointError
from pathology.models import create_model, filter_state_dict, transfer_attention_biases

TIMM_GRID = 7  # timm's bias table: 224 px / 32
TIMM_L1_MHSA_KEY = "stages.3.blocks.4"  # timm: 3 pooling blocks, Flat (no weights), 1 MHSA block
# float32 sums in another order (LayerNorm on 4D vs tokens, pooling over (H, W) vs N)
LOGIT_ATOL = 1e-3
# float64: only summation order differs, ~1e-15 relative; 1e-6 catches any real difference (a LayerNorm
# eps of 1e-6 instead of timm's 1e-5 moved L1's logits by 3.4e-4)
STRICT_ATOL = 1e-6


def _logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.eval()(x)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_same_function_as_timm_at_224(timm_l1: nn.Module, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"l1{suffix}"
    state = timm_l1.state_dict()
    torch.save(state, path) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, path)
    ours = create_model("efficientformer_l1", mhsa_blocks={32: 1}, pretrained=str(path))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = _logits(timm_l1, x)
    assert expected.std() > 0.1  # random weights: every block changes the logits
    torch.testing.assert_close(_logits(ours, x), expected, rtol=0, atol=LOGIT_ATOL)


@pytest.mark.parametrize("name", ["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"])
def test_exactly_timms_function_in_float64(name: str, randomize: Callable[[nn.Module], nn.Module]) -> None:
    """timm's variant with perturbed weights, loaded into ours: the same logits to 1e-6 in float64.

    timm's biases are fixed at 7 x 7, so 224 px is the only size both run; batch 1 keeps it cheap.
    """
    reference = randomize(timm.create_model(name, num_classes=5)).double().eval()
    ours = create_model(name, num_classes=5)
    weights, report = filter_state_dict(reference.state_dict(), ours)
    ours.load_state_dict(weights, strict=False)
    assert not report.missing and not report.unexpected
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    expected = _logits(reference, x)
    assert expected.std() > 0.05  # random weights: the logits are far from the zero a constant model gives
    torch.testing.assert_close(_logits(ours.double(), x), expected, rtol=0, atol=STRICT_ATOL)


def _as_snap_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm keys -> the key names of snap-research/EfficientFormer's own checkpoints.

    snap: ``patch_embed.{0,1,3,4}`` stem; ``network.{2s}.{b}`` blocks of stage s; ``network.{2s-1}``
    the downsample (``proj``, ``norm``) before stage s; ``layer_scale_{1,2}``; ``dist_head``.
    """
    stem = {"stem.conv1": "patch_embed.0", "stem.norm1": "patch_embed.1", "stem.conv2": "patch_embed.3",
            "stem.norm2": "patch_embed.4"}
    out = {}
    for key, value in state.items():
        for old, new in stem.items():
            key = key.replace(old, new)
        key = re.sub(r"stages\.(\d+)\.downsample\.conv", lambda m: f"network.{2 * int(m[1]) - 1}.proj", key)
        key = re.sub(r"stages\.(\d+)\.downsample\.norm", lambda m: f"network.{2 * int(m[1]) - 1}.norm", key)
        key = re.sub(r"stages\.(\d+)\.blocks\.", lambda m: f"network.{2 * int(m[1])}.", key)
        key = re.sub(r"ls([12])\.gamma", r"layer_scale_\1", key).replace("head_dist", "dist_head")
        out[key] = value
    return out


def test_snap_original_key_names_load(timm_l1: nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "efficientformer_l1.pth"
    snap = _as_snap_original(timm_l1.state_dict())
    assert "network.1.proj.weight" in snap and "network.6.4.layer_scale_1" in snap
    torch.save(snap, path)
    ours = create_model("efficientformer_l1", pretrained=str(path))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(ours, x), _logits(timm_l1, x), rtol=0, atol=LOGIT_ATOL)


def test_mhsa_at_16_loads_every_pretrained_key(timm_l1: nn.Module, timm_l1_file: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="pathology.models.checkpoint"):
        model = create_model("efficientformer_l1", mhsa_blocks={16: 2, 32: 1}, num_classes=2, img_size=512,
                             pretrained=str(timm_l1_file))
    _, report = filter_state_dict(timm_l1.state_dict(), model)
    timm_keys = [k for k in timm_l1.state_dict() if not k.endswith("attention_bias_idxs")]
    heads = ["head.weight", "head.bias", "head_dist.weight", "head_dist.bias"]
    assert len(report.loaded) + len(report.reshaped) == len(timm_keys) - len(heads)
    assert report.dropped_heads == heads
    assert report.unexpected == []
    assert report.reshaped == ["stages.3.blocks.3.token_mixer.attention_biases"]
    # the two new /16 blocks (after L1's 6 pooling blocks) and the 2-class heads start fresh
    missing_blocks = {".".join(k.split(".")[:4]) for k in report.missing if k.startswith("stages.")}
    assert missing_blocks == {"stages.2.blocks.6", "stages.2.blocks.7"}
    assert [k for k in report.missing if not k.startswith("stages.")] == heads
    assert str(timm_l1_file) in caplog.text and "stages.2.blocks.6.*" in caplog.text
    # a pooling block's MLP bias has the shape of the new MHSA block's, yet stays where it was
    pooling_bias = timm_l1.state_dict()["stages.2.blocks.5.mlp.fc1.bias"]
    assert model.stages[2].blocks[6].mlp.fc1.bias.shape == pooling_bias.shape
    torch.testing.assert_close(model.stages[2].blocks[5].mlp.fc1.bias, pooling_bias)
    assert not model.stages[2].blocks[6].mlp.fc1.bias.any()
    # timm's MHSA block (index 4, after Flat) is our block 3
    torch.testing.assert_close(model.stages[3].blocks[3].token_mixer.qkv.weight,
                               timm_l1.state_dict()[f"{TIMM_L1_MHSA_KEY}.token_mixer.qkv.weight"])


def test_new_mhsa_blocks_start_close_to_the_pretrained_network(timm_l1: nn.Module, timm_l1_file: Path) -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 2, 32: 1}, pretrained=str(timm_l1_file))
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    expected = _logits(timm_l1, x)
    # LayerScale 1e-5 on the new blocks: their residual branches move the logits by ~1e-5 relative
    assert (_logits(model, x) - expected).abs().max() < 1e-2 * expected.abs().max()


def test_pad_transfer_keeps_each_offsets_bias() -> None:
    heads, side = 2, 3
    dy, dx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    table = torch.stack([10.0 * dy + dx, -(10.0 * dy + dx)]).reshape(heads, side * side)
    out = transfer_attention_biases(table, (5, 4), "pad").reshape(heads, 5, 4)
    for y in range(5):
        for x in range(4):
            expected = 10.0 * min(y, side - 1) + min(x, side - 1)  # beyond the table: its edge offset
            assert out[0, y, x] == expected and out[1, y, x] == -expected


def test_interpolate_transfer_keeps_corners_and_constants() -> None:
    table = torch.arange(9.0).reshape(1, 9)
    out = transfer_attention_biases(table, (5, 5), "interpolate").reshape(5, 5)
    assert out[0, 0] == 0 and out[0, -1] == 2 and out[-1, 0] == 6 and out[-1, -1] == 8
    constant = transfer_attention_biases(torch.full((3, 49), 0.5), (16, 16), "interpolate")
    torch.testing.assert_close(constant, torch.full((3, 256), 0.5))
    with pytest.raises(ValueError, match="bias_transfer"):
        transfer_attention_biases(table, (5, 5), "nearest")


def test_pretrained_biases_padded_onto_a_512_grid(timm_l1: nn.Module, timm_l1_file: Path) -> None:
    model = create_model("efficientformer_l1", img_size=512, pretrained=str(timm_l1_file))
    table = timm_l1.state_dict()[f"{TIMM_L1_MHSA_KEY}.token_mixer.attention_biases"]
    ours = model.stages[3].blocks[3].token_mixer.attention_biases.detach().reshape(-1, 16, 16)
    torch.testing.assert_close(ours[:, 3, 2], table[:, 3 * TIMM_GRID + 2])
    torch.testing.assert_close(ours[:, 12, 0], table[:, 6 * TIMM_GRID + 0])  # offset 12 > 6: edge value


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_round_trip_of_our_own_weights(tmp_path: Path, suffix: str) -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 2}, num_classes=2, img_size=64)
    path = tmp_path / f"ours{suffix}"
    state = model.state_dict()
    torch.save(state, path) if suffix == ".pth" else save_file({k: v.contiguous() for k, v in state.items()}, path)
    loaded = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 2}, num_classes=2, img_size=64,
                          pretrained=str(path))
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_logits(loaded, x), _logits(model, x), rtol=0, atol=0)


def test_lightning_style_checkpoint_is_unwrapped(tmp_path: Path) -> None:
    model = create_model("efficientformer_l1", num_classes=2, img_size=64)
    path = tmp_path / "epoch=1.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 1}, path)
    loaded = create_model("efficientformer_l1", num_classes=2, img_size=64, pretrained=str(path))
    torch.testing.assert_close(loaded.head.weight, model.head.weight)


class _Exploit:
    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.flag}",)


def _write_bad(kind: str, tmp_path: Path, timm_l1_file: Path) -> Path:
    if kind == "l3 architecture":
        path = tmp_path / "l3.pth"
        torch.save(create_model("efficientformer_l3", num_classes=0, img_size=32).state_dict(), path)
    elif kind == "not an efficientformer":
        path = tmp_path / "convnet.pth"
        torch.save(nn.Sequential(nn.Conv2d(3, 8, 3)).state_dict(), path)
    elif kind == "non-square biases":  # a 7 x 9 table cannot be told apart from 9 x 7: refuse it
        path = tmp_path / "l1_224x288.pth"
        torch.save(create_model("efficientformer_l1", img_size=(224, 288)).state_dict(), path)
    elif kind == "truncated":
        path = tmp_path / "truncated.pth"
        data = timm_l1_file.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "truncated safetensors":
        path = tmp_path / "truncated.safetensors"
        save_file({"w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:500])
    elif kind == "code in pickle":
        path = tmp_path / "exploit.pth"
        path.write_bytes(pickle.dumps({"w": _Exploit(tmp_path / "pwned")}))
    else:
        path = tmp_path / "missing.pth"
    return path


def test_l1_weights_do_not_load_into_the_tiny_variant(timm_l1_file: Path) -> None:
    """The tiny variant has no pretrained weights; L1's are refused as another architecture's."""
    with pytest.raises(CheckpointError, match="another architecture"):
        create_model("efficientformer_tiny", img_size=64, pretrained=str(timm_l1_file))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["l3 architecture", "not an efficientformer", "non-square biases", "truncated",
                                  "truncated safetensors", "code in pickle", "missing"])
def test_bad_weights_file_names_the_file(kind: str, tmp_path: Path, timm_l1_file: Path) -> None:
    path = _write_bad(kind, tmp_path, timm_l1_file)
    with pytest.raises(CheckpointError, match=path.name):
        create_model("efficientformer_l1", img_size=64, pretrained=str(path))
    assert not (tmp_path / "pwned").exists()
