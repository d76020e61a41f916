"""pathology/models/efficientformer.py: variants, MHSA placement, token grids, input sizes."""
from __future__ import annotations

import pytest
import torch
import yaml
from jsonargparse import ArgumentParser
from timm.layers import get_act_layer
from torch import nn

from pathology.models import MODEL_CONFIGS, create_model, list_models
from pathology.models.efficientformer import ACT_LAYERS, MhsaBlock

N_CLASSES = 3
HEADS = 8  # timm's Attention default


# Li et al. 2022, table of variants: L1 has 1, L3 4, L7 8 MHSA blocks, all at the end of the /32 stage
PAPER_MHSA_AT_32 = {"efficientformer_l1": 1, "efficientformer_l3": 4, "efficientformer_l7": 8}
DEFAULT_MHSA_AT_32 = PAPER_MHSA_AT_32 | {"efficientformer_tiny": 1}  # the demo's variant, not in the paper
# L1 at every tile size; the bigger variants at one size whose grid is not timm's 7 x 7 (construction
# of L7 alone takes seconds on a shared 2-core CPU); the tiny one at the demo's and tests' sizes
FORWARD_CASES = [("efficientformer_l1", size) for size in (224, 256, 512)] + [
    ("efficientformer_l3", 256), ("efficientformer_l7", 256)] + [
    ("efficientformer_tiny", size) for size in (32, 64, 224)]


@pytest.mark.parametrize("placement", ["32", "16+32"])
@pytest.mark.parametrize(("name", "img_size"), FORWARD_CASES)
def test_every_variant_runs_forward(name: str, img_size: int, placement: str) -> None:
    n_16 = 0 if placement == "32" else 2
    mhsa = None if placement == "32" else {"16": n_16, "32": DEFAULT_MHSA_AT_32[name]}
    model = create_model(name, mhsa_blocks=mhsa, num_classes=N_CLASSES, img_size=img_size).eval()
    with torch.inference_mode():
        features = model.forward_features(torch.randn(1, 3, img_size, img_size))
        embedding = model.forward_head(features, pre_logits=True)
        logits = model.forward_head(features)
    width = MODEL_CONFIGS[name].widths[-1]
    assert features.shape == (1, width, img_size // 32, img_size // 32)
    assert embedding.shape == (1, width)
    assert logits.shape == (1, N_CLASSES)
    assert torch.isfinite(logits).all()
    counts = [sum(isinstance(block, MhsaBlock) for block in stage.blocks) for stage in model.stages]
    assert counts == [0, 0, n_16, DEFAULT_MHSA_AT_32[name]]


def test_registry_lists_the_paper_variants_and_the_tiny_one() -> None:
    assert sorted(list_models()) == sorted(DEFAULT_MHSA_AT_32)


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_tiny_variant_is_far_smaller_than_l1_with_the_same_block_types() -> None:
    """The demo's variant: under a tenth of L1's parameters, built from the same four block types."""
    tiny = create_model("efficientformer_tiny", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=64)
    l1 = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=64)
    assert _params(tiny) < _params(l1) / 10
    assert {type(m) for m in tiny.modules()} == {type(m) for m in l1.modules()}
    # 64 px input: 4 x 4 tokens at /16 and 2 x 2 at /32, so both MHSA placements relate several tokens
    assert [stage.grid for stage in tiny.stages[2:]] == [(4, 4), (2, 2)]


def test_attention_biases_cover_the_real_token_grid() -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 2, 32: 1}, img_size=512)
    # 512 px / 16 = 32 tokens a side at /16, 512 / 32 = 16 at /32; one bias per (|dy|, |dx|)
    assert model.stages[2].blocks[6].token_mixer.attention_biases.shape == (HEADS, 32 * 32)
    assert model.stages[3].blocks[3].token_mixer.attention_biases.shape == (HEADS, 16 * 16)
    assert model.stages[3].blocks[3].token_mixer.attention_bias_idxs.shape == (16 * 16, 16 * 16)


