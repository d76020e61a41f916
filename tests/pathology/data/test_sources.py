"""Tile sources: image folders, CSVs (the real IDC set), and the tiler's h5 files with slide or region labels."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pathology.data import (UNLABELLED, EmptyTileSetError, H5Source, ImageCsvSource, ImageFolderSource, LabelError,
                            SplitError, TileDataModule, TileDataset, TilingMismatchError)
from wsi_tiling import Resolution, TileReader, tile_slide

IDC_CLASSES = ["non_idc", "idc"]


def _png(path: Path, rgb: tuple[int, int, int], size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((size, size, 3), rgb[::-1], np.uint8))


def test_folder_labels_from_subfolders_patients_from_names(tmp_path: Path) -> None:
    _png(tmp_path / "tumour" / "P7_a.png", (200, 0, 0))
    _png(tmp_path / "normal" / "P8_a.png", (0, 200, 0))
    _png(tmp_path / "other" / "P9_a.png", (0, 0, 200))  # not a class: kept, unlabelled
    table = ImageFolderSource(tmp_path).table(["normal", "tumour"]).set_index("patient_id")
    assert table.loc["P7", "label"] == 1 and table.loc["P8", "label"] == 0 and table.loc["P9", "label"] == UNLABELLED
    tile = TileDataset(table.reset_index()).tile(list(table.index).index("P7"))
    assert tile.shape == (8, 8, 3) and tuple(tile[0, 0]) == (200, 0, 0)  # RGB order, lossless PNG


def test_folder_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(EmptyTileSetError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere").table(["a", "b"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyTileSetError, match="empty"):
        ImageFolderSource(tmp_path / "empty").table(["a", "b"])
    _png(tmp_path / "named" / "a" / "tile.png", (1, 2, 3))
    with pytest.raises(LabelError, match="tile.png"):
        ImageFolderSource(tmp_path / "named", patient_pattern=r"^(\d+)_").table(["a", "b"])


def test_real_idc_manifest_by_patient(shared_data: Path) -> None:
    # The data README: 7,431 tiles of 209 patients, 1,996 IDC and 5,435 non-IDC, 50 x 50 px.
    source = ImageCsvSource(shared_data / "tiles/idc_breast/manifest.csv", image_root=shared_data, path_column="file")
    table = source.table(IDC_CLASSES)
    assert len(table) == 7431 and table["patient_id"].nunique() == 209
    assert np.bincount(table["label"]).tolist() == [5435, 1996]
    assert TileDataset(table.iloc[:1]).tile(0).shape == (50, 50, 3)
    folder = ImageFolderSource(shared_data / "tiles/idc_breast", patient_pattern=r"^(\d+)_idx5").table(IDC_CLASSES)
    assert folder["patient_id"].nunique() == 209


def test_csv_with_unknown_class_or_missing_column_names_the_csv(tmp_path: Path) -> None:
    csv = tmp_path / "tiles.csv"
    pd.DataFrame({"path": ["a.png"], "label": ["tumor"], "patient_id": ["p1"]}).to_csv(csv, index=False)
    with pytest.raises(LabelError, match=r"tiles.csv.*'tumor'"):
        ImageCsvSource(csv).table(["normal", "tumour"])
    with pytest.raises(LabelError, match=r"tiles.csv.*'file'"):
        ImageCsvSource(csv, path_column="file").table(["normal", "tumour"])


@pytest.fixture(scope="module")
def stripes_h5(stripes_slide: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stripes slide tiled at 10x (1 µm/px), 64 px tiles = 256 level-0 px, tissue tiles only."""
    out = tmp_path_factory.mktemp("tiled")
    result = tile_slide(stripes_slide, out, Resolution(10, "power"), 64, min_tissue=0.5)
    assert result.status == "ok" and result.n_tiles > 0
    return Path(result.h5_path)


def test_h5_slide_labels_and_lazy_pixels(stripes_h5: Path, stripes_slide: Path, tmp_path: Path) -> None:
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": ["stripes"], "patient_id": ["P1"], "label": ["tumour"]}).to_csv(csv, index=False)
    table = H5Source(stripes_h5.parent, csv, slide_dir=stripes_slide.parent).table(["normal", "tumour"])
    assert (table["label"] == 1).all() and (table["patient_id"] == "P1").all()
    tile = TileDataset(table).tile(0)
    assert tile.shape == (64, 64, 3)
    assert tile.min() < 130 and tile.max() > 200  # stripes: dark haematoxylin and pink eosin both present


