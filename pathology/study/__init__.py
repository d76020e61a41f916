"""Resolution studies: demo slides, grid configs, cached cell runs, reports (``pathology study``/``demo``).

The light modules are re-exported here; :func:`pathology.study.run.run_study` and
:func:`pathology.study.demo.run_demo` import the training and inference stacks and live in their modules.
"""
from pathology.study.demo_data import TASKS, DemoSlide, DemoTissuePainter, make_demo_slides, read_manifest
from pathology.study.grid import Cell, Study, StudyConfigError, expand_grid, load_study
from pathology.study.report import mean_ci, pareto_front, summarise, write_report

__all__ = [
    "TASKS", "DemoSlide", "DemoTissuePainter", "make_demo_slides", "read_manifest",
    "Cell", "Study", "StudyConfigError", "expand_grid", "load_study",
    "mean_ci", "pareto_front", "summarise", "write_report",
]
