"""Slides are streamed: each slide's files are written before the next slide is predicted, and
tiling runs at most one slide ahead of prediction."""
from __future__ import annotations

import pandas as pd

from pathology.inference import infer
from pathology.inference.infer import infer_slides
from pathology.inference.predict import Predictor, RunOptions

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
