"""``pathology demo`` end to end with a one-point grid: slides, study, best-cell inference, report."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pandas as pd
import torch

from pathology.models.runtime import choose_backend, runner_label
from pathology.study import demo
from pathology.study.demo import DEMO_CONFIG, SLIDES_PER_GROUP, main
from pathology.study.demo_data import make_demo_slides

TINY_DEMO = """
grid: {resolution: [5x], mhsa_blocks: ["32:1"], tile_size: [64], seed: [0]}
train: {configs: ["{train}", tiny_train.yaml]}
"""


class _Records(logging.Handler):
    """Collects the records that reach a logger whatever its handlers and propagation."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_demo_writes_report_predictions_heatmaps_and_geojson(tmp_path: Path, capfd, recwarn) -> None:
    (tmp_path / "tiny_train.yaml").write_text("trainer: {max_epochs: 1, limit_train_batches: 2}\n")
    override = tmp_path / "tiny_demo.yaml"
    override.write_text(TINY_DEMO.replace("{train}", str(DEMO_CONFIG.parent / "study_train_demo.yaml")))
    out = tmp_path / "demo"
    # Slides of 256 µm instead of the demo's 1024 (a sixteenth of the pixels to paint); the demo reuses them.
    manifest = make_demo_slides(out / "data", per_group=SLIDES_PER_GROUP, size_um=(256.0, 256.0), nest_um=30.0)
    written = manifest.stat().st_mtime_ns
    lightning_logs = _Records()
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).addHandler(lightning_logs)
    try:
        assert main(["--out", str(out), "--config", str(DEMO_CONFIG), "--config", str(override)]) == 0
    finally:
        for name in ("lightning.pytorch", "lightning.fabric"):
            logging.getLogger(name).removeHandler(lightning_logs)
    printed = capfd.readouterr()
    assert printed.out.strip().endswith(f"report: {out / 'report.md'}")
    # Each cell's Lightning runs stay quiet: no prediction bars, accelerator and seed lines, warnings.
    assert "Predicting" not in printed.err and not re.search(r"(^|[\r\n])slides:", printed.err)  # inference's bar
    assert not lightning_logs.messages
    assert not [str(w.message) for w in recwarn if "LeafSpec" in str(w.message)]
    results = pd.read_csv(out / "results.csv")
    assert results["task"].tolist() == ["chromatin", "architecture"]  # one grid point per task
    assert manifest.stat().st_mtime_ns == written
    report = (out / "report.md").read_text()
    for task, positive in (("chromatin", "coarse"), ("architecture", "cords")):
        predicted = pd.read_csv(out / "inference" / task / "slides.csv")
        assert len(predicted) == 4  # the test slides
        for slide_id in predicted["slide_id"]:
            heatmap = f"inference/{task}/heatmaps/{slide_id}_{positive}.png"
            assert (out / heatmap).stat().st_size > 0 and heatmap in report
            assert (out / "inference" / task / "geojson" / f"{slide_id}.geojson").stat().st_size > 0
    assert "![metric against field of view](metric_vs_resolution.png)" in report
    # both tasks trained the same model (efficientformer_tiny, 32:1, gelu, 64 px): one latency table, a row per
    # block: the stem, pooling blocks (1, 1, 2, 1) per stage, a downsample before stages 1-3, the MHSA block at
    # /32, the head; then the activations (gelu in the MLPs, the stem's relu) and the whole model
    assert report.count("### efficientformer_tiny, MHSA 32:1, gelu, 64 px") == 1
    table = report.split("### efficientformer_tiny, MHSA 32:1, gelu, 64 px\n\n```\n")[1].split("```")[0]
    rows = [line.split() for line in table.splitlines()[1:]]
    assert [row[:2] for row in rows[:11]] == [
        ["stem", "stem"], ["stages.0.blocks.0", "pool"], ["stages.1.downsample", "downsample"],
        ["stages.1.blocks.0", "pool"], ["stages.2.downsample", "downsample"], ["stages.2.blocks.0", "pool"],
        ["stages.2.blocks.1", "pool"], ["stages.3.downsample", "downsample"], ["stages.3.blocks.0", "pool"],
        ["stages.3.blocks.1", "mhsa"], ["head", "head"]]
    assert [row[:2] for row in rows[11:14]] == [["activation", "gelu"], ["activation", "relu"], ["whole", "model"]]
    [backend_row] = rows[14:]
    assert " ".join(backend_row).startswith(f"backend {runner_label(*choose_backend('auto', torch.device('cpu')))}:")


def test_demo_config_comes_from_the_checkout_else_the_installed_copy(tmp_path: Path, monkeypatch) -> None:
    installed = tmp_path / "share" / "pathology" / "configs"
    installed.mkdir(parents=True)
    for name in ("study_demo.yaml", "only_installed.yaml"):
        (installed / name).write_text("tasks: {}\n")
    monkeypatch.setattr(demo.sysconfig, "get_path", lambda kind: str(tmp_path) if kind == "data" else None)
    assert demo._demo_config() == DEMO_CONFIG.parent / "study_demo.yaml" != installed / "study_demo.yaml"
    assert demo._demo_config("only_installed.yaml") == installed / "only_installed.yaml"  # no checkout copy
