"""``pathology demo --out DIR``: the whole pipeline on generated slides, in minutes on a laptop CPU.

Generates the two-task demo slides (:mod:`pathology.study.demo_data`), runs the resolution study of
``configs/study_demo.yaml`` on them (tiling, training, evaluation, timing), predicts the test slides
with each task's best cell, with heatmaps and QuPath GeoJSON, times every block of each model
configuration it trained, and writes ``DIR/report.md``::

    DIR/data/slides/*.svs  DIR/data/slides.csv     generated slides and their labels
    DIR/results.csv  DIR/summary.csv  DIR/*.png     the study (see ``pathology study``)
    DIR/inference/<task>/slides.csv                 slide predictions of the task's best cell
    DIR/inference/<task>/heatmaps/  geojson/        heatmap PNGs and QuPath GeoJSON
    DIR/report.md                                   table, plots, per-block latency, heatmaps and what they show

Rerunning with the same ``--out`` reuses the slides and every finished cell.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import pandas as pd
from jsonargparse import ArgumentError

from pathology.checkpoint import load_inference_model
from pathology.inference.infer import infer_slides
from pathology.inference.outputs import Extras
from pathology.inference.predict import RunOptions
from pathology.models.latency import format_table, measure_latency
from pathology.study.demo_data import TASKS, make_demo_slides
from pathology.study.grid import Study, StudyConfigError, load_study
from pathology.study.report import write_report
from pathology.study.run import (STATUS_OK, StudyError, add_threads_option, prepare_console, read_slides, run_study,
                                 write_test_slides)

__all__ = ["DEMO_CONFIG", "best_cells", "latency_markdown", "run_demo", "main"]


def _demo_config(name: str = "study_demo.yaml") -> Path:
    """The checkout's ``configs/<name>``, else the copy a wheel install puts in
    ``<prefix>/share/pathology/configs`` (pyproject's data-files)."""
    checkout = Path(__file__).resolve().parents[2] / "configs" / name
    installed = Path(sysconfig.get_path("data")) / "share" / "pathology" / "configs" / name
    return installed if installed.is_file() and not checkout.is_file() else checkout


DEMO_CONFIG = _demo_config()
SLIDE_UM = (1024.0, 1024.0)  # at 5x an 8 x 8 grid of 64 px tiles, about 44 on tissue per slide
NEST_UM = 30.0  # nests 60 µm across: a 128 µm tile (64 px at 5x) holds about two, a 32 µm one (20x) part of one
SLIDES_PER_GROUP = (3, 1, 1)  # train, val, test slides per (chromatin, architecture) pair
SELECT_METRIC = "tile_balanced_accuracy"
LATENCY_REPEATS = 5  # timed batch-1 calls per figure (medians kept): the demo's models are tiny
MODEL_COLUMNS = ["mhsa_blocks", "act_layer", "tile_size"]  # what makes two cells the same model (up to weights)
LATENCY_INTRO = """## Where each model spends its time

Per block of each model configuration the study trained, at batch 1 and the model's input size on
this machine: parameters, MACs, and the median time of the eager and of the fused torch model
with its share of the whole call; then the time inside each activation, and the whole call through
the backend inference used. `pathology model-info NAME --latency` prints the same table for any
model and input size.
"""

FINDINGS = """## What the demo shows

Each slide carries two labels drawn independently. *Chromatin* is a 1 µm checkerboard grain inside
the nuclei around the same mean colour: at 20x (0.5 µm/px) it is two pixels per grain cell and
plainly visible; at 5x (2 µm/px) each pixel averages whole grain cells into the mean colour, so
only nuclear borders keep a trace. *Architecture* puts half of the tissue into epithelium, as round
nests 60 µm across or as 30 µm wide cords, with equal area and boundary length per area: a 32 µm
tile at 20x sees part of one nest or cord (epithelium, stroma or a gently curved boundary), a
128 µm tile at 5x sees discs versus stripes. A tile classifier should therefore reach high
accuracy for chromatin only at 20x and for architecture only at 5x, near 0.5 (chance) elsewhere;
the findings above say whether it did, and the first plot shows it. The model is the small `efficientformer_tiny`
trained from scratch for 300 steps. With 64 px tiles the /32 stage holds 2 x 2 tokens and the /16
stage 4 x 4, so the two MHSA placements differ; on tasks this easy expect both to reach similar
accuracy, within the spread between seeds, so placement shows in the cost (parameters, MACs,
throughput in the Pareto plot, the MHSA rows of the latency tables) rather than in what is
learned. On real tiles of 224 px or more it can change what the model relates across the tile.
"""


def best_cells(results: pd.DataFrame, metric: str = SELECT_METRIC) -> dict[str, pd.Series]:
    """Each task's finished cell with the highest ``metric`` (the first on ties)."""
    ok = results[results["status"] == STATUS_OK]
    return {task: rows.loc[rows[metric].astype(float).idxmax()] for task, rows in ok.groupby("task", sort=False)}


def latency_markdown(results: pd.DataFrame, repeats: int = LATENCY_REPEATS) -> list[str]:
    """Report lines: the per-block latency table (:func:`~pathology.models.latency.measure_latency`) of
    each model configuration of the finished cells (MHSA placement × activation × input size), timed
    on the checkpoint of its first cell, whose folder holds the graph inference exported."""
    ok = results[results["status"] == STATUS_OK]
    lines = [LATENCY_INTRO]
    for (mhsa, act, _), rows in ok.groupby(MODEL_COLUMNS, sort=False):
        checkpoint = Path(rows["checkpoint"].iloc[0])
        model, spec = load_inference_model(checkpoint)
        report = measure_latency(model, (spec.img_size, spec.img_size), repeats=repeats, cache_dir=checkpoint.parent)
        lines += [f"### {spec.model_name}, MHSA {mhsa}, {act}, {spec.img_size} px", "", "```", format_table(report),
                  "```", ""]
    return lines


def _infer_best(study: Study, results: pd.DataFrame, out_dir: Path) -> list[str]:
    """Predicts the test slides with each task's best cell (heatmaps, GeoJSON); returns report lines."""
    slides = read_slides(study.slides_csv, list(study.tasks))
    test = slides[slides["split"] == "test"]
    lines = ["## Heatmaps of each task's best cell", ""]
    for task, cell in best_cells(results).items():
        run_dir = out_dir / "inference" / task
        table = infer_slides(cell["checkpoint"], [write_test_slides(test, run_dir)], run_dir,
                             aggregations=study.aggregations, tiles_dir=out_dir / "tiles", calibration=None,
                             run=RunOptions(batch_size=study.infer_batch_size, num_workers=0, progress_bar=False),
                             extras=Extras(heatmaps=True, geojson=True))
        positive = study.tasks[task][1]
        lines += [f"### {task}: cell `{cell['cell']}`", "",
                  f"Predictions: `inference/{task}/slides.csv`; QuPath objects: `inference/{task}/geojson/`.", ""]
        for row in table.merge(test[["slide_id", task]], on="slide_id").itertuples():
            heatmap = Path("inference") / task / "heatmaps" / f"{row.slide_id}_{positive}.png"
            lines += [f"- `{row.slide_id}`: true {getattr(row, task)}, predicted {row.predicted_label}", "",
                      f"  ![{row.slide_id}]({heatmap.as_posix()})", ""]
    return lines


def run_demo(out_dir: str | Path, config: list[Path] | None = None) -> Path:
    """Generates the slides (unless present), runs the study and the best cells' inference.

    Returns:
        The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    manifest = out_dir / "data" / "slides.csv"
    if not manifest.is_file():
        make_demo_slides(out_dir / "data", per_group=SLIDES_PER_GROUP, size_um=SLIDE_UM, nest_um=NEST_UM)
    study = load_study(config or [DEMO_CONFIG], manifest)
    results = run_study(study, out_dir)
    extra = [FINDINGS]
    if (results["status"] == STATUS_OK).any():
        extra += latency_markdown(results) + _infer_best(study, results, out_dir)
    return write_report(out_dir, results, "\n".join(extra))


def main(argv: list[str]) -> int:
    """Entry point of ``pathology demo``; ends by printing where the report is."""
    parser = argparse.ArgumentParser(prog="pathology demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output folder (reused when run again)")
    parser.add_argument("--config", action="append", type=Path,
                        help=f"study config(s) instead of {DEMO_CONFIG.name}; later files override earlier ones")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    prepare_console(args.threads)
    try:
        report = run_demo(args.out, args.config)
    except (StudyConfigError, StudyError, ArgumentError) as err:
        print(f"pathology demo: {err}", file=sys.stderr)
        return 2
    results = pd.read_csv(args.out / "results.csv")
    failed = int((results["status"] != STATUS_OK).sum())
    print(f"tasks: {', '.join(TASKS)}; {len(results) - failed}/{len(results)} study cells ok")
    print(f"report: {report}")
    return 1 if failed else 0
