"""Labelled tile data for training: sources, GeoJSON labels, patient splits, transforms, DataModule."""
from pathology.data.annotations import UNLABELLED, Region, class_coverage, labels_from_coverage, read_geojson
from pathology.data.datamodule import TileDataModule
from pathology.data.dataset import TileDataset, read_image
from pathology.data.errors import (AnnotationError, CorruptTileError, EmptyTileSetError, LabelError, SplitError,
                                   TileDataError, TilingMismatchError)
from pathology.data.sources import H5Source, ImageCsvSource, ImageFolderSource, TileSource
from pathology.data.splits import TEST_FOLD, assign_splits, check_splits, load_or_make_folds, make_folds
from pathology.data.transforms import (AugmentConfig, HEDJitter, PolicyAugment, StainNormalize, collate_tiles,
                                       eval_transform, hed_jitter, resize_transform, stack_tiles,
                                       train_transform)

__all__ = [
    "UNLABELLED", "Region", "class_coverage", "labels_from_coverage", "read_geojson",
    "TileDataModule", "TileDataset", "read_image",
    "AnnotationError", "CorruptTileError", "EmptyTileSetError", "LabelError", "SplitError", "TileDataError",
    "TilingMismatchError",
    "H5Source", "ImageCsvSource", "ImageFolderSource", "TileSource",
    "TEST_FOLD", "assign_splits", "check_splits", "load_or_make_folds", "make_folds",
    "AugmentConfig", "HEDJitter", "PolicyAugment", "StainNormalize", "collate_tiles", "eval_transform",
    "hed_jitter", "resize_transform", "stack_tiles", "train_transform",
]
