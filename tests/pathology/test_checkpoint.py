"""pathology.checkpoint: the spec survives a round trip, and unsafe or foreign files are refused."""
from __future__ import annotations

import logging
import os
import pickle
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pathology.checkpoint import (
    CheckpointError,
    ModelSpec,
    load_checkpoint,
    load_inference_model,
    rewrite_spec,
    save_checkpoint,
    save_ensemble_checkpoint,
)
from pathology.models import create_model
from pathology.models.ensemble import Ensemble
from pathology.models.mhsa import MhsaBlocks
from pathology.stain import StainReference
from wsi_tiling import Resolution

SPEC = ModelSpec(model_name="efficientformer_l1", mhsa_blocks={16: 1, 32: 1}, class_names=("benign", "tumour"),
                 img_size=64, tile_size=128, resolution=Resolution(1.0, "mpp"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    model = create_model(SPEC.model_name, mhsa_blocks=SPEC.mhsa_blocks, num_classes=SPEC.num_classes,
                         img_size=SPEC.img_size).eval()
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", model, SPEC), model


def test_round_trip_rebuilds_the_same_function(saved: tuple[Path, torch.nn.Module]) -> None:
    path, model = saved
    loaded, spec = load_inference_model(path)
    assert spec == SPEC
    assert not loaded.training
    x = torch.randn(2, 3, SPEC.img_size, SPEC.img_size)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_no_temporary_file_is_left(saved: tuple[Path, torch.nn.Module]) -> None:
    path, _ = saved
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


class _Evil:
    def __reduce__(self):  # runs os.system on a full-pickle load
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    with path.open("wb") as fh:
        pickle.dump({"state_dict": {}, "pathology_spec": _Evil()}, fh)
    with pytest.raises(CheckpointError, match="evil.ckpt"):
        load_inference_model(path)


def test_truncated_checkpoint_is_refused(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    path.write_bytes(saved[0].read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        load_inference_model(path)


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError, match="resnet.pth.*not a pathology"):
        load_inference_model(path)


def test_weights_of_another_architecture_are_refused(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    ckpt = torch.load(saved[0], weights_only=True)
    ckpt["pathology_spec"]["mhsa_blocks"] = {32: 1}  # the file's weights hold an extra /16 block
    path = tmp_path / "mismatch.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="mismatch.ckpt.*do not match"):
        load_inference_model(path)


def test_missing_checkpoint_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nothere.ckpt"):
        load_inference_model(tmp_path / "nothere.ckpt")


@pytest.mark.parametrize("stored", [{16: 1, 32: 1}, {"16": 1, "32": 1}])
def test_older_spec_dicts_load_as_mhsa_blocks(saved: tuple[Path, torch.nn.Module], tmp_path: Path,
                                              stored: dict) -> None:
    """Checkpoints written before MhsaBlocks hold a plain dict (int keys; str keys after a JSON trip)."""
    ckpt = torch.load(saved[0], weights_only=True)
    assert type(ckpt["pathology_spec"]["mhsa_blocks"]) is dict  # still what is written: weights_only reads it
    ckpt["pathology_spec"]["mhsa_blocks"] = stored
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    _, spec = load_inference_model(path)
    assert isinstance(spec.mhsa_blocks, MhsaBlocks) and str(spec.mhsa_blocks) == "16:1,32:1"


def test_act_layer_travels_with_the_checkpoint(tmp_path: Path) -> None:
    spec = replace(SPEC, act_layer="hard_swish")
    model = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=spec.num_classes,
                         img_size=spec.img_size, act_layer="hard_swish").eval()
    loaded, loaded_spec = load_inference_model(save_checkpoint(tmp_path / "hs.ckpt", model, spec))
    assert loaded_spec.act_layer == "hard_swish"
    assert any(isinstance(m, torch.nn.Hardswish) for m in loaded.modules())


def test_checkpoint_without_act_layer_loads_as_gelu_with_a_warning(
        saved: tuple[Path, torch.nn.Module], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = torch.load(saved[0], weights_only=True)
    del ckpt["pathology_spec"]["act_layer"]  # as written before act_layer was recorded
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="pathology.checkpoint"):
        _, spec = load_inference_model(path)
    assert spec.act_layer == "gelu"
    assert "act_layer" in caplog.text


def test_an_ensemble_checkpoint_loads_as_one_model_of_its_members(tmp_path: Path) -> None:
    """Two checkpoints become one file with keys model.members.<i>.<timm key>; loading it gives the mean."""
    spec = replace(SPEC, model_name="efficientformer_tiny", mhsa_blocks={32: 1})
    paths, members = [], []
    for seed in range(2):
        torch.manual_seed(seed)
        member = create_model(spec.model_name, mhsa_blocks=spec.mhsa_blocks, num_classes=spec.num_classes,
                              img_size=spec.img_size, layer_scale_init_value=1.0).eval()
        paths.append(save_checkpoint(tmp_path / f"m{seed}.ckpt", member, spec))
        members.append(member)
    path = save_ensemble_checkpoint(tmp_path / "ensemble.ckpt", paths)
    stored = torch.load(path, weights_only=True)
    assert stored["pathology_spec"]["ensemble_size"] == 2
    assert "model.members.1.head.weight" in stored["state_dict"]
    model, loaded_spec = load_inference_model(path)
    assert loaded_spec == replace(spec, ensemble_size=2)
    images = torch.randn(3, 3, spec.img_size, spec.img_size)
    with torch.no_grad():
        expected = (members[0](images).softmax(1) + members[1](images).softmax(1)) / 2
        torch.testing.assert_close(model(images).softmax(1), expected, atol=1e-6, rtol=0)


def test_members_with_other_specs_are_not_ensembled(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path, model = saved
    other = save_checkpoint(tmp_path / "other.ckpt", model, replace(SPEC, class_names=("a", "b")))
    with pytest.raises(CheckpointError, match=r"ensemble\.ckpt: the members .* differ in their specs"):
        save_ensemble_checkpoint(tmp_path / "ensemble.ckpt", [path, other])
    assert not (tmp_path / "ensemble.ckpt").exists()


def test_checkpoint_without_ensemble_size_holds_one_model(saved: tuple[Path, torch.nn.Module],
                                                          tmp_path: Path) -> None:
    ckpt = torch.load(saved[0], weights_only=True)
    del ckpt["pathology_spec"]["ensemble_size"]  # as written before ensembles
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    model, spec = load_inference_model(path)
    assert spec.ensemble_size == 1 and not isinstance(model, Ensemble)
def test_tta_threshold_and_stain_reference_travel_with_the_checkpoint(saved: tuple[Path, torch.nn.Module],
                                                                      tmp_path: Path) -> None:
    path, model = saved
    stain = StainReference(((0.56, 0.22), (0.72, 0.80), (0.41, 0.56)), (1.97, 1.03))
    spec = replace(SPEC, tta=True, decision_threshold=0.37, stain_reference=stain)
    _, loaded = load_checkpoint(save_checkpoint(tmp_path / "tta.ckpt", model, spec))
    assert loaded == spec and loaded.tta is True and loaded.decision_threshold == 0.37
    assert loaded.stain_reference == stain


def test_checkpoint_without_later_fields_loads_with_defaults_and_warnings(
        saved: tuple[Path, torch.nn.Module], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = torch.load(saved[0], weights_only=True)
    for name in ("tta", "decision_threshold", "stain_reference"):  # as written before them
        del ckpt["pathology_spec"][name]
    path = tmp_path / "old.ckpt"
    torch.save(ckpt, path)
    with caplog.at_level(logging.WARNING, logger="pathology.checkpoint"):
        _, spec = load_checkpoint(path)
    assert spec.tta is False and spec.decision_threshold is None and spec.stain_reference is None
    assert all(f"no {name}" in caplog.text for name in ("tta", "decision_threshold", "stain_reference"))


def test_rewrite_spec_changes_only_the_spec(saved: tuple[Path, torch.nn.Module], tmp_path: Path) -> None:
    path = tmp_path / "lightning.ckpt"
    ckpt = torch.load(saved[0], weights_only=True)
    ckpt["epoch"] = 3  # what a Lightning checkpoint holds besides weights and spec
    torch.save(ckpt, path)
    spec = rewrite_spec(path, decision_threshold=0.25)
    after = torch.load(path, weights_only=True)
    assert spec == replace(SPEC, decision_threshold=0.25) and after["pathology_spec"]["decision_threshold"] == 0.25
    assert after["epoch"] == 3
    for name, value in ckpt["state_dict"].items():
        torch.testing.assert_close(after["state_dict"][name], value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lightning.ckpt"]  # no temporary file left


def test_a_threshold_needs_a_two_class_spec() -> None:
    with pytest.raises(ValueError, match="two classes"):
        replace(SPEC, class_names=("a", "b", "c"), decision_threshold=0.5)
