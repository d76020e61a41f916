"""Slides are streamed: each slide's files are written before the next slide is predicted, and
tiling runs at most one slide ahead of prediction; the tiles are those training saw (stain normalisation)."""
from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pathology.checkpoint import load_checkpoint
from pathology.data import resize_transform, stack_tiles
from pathology.inference import infer
from pathology.inference.infer import infer_slides
from pathology.inference.predict import Predictor, RunOptions
from pathology.inference.results import STATUS_OK
from pathology.inference.stream import (
    BATCH_BUFFERS,
    QUEUE_BATCHES,
    SlideStream,
    TiledSlide,
    slide_dataset,
    tile_for_model,
)
from pathology.stain import StainNormalizer, fit_stain_reference
from tests.pathology.inference.conftest import BOX_PX, PINK, SLIDE_MPP, tissue_image
from wsi_tiling.inputs import SlideJob
from wsi_tiling.synthetic import write_slide

# One batch per slide: the tissue box is 25 tiles (see conftest).
ONE_BATCH = RunOptions(batch_size=32, num_workers=0, accelerator="cpu", progress_bar=False)
WITH_TISSUE = ["blue_1", "blue_2", "mixed", "pink_1", "pink_2"]  # slide-id order; "blank" comes first


def test_each_slide_is_written_before_the_next_is_predicted(two_class_set, tmp_path, monkeypatch) -> None:
    out = tmp_path / "out"
    seen: list[tuple[int, int, int]] = []  # per forward pass: prediction files, records, slides tiled so far
    tiled: list[str] = []
    predict, tile = Predictor.predict, infer.tile_for_model

    def counting_predict(self, images):
        seen.append((len(list((out / "predictions").glob("*.h5"))), len(list((out / "records").glob("*.json"))),
                     len(tiled)))
        return predict(self, images)

    def counting_tile(job, **kwargs):
        tiled.append(job.slide_id)
        return tile(job, **kwargs)

    monkeypatch.setattr(Predictor, "predict", counting_predict)
    monkeypatch.setattr(infer, "tile_for_model", counting_tile)
    table = infer_slides(two_class_set.checkpoint, [two_class_set.slides], out, aggregations=["mean"], run=ONE_BATCH)
    assert table["status"].tolist() == ["no-tissue"] + ["ok"] * 5
    # slide k (k = 0..4 among those with tissue) is predicted after the k before it wrote their
    # h5 and, before that, "blank" and they wrote their records
    assert [s[0] for s in seen] == [0, 1, 2, 3, 4]
    assert [s[1] for s in seen] == [1, 2, 3, 4, 5]
    # slide k is the (k + 2)-th of the run (after "blank"): at most one more has been tiled
    assert all(n_tiled <= k + 3 for k, (_, _, n_tiled) in enumerate(seen))
    assert tiled == ["blank", *WITH_TISSUE]
    assert pd.read_csv(out / "slides.csv")["slide_id"].tolist() == ["blank", *WITH_TISSUE]


class _CountingStack:
    """:func:`stack_tiles` counting the batches written, so a test can wait until the producer is as
    far ahead as it goes."""

    def __init__(self) -> None:
        self.written, self.changed = 0, threading.Condition()

    def __call__(self, tiles, out=None):
        batch = stack_tiles(tiles, out)
        with self.changed:
            self.written += 1
            self.changed.notify_all()
        return batch


