"""Atomic tile-store writing and the picklable TileReader."""
from __future__ import annotations

import logging
import multiprocessing
import pickle
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest

from wsi_tiling import Resolution, TileReader, tile_slide
from wsi_tiling.store import TileStoreWriter, compress_tile, read_store_info

ATTRS = {"patch_size": 4, "patch_size_read_level": 4, "read_level": 0, "slide_path": "nowhere.svs",
         "slide_mpp": None}


def _write(path: Path, tiles: np.ndarray) -> None:
    coords = np.arange(len(tiles) * 2).reshape(-1, 2) * 4
    with TileStoreWriter(path, coords, np.linspace(0.5, 1, len(tiles)), ATTRS, tile_size=4) as writer:
        for index, tile in enumerate(tiles):
            writer.write_encoded(index, compress_tile(tile))


def _tile_sum(reader: TileReader) -> int:
    return int(sum(int(tile.sum()) for tile in reader))


def test_store_round_trips_tiles_and_attrs(tmp_path: Path, rng: np.random.Generator) -> None:
    tiles = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    _write(tmp_path / "a.h5", tiles)
    reader = TileReader(tmp_path / "a.h5")
    assert len(reader) == 3
    assert all((reader[i] == tiles[i]).all() for i in range(3))
    assert (reader[-1] == tiles[2]).all()
    assert reader.coords.tolist() == [[0, 4], [8, 12], [16, 20]]
    assert reader.attrs["slide_mpp"] == "none" and reader.attrs["patch_size"] == 4
    with h5py.File(tmp_path / "a.h5") as file:
        assert file["tiles"].chunks == (1, 4, 4, 3) and file["tiles"].compression == "gzip"
    with pytest.raises(IndexError, match="a.h5"):
        reader[3]


def test_incompressible_tiles_are_stored_raw_and_read_back(tmp_path: Path, rng: np.random.Generator) -> None:
    noise = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # deflate cannot shrink noise
    glass = np.full((32, 32, 3), 240, np.uint8)  # deflates ~100-fold
    assert compress_tile(noise).filter_mask == 1 and len(compress_tile(noise).data) == noise.nbytes
    assert compress_tile(glass).filter_mask == 0 and len(compress_tile(glass).data) < glass.nbytes / 10
    path = tmp_path / "mixed.h5"
    with TileStoreWriter(path, np.zeros((2, 2)), np.ones(2), {**ATTRS, "patch_size": 32}, tile_size=32) as writer:
        writer.write_encoded(0, compress_tile(noise))
        writer.write_encoded(1, compress_tile(glass))
    with h5py.File(path) as file:
        assert (file["tiles"][0] == noise).all() and (file["tiles"][1] == glass).all()


def test_failed_write_leaves_no_file(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError):
        with TileStoreWriter(tmp_path / "b.h5", np.zeros((2, 2)), np.zeros(2), ATTRS, tile_size=4):
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_reader_pickles_and_reads_in_a_spawned_process(tmp_path: Path, rng: np.random.Generator) -> None:
    tiles = rng.integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
    _write(tmp_path / "c.h5", tiles)
    reader = TileReader(tmp_path / "c.h5")
    reader[0]  # opens a handle in this process; pickling must drop it
    clone = pickle.loads(pickle.dumps(reader))
    assert (clone[4] == tiles[4]).all()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        assert pool.submit(_tile_sum, reader).result() == int(tiles.astype(np.int64).sum())


def test_store_info_reads_what_the_tiler_asked_and_delivered(stripes_slide: Path, tmp_path: Path) -> None:
    h5_path = tile_slide(stripes_slide, tmp_path, Resolution(20, "power"), 64, overlap=8).h5_path
    info = read_store_info(h5_path)
    # 20x on a 40x, 0.25 µm/px slide: downsample 2, 0.5 µm/px, read from level 0 (levels 1, 4, 16)
    assert info.resolution == Resolution(20, "power")
    assert (info.tile_size, info.overlap, info.read_level) == (64, 8, 0)
    assert info.target_mpp == pytest.approx(0.5) and info.slide_mpp == pytest.approx(0.25)
    assert info.target_power == pytest.approx(20) and info.slide_power == pytest.approx(40)
    assert info.resize_factor == pytest.approx(2) and info.patch_size_level0 == 128
    assert (info.reader, info.colour, info.mpp_source) == ("openslide", "as-read", "metadata")
    assert info.slide_path == stripes_slide.resolve() and info.request["min_tissue"] == 0.5
    assert TileReader(h5_path).info == info


def test_store_info_of_an_old_store_defaults_with_a_warning(stripes_slide: Path, tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    h5_path = tile_slide(stripes_slide, tmp_path, Resolution(10, "power"), 64).h5_path
    with h5py.File(h5_path, "r+") as file:  # as written before the reader and colour were recorded
        for key in ("reader", "colour", "resolution"):
            del file["coords"].attrs[key]
    with caplog.at_level(logging.WARNING):
        info = read_store_info(h5_path)
    assert (info.reader, info.colour, info.resolution) == ("openslide", "as-read", Resolution(10, "power"))
    assert "h5" in caplog.text and "reader and colour" in caplog.text