def test_non_square_input() -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=(224, 288))
    with torch.inference_mode():
        features = model.eval().forward_features(torch.randn(2, 3, 224, 288))
    assert features.shape == (2, 448, 7, 9)
    assert model.stages[2].blocks[6].token_mixer.attention_biases.shape == (HEADS, 14 * 18)


def test_input_of_another_size_names_img_size() -> None:
    model = create_model("efficientformer_l1", img_size=224).eval()
    with pytest.raises(ValueError, match="img_size"):
        model(torch.randn(1, 3, 256, 256))


def test_channels_last_input_gives_the_same_logits() -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
        actual = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


def test_string_stride_keys_equal_int_keys() -> None:
    model = create_model("efficientformer_l1", mhsa_blocks={"16": 2, "32": 1}, num_classes=0, img_size=64)
    assert model.mhsa_blocks == {16: 2, 32: 1}
    assert create_model("efficientformer_l1", mhsa_blocks={32: 0}, img_size=64).mhsa_blocks == {}


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"img_size": 200}, ValueError, "multiples of 32"),
        ({"img_size": (224, 100)}, ValueError, "multiples of 32"),
        ({"mhsa_blocks": {64: 1}}, ValueError, "stride 64"),
        ({"mhsa_blocks": {"sixteen": 1}}, ValueError, "stride 'sixteen'"),
        ({"mhsa_blocks": {16: -1}}, ValueError, "non-negative"),
    ],
)
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        create_model("efficientformer_l1", **kwargs)


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(KeyError, match="efficientformer_l1"):
        create_model("efficientformer_l2")


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    torch.manual_seed(0)
    model = create_model("efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, num_classes=2, img_size=64)
    x = torch.randn(2, 3, 64, 64)

    def grads() -> torch.Tensor:
        model.zero_grad()
        model(x).square().sum().backward()
        return model.stem.conv1.weight.grad.clone()

    plain = grads()
    model.set_grad_checkpointing(True)
    assert all(stage.grad_checkpointing for stage in model.stages)
    torch.testing.assert_close(grads(), plain)


def test_yaml_config_maps_to_create_model() -> None:
    # what LightningCLI does with a model section: YAML keys become typed arguments
    parser = ArgumentParser()
    parser.add_function_arguments(create_model, "model")
    text = "model:\n  name: efficientformer_l1\n  mhsa_blocks: {16: 2, 32: 1}\n  num_classes: 2\n  img_size: 64\n"
    config = parser.parse_object(yaml.safe_load(text))
    model = create_model(**config.model.as_dict())
    assert model.mhsa_blocks == {16: 2, 32: 1}
    with pytest.raises(SystemExit):  # a typo fails at parse time
        parser.parse_object({"model": {"name": "efficientformer_l1", "num_clases": 2}})


@pytest.mark.parametrize("act_layer", ACT_LAYERS)
def test_every_act_layer_builds_and_runs(act_layer: str) -> None:
    model = create_model("efficientformer_tiny", num_classes=N_CLASSES, img_size=64, act_layer=act_layer).eval()
    expected = type(get_act_layer(act_layer)())
    # every MLP (one per block) uses it; the stem keeps timm's ReLU
    n_blocks = sum(len(stage.blocks) for stage in model.stages)
    assert sum(isinstance(m, expected) for m in model.modules()) == n_blocks + 2 * (expected is nn.ReLU)
    assert model.pretrained_cfg["act_layer"] == act_layer
    with torch.inference_mode():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64))).all()


def test_act_layer_changes_the_function_not_the_weights() -> None:
    gelu = create_model("efficientformer_tiny", num_classes=N_CLASSES, img_size=64, layer_scale_init_value=1.0)
    relu = create_model("efficientformer_tiny", num_classes=N_CLASSES, img_size=64, layer_scale_init_value=1.0,
                        act_layer="relu")
    relu.load_state_dict(gelu.state_dict(), strict=True)  # activations have no weights
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert not torch.allclose(gelu.eval()(x), relu.eval()(x), atol=1e-4)


def test_unknown_act_layer_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="act_layer 'swishy'.*gelu.*hard_swish"):
        create_model("efficientformer_tiny", act_layer="swishy")