@pytest.mark.parametrize("spare_buffers", [2, 1])
def test_a_batch_is_intact_until_the_next_is_taken(spare_buffers: int, monkeypatch) -> None:
    """The producer writes batches into a few reused tensors; once it has written as far ahead as the
    queue lets it, the batch the consumer holds is still the one it was given. With one buffer fewer
    than the stream uses, the held batch is overwritten: the test can fail."""
    monkeypatch.setattr("pathology.inference.stream.BATCH_BUFFERS", QUEUE_BATCHES + spare_buffers)
    rng = np.random.default_rng(0)
    tiles = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(40)]
    stack, n_batches = _CountingStack(), len(tiles) // 2
    monkeypatch.setattr("pathology.inference.predict.stack_tiles", stack)
    job = SlideJob(Path("slide.svs"), "slide")
    intact = []
    with SlideStream([job], lambda j: TiledSlide(j, STATUS_OK, n_tiles=len(tiles)), lambda _: [(t, -1) for t in tiles],
                     batch_size=2, num_workers=0) as stream:
        for _, images in stream:
            for i, batch in enumerate(images):
                given = batch.clone()  # with too few buffers the producer may overwrite it even before this
                with stack.changed:  # the queue full behind this batch and one more written
                    assert stack.changed.wait_for(
                        lambda: stack.written >= min(i + QUEUE_BATCHES + 2, n_batches), timeout=30)
                expected = stack_tiles(tiles[2 * i:2 * i + 2])
                intact.append(torch.equal(given, expected) and torch.equal(batch, expected))
    assert len(intact) == n_batches
    assert all(intact) == (spare_buffers == 2)


def test_slides_of_one_batch_reuse_the_same_tensors_and_a_held_batch_stays_intact(monkeypatch) -> None:
    """The ring of batch tensors is the cohort's, not the slide's: slide after slide is written into
    the same :data:`BATCH_BUFFERS` tensors (no fresh pages per slide), and the next slide's batch,
    written while the consumer still holds this one, goes into another tensor (a ring restarted
    per slide would write it over the held one)."""
    rng = np.random.default_rng(0)
    n_slides = 2 * BATCH_BUFFERS
    tiles = {f"s{i}": [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(2)] for i in range(n_slides)}
    stack = _CountingStack()
    monkeypatch.setattr("pathology.inference.predict.stack_tiles", stack)
    jobs = [SlideJob(Path(f"{slide_id}.svs"), slide_id) for slide_id in tiles]
    intact, tensors = [], set()
    with SlideStream(jobs, lambda j: TiledSlide(j, STATUS_OK, n_tiles=2),
                     lambda slide: [(t, -1) for t in tiles[slide.job.slide_id]], batch_size=2, num_workers=0) as stream:
        for i, (slide, images) in enumerate(stream):
            batch = next(images)
            with stack.changed:  # the next slide's batch written while this one is held
                assert stack.changed.wait_for(lambda: stack.written >= min(i + 2, n_slides), timeout=30)
            intact.append(torch.equal(batch, stack_tiles(tiles[slide.job.slide_id])))
            tensors.add(batch.data_ptr())
    assert len(intact) == n_slides and all(intact)
    assert len(tensors) == BATCH_BUFFERS


def test_a_slides_tiles_are_stain_normalised_as_the_spec_says(two_class_set, tmp_path) -> None:
    """With a stain reference in the spec, each tile is re-rendered with it before the resize, as in training."""
    _, spec = load_checkpoint(two_class_set.checkpoint)
    lo, hi = BOX_PX
    image = tissue_image(PINK)
    amounts = np.random.default_rng(0).uniform(0.3, 1.5, (hi - lo, hi - lo, 2))
    image[lo:hi, lo:hi] = np.rint(240 * np.exp(-amounts @ np.array([[0.65, 0.70, 0.29], [0.25, 0.85, 0.45]])))
    path = write_slide(tmp_path / "stained.svs", image, mpp=SLIDE_MPP, objective_power=20, downsamples=(1, 4),
                       compression="zlib")
    slide = tile_for_model(SlideJob(path, "stained"), spec, tmp_path / "tiles", min_tissue=0.5)
    plain = slide_dataset(slide, spec)
    reference = fit_stain_reference([plain.tile(i) for i in range(len(plain))])
    stained = slide_dataset(slide, replace(spec, stain_reference=reference))
    normalize, resize = StainNormalizer(reference), resize_transform(spec.img_size)
    assert slide.n_tiles == len(stained) > 0
    for i in range(len(plain)):
        expected = resize(image=normalize(plain.tile(i)))["image"]
        assert np.array_equal(stained[i][0], expected)
        assert not np.array_equal(expected, plain[i][0])
