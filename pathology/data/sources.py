"""Where labelled tiles come from: folders or CSVs of tile images, or the tiler's h5 files.

Every source returns the same *tile table*, one row per tile, so datasets, splits and
prediction never care where pixels live:

========== ==========================================================================
column     meaning
========== ==========================================================================
path       tile image file, or the tiler's ``.h5`` file
tile_index row in the h5 file (-1 for image files)
slide_path slide to read pixels from when the h5 stores none ("" otherwise)
label      class index into ``class_names``; ``UNLABELLED`` (-1) when not known
patient_id patient the tile comes from (splits group by it)
slide_id   slide (or image folder) the tile comes from
========== ==========================================================================
"""
from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import pandas as pd

from pathology.data.annotations import UNLABELLED, class_coverage, labels_from_coverage, read_geojson
from pathology.data.errors import EmptyTileSetError, LabelError, TilingMismatchError
from wsi_tiling import TileReader

__all__ = ["TILE_COLUMNS", "TileSource", "ImageFolderSource", "ImageCsvSource", "H5Source", "read_table"]

TILE_COLUMNS = ["path", "tile_index", "slide_path", "label", "patient_id", "slide_id"]
DEFAULT_MPP_TOLERANCE = 0.02  # relative: stores delivering µm/px within 2 % of the median train together
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


class TileSource(ABC):
    """A swappable source of labelled tiles (``class_path`` / ``init_args`` in YAML).

    A source that knows how its tiles were cut records it in the table's ``attrs["tiling"]``
    (``tile_size``, requested ``resolution``, delivered ``mpp`` and ``power`` (medians over slides),
    ``mpp_spread`` ((max - min) / median of the slides' µm/px), ``where``), and the DataModule checks
    it against the config; training records ``mpp`` and ``mpp_spread`` in the checkpoint.
    """

    @abstractmethod
    def table(self, class_names: list[str]) -> pd.DataFrame:
        """Returns the tile table (see module docstring); labels index ``class_names``.

        Raises:
            EmptyTileSetError: the source holds no tiles.
            LabelError: labels or patients cannot be read.
        """


def read_table(path: Path, required: list[str]) -> pd.DataFrame:
    """Reads a CSV as strings and checks it has the ``required`` columns.

    Raises:
        LabelError: unreadable, or a column is missing (the message names both).
    """
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise LabelError(f"{path}: not a readable CSV ({err})") from err
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise LabelError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    return df


def _label_indices(labels: pd.Series, class_names: list[str], where: Path) -> np.ndarray:
    """Maps class names to indices; empty strings mean unknown. Raises LabelError on unknown names."""
    unknown = sorted(set(labels) - set(class_names) - {""})
    if unknown:
        raise LabelError(f"{where}: labels {unknown} are not in class_names {class_names}")
    index = {name: i for i, name in enumerate(class_names)}
    return np.array([index.get(label, UNLABELLED) for label in labels], dtype=np.int64)


def _image_rows(paths: list[Path], labels: np.ndarray, patients: list[str], slides: list[str]) -> pd.DataFrame:
    return pd.DataFrame({"path": [str(p) for p in paths], "tile_index": -1, "slide_path": "", "label": labels,
                         "patient_id": patients, "slide_id": slides}, columns=TILE_COLUMNS)