def test_h5_label_csv_naming_missing_slides(stripes_h5: Path, tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["stripes", "ghost"], "patient_id": ["P1", "P2"], "label": ["a", "b"]}).to_csv(csv)
    with pytest.raises(LabelError, match=r"labels.csv.*'ghost'"):
        H5Source(stripes_h5.parent, csv).table(["a", "b"])


def test_h5_region_labels_by_coverage(stripes_h5: Path, tmp_path: Path) -> None:
    # Annotate the first tissue box (64..512 x 64..384 µm = 256..2048 x 256..1536 level-0 px) as tumour.
    square = [[256, 256], [2048, 256], [2048, 1536], [256, 1536], [256, 256]]
    feature = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [square]},
               "properties": {"classification": {"name": "tumour"}}}
    geojson_dir = tmp_path / "regions"
    geojson_dir.mkdir()
    (geojson_dir / "stripes.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [feature]}))
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": ["stripes"], "patient_id": ["P1"]}).to_csv(csv, index=False)
    source = H5Source(stripes_h5.parent, csv, geojson_dir=geojson_dir, min_coverage=0.5)
    labels = source.table(["tumour"])["label"].to_numpy()
    xy = TileReader(stripes_h5).coords + 128  # tile centres, level-0 px (256 px tiles)
    inside = (xy[:, 0] > 256) & (xy[:, 0] < 2048) & (xy[:, 1] > 256) & (xy[:, 1] < 1536)
    np.testing.assert_array_equal(labels, np.where(inside, 0, UNLABELLED))
    assert inside.any() and (~inside).any()
    background = H5Source(stripes_h5.parent, csv, geojson_dir=geojson_dir, background_class="other")
    np.testing.assert_array_equal(background.table(["tumour", "other"])["label"], np.where(inside, 0, 1))


def test_datamodule_checks_the_declared_tiling_against_the_h5(stripes_h5: Path, tmp_path: Path) -> None:
    csv = tmp_path / "slides.csv"
    pd.DataFrame({"slide_id": ["stripes"], "patient_id": ["P1"], "label": ["a"]}).to_csv(csv, index=False)
    source = H5Source(stripes_h5.parent, csv)
    for tile_size, resolution in ((64, "20x"), (32, "10x")):  # the store holds 64 px tiles at 10x
        dm = TileDataModule(source, ["a", "b"], tmp_path / "splits.csv", tile_size, resolution)
        with pytest.raises(TilingMismatchError, match=stripes_h5.parent.name):
            dm.setup("fit")
    equivalent = TileDataModule(source, ["a", "b"], tmp_path / "splits.csv", 64, "1mpp", test_fraction=0)
    with pytest.raises(SplitError):  # 10x of a 0.25 µm/px, 40x scan is 1 µm/px: the tiling check passes
        equivalent.setup("fit")


def _slides_csv(path: Path, slide_ids: list[str]) -> Path:
    labels = ["neg", "pos"] * len(slide_ids)
    pd.DataFrame({"slide_id": slide_ids, "patient_id": [f"P{i}" for i in range(len(slide_ids))],
                  "label": labels[: len(slide_ids)]}).to_csv(path, index=False)
    return path


def test_h5_stores_of_two_scanners_within_tolerance_share_one_tiling(scanner_stores: Path, tmp_path: Path) -> None:
    csv = _slides_csv(tmp_path / "slides.csv", ["aperio_a", "close_a", "aperio_b"])
    tiling = H5Source(scanner_stores, csv).table(["neg", "pos"]).attrs["tiling"]
    # delivered 1.0, 0.99 and 1.0 µm/px: median 1.0, spread 0.01 / 1.0
    assert tiling["mpp"] == pytest.approx(1.0) and tiling["mpp_spread"] == pytest.approx(0.01)
    assert tiling["resolution"] == "10x" and tiling["power"] == pytest.approx(10)


def test_h5_stores_beyond_tolerance_name_the_outliers(scanner_stores: Path, tmp_path: Path) -> None:
    csv = _slides_csv(tmp_path / "slides.csv", ["aperio_a", "aperio_b", "hamamatsu"])
    # 0.9128 µm/px is 8.7 % from the median 1.0
    with pytest.raises(TilingMismatchError, match=r"hamamatsu \(0\.9128\).*2%.*wsi-tile --mpp 1\.00"):
        H5Source(scanner_stores, csv).table(["neg", "pos"])
    tiling = H5Source(scanner_stores, csv, mpp_tolerance=0.1).table(["neg", "pos"]).attrs["tiling"]
    assert tiling["mpp_spread"] == pytest.approx((1.0 - 0.9128) / 1.0)