class ImageFolderSource(TileSource):
    """Tile images in one sub-folder per class (``root/<class>/<tile>.png``), or all in ``root`` unlabelled."""

    def __init__(self, root: str | Path, patient_pattern: str | None = r"^([^_]+)_") -> None:
        """Args:
            root: folder of class sub-folders (or of images, for unlabelled prediction).
            patient_pattern: regex whose first group is the patient id in a file name (IDC:
                ``^(\\d+)_idx5``); None makes each tile its own patient (only for prediction).
        """
        self.root = Path(root)
        self.patient_pattern = patient_pattern

    def _patient(self, path: Path) -> str:
        if self.patient_pattern is None:
            return path.stem
        match = re.search(self.patient_pattern, path.name)
        if match is None:
            raise LabelError(f"{path}: file name does not match patient_pattern {self.patient_pattern!r}")
        return match.group(1)

    def table(self, class_names: list[str]) -> pd.DataFrame:
        if not self.root.is_dir():
            raise EmptyTileSetError(f"{self.root}: tile folder not found")
        paths = sorted(p for p in self.root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not paths:
            raise EmptyTileSetError(f"{self.root}: no tile images ({', '.join(IMAGE_EXTENSIONS)})")
        folders = [p.parent.relative_to(self.root).parts[0] if p.parent != self.root else "" for p in paths]
        labelled = [f if f in class_names else "" for f in folders]
        labels = _label_indices(pd.Series(labelled), class_names, self.root)
        return _image_rows(paths, labels, [self._patient(p) for p in paths], folders)


class ImageCsvSource(TileSource):
    """Tile images listed in a CSV with path, label and patient columns (like the IDC manifest)."""

    def __init__(self, csv: str | Path, image_root: str | Path | None = None, path_column: str = "path",
                 label_column: str = "label", patient_column: str = "patient_id") -> None:
        """Args:
            csv: the tile list.
            image_root: folder relative paths start from; default the CSV's folder.
            path_column: column holding image paths.
            label_column: column holding class names (may be empty or absent for prediction).
            patient_column: column holding patient ids.
        """
        self.csv = Path(csv)
        self.image_root = self.csv.parent if image_root is None else Path(image_root)
        self.path_column, self.label_column, self.patient_column = path_column, label_column, patient_column

    def table(self, class_names: list[str]) -> pd.DataFrame:
        df = read_table(self.csv, [self.path_column])
        if df.empty:
            raise EmptyTileSetError(f"{self.csv}: lists no tiles")
        paths = [p if p.is_absolute() else self.image_root / p for p in map(Path, df[self.path_column])]
        labels = df.get(self.label_column, pd.Series([""] * len(df)))
        patients = df.get(self.patient_column, pd.Series([p.stem for p in paths]))
        return _image_rows(paths, _label_indices(labels, class_names, self.csv), list(patients),
                           [p.parent.name for p in paths])


class H5Source(TileSource):
    """The tiler's h5 files, labelled per slide (slide CSV) or per tile (QuPath GeoJSON regions)."""

    def __init__(self, h5_dir: str | Path, slides_csv: str | Path, slide_dir: str | Path | None = None,
                 geojson_dir: str | Path | None = None, min_coverage: float = 0.5,
                 background_class: str | None = None, mpp_tolerance: float = DEFAULT_MPP_TOLERANCE) -> None:
        """Args:
            h5_dir: the tiler's ``patches/`` folder holding ``<slide_id>.h5``.
            slides_csv: CSV with ``slide_id``, ``patient_id`` and (without GeoJSON) ``label``;
                an optional ``slide_path`` column, else slides are looked up in ``slide_dir``.
            slide_dir: folder of ``<slide_id>.*`` slides, to read pixels when h5 files store none.
            geojson_dir: folder of ``<slide_id>.geojson`` region annotations; labels tiles by coverage.
            min_coverage: fraction of a tile a class must cover to label it (GeoJSON only).
            background_class: class for tiles no region covers enough; None leaves them out.
            mpp_tolerance: relative difference from the median delivered µm/px a slide's store may
                have (stores of several scanners tiled at one objective power differ); beyond it
                training stops, naming the outlying slides.
        """
        self.h5_dir, self.slides_csv = Path(h5_dir), Path(slides_csv)
        self.slide_dir = None if slide_dir is None else Path(slide_dir)
        self.geojson_dir = None if geojson_dir is None else Path(geojson_dir)
        self.min_coverage, self.background_class = min_coverage, background_class
        self.mpp_tolerance = mpp_tolerance

    def _slide_path(self, row: pd.Series) -> str:
        if row.get("slide_path"):
            return str(row["slide_path"])
        if self.slide_dir is None:
            return ""
        found = sorted(p for p in self.slide_dir.glob(f"{row['slide_id']}.*") if p.suffix != ".h5")
        return str(found[0]) if found else ""

    def _tile_labels(self, slide_id: str, reader, slide_label: int, class_names: list[str]) -> np.ndarray:
        if self.geojson_dir is None:
            return np.full(len(reader.coords), slide_label, np.int64)
        regions = read_geojson(self.geojson_dir / f"{slide_id}.geojson")
        coverage = class_coverage(regions, class_names, reader.coords, float(reader.info.patch_size_level0))
        background = None if self.background_class is None else class_names.index(self.background_class)
        return labels_from_coverage(coverage, self.min_coverage, background)

    def table(self, class_names: list[str]) -> pd.DataFrame:
        required = ["slide_id", "patient_id"] + ([] if self.geojson_dir else ["label"])
        slides = read_table(self.slides_csv, required)
        if self.background_class is not None and self.background_class not in class_names:
            raise LabelError(f"{self.slides_csv}: background_class {self.background_class!r} not in {class_names}")
        missing = [s for s in slides["slide_id"] if not (self.h5_dir / f"{s}.h5").is_file()]
        if missing:
            raise LabelError(f"{self.slides_csv}: slides {missing} have no tile file in {self.h5_dir}")
        slide_labels = _label_indices(slides.get("label", pd.Series([""] * len(slides))), class_names, self.slides_csv)
        parts, settings, delivered = [], set(), {}
        for (_, row), slide_label in zip(slides.iterrows(), slide_labels):
            h5_path, slide_path = self.h5_dir / f"{row['slide_id']}.h5", self._slide_path(row)
            reader = TileReader(h5_path, slide_path or None)
            info = reader.info
            settings.add((info.tile_size, str(info.resolution)))
            delivered[row["slide_id"]] = (info.target_mpp, info.target_power)
            labels = self._tile_labels(row["slide_id"], reader, int(slide_label), class_names)
            parts.append(pd.DataFrame({"path": str(h5_path), "tile_index": np.arange(len(labels)),
                                       "slide_path": slide_path, "label": labels, "patient_id": row["patient_id"],
                                       "slide_id": row["slide_id"]}, columns=TILE_COLUMNS))
        table = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TILE_COLUMNS)
        if table.empty:
            raise EmptyTileSetError(f"{self.slides_csv}: the listed slides hold no tiles in {self.h5_dir}")
        if len(settings) > 1:
            raise TilingMismatchError(f"{self.h5_dir}: tile files were cut at different settings {sorted(settings)}")
        (tile_size, resolution), = settings
        mpp, spread = self._common_mpp({slide: mpp for slide, (mpp, _) in delivered.items()})
        power = float(np.median([power for _, power in delivered.values()]))
        table.attrs["tiling"] = {"tile_size": tile_size, "resolution": resolution, "mpp": mpp, "mpp_spread": spread,
                                 "power": power, "where": str(self.h5_dir)}
        return table

    def _common_mpp(self, mpp_by_slide: dict[str, float]) -> tuple[float, float]:
        """(median µm/px, (max - min) / median) of the slides' delivered µm/px.

        Raises:
            TilingMismatchError: slides deliver µm/px further than ``mpp_tolerance`` from the median.
        """
        values = np.array(list(mpp_by_slide.values()))
        median = float(np.median(values))
        outliers = {s: m for s, m in mpp_by_slide.items() if abs(m / median - 1) > self.mpp_tolerance}
        if outliers:
            listed = ", ".join(f"{s} ({m:.4g})" for s, m in sorted(outliers.items()))
            raise TilingMismatchError(
                f"{self.h5_dir}: tiles of {listed} are more than {self.mpp_tolerance:.0%} from the median "
                f"{median:.4g} µm/px (slides of different scanners tiled at one objective power); tile every "
                f"slide at one physical resolution, e.g. wsi-tile --mpp {median:.2f}, or raise mpp_tolerance")
        return median, float((values.max() - values.min()) / median)
