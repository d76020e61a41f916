"""The study's summary: means and 95 % confidence intervals over seeds, plots, and ``report.md``.

The interval is Student's t: ``mean ± t(0.975, n - 1) · sd / √n`` over the seeds of a grid point
(no interval from a single seed). Plots: a metric against magnification, one line per MHSA
placement and one panel per task; and a metric against throughput with the Pareto front (the
cells no other cell beats on both).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats

from pathology.atomic import atomic_path
from wsi_tiling.resolution import power_to_mpp

__all__ = ["GROUP_COLUMNS", "REPORT_METRICS", "mean_ci", "summarise", "markdown_table", "pareto_front",
           "plot_metric_vs_resolution", "plot_pareto", "write_report"]

GROUP_COLUMNS = ["task", "resolution", "mhsa_blocks", "tile_size"]
REPORT_METRICS = ["tile_balanced_accuracy", "tile_auroc", "slide_accuracy", "slide_auroc", "throughput"]
UNBOUNDED_ABOVE = {"throughput"}  # every other report metric is a fraction in [0, 1]
CI_LEVEL = 0.95
PLOT_METRIC = "tile_balanced_accuracy"
PANEL_INCHES = (4.5, 3.6)  # width, height of one task's plot


def mean_ci(values: Sequence[float], level: float = CI_LEVEL, bounds: tuple[float, float] = (-np.inf, np.inf)
            ) -> tuple[float, float, float]:
    """(mean, low, high) of a Student-t interval clipped to ``bounds`` (a metric's possible range);
    NaN bounds for fewer than two finite values."""
    x = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if len(x) == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(x.mean())
    if len(x) < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x)))
    return mean, max(mean - half, bounds[0]), min(mean + half, bounds[1])


def _field_of_view_um(rows: pd.DataFrame) -> pd.Series:
    """Tile edge in µm where the resolution is in µm/px; objective power uses wsi_tiling's nominal µm/px."""
    mpp = np.where(rows["unit"] == "mpp", rows["mpp_or_power"], power_to_mpp(rows["mpp_or_power"]))
    return pd.Series(mpp * rows["tile_size"], index=rows.index)


def summarise(results: pd.DataFrame, metrics: Sequence[str] = REPORT_METRICS) -> pd.DataFrame:
    """One row per grid point (seeds pooled): ``n_seeds``, and ``<metric>``, ``<metric>_low``,
    ``<metric>_high`` for each metric present (intervals clipped to [0, 1], throughput to >= 0).
    Failed cells are left out."""
    ok = results[results["status"] == "ok"]
    present = [m for m in metrics if m in ok.columns]
    rows = []
    for key, group in ok.groupby(GROUP_COLUMNS, sort=False):
        row = dict(zip(GROUP_COLUMNS, key)) | {"n_seeds": len(group)}
        row["field_um"] = float(_field_of_view_um(group).iloc[0]) if "unit" in group else float("nan")
        for metric in present:
            bounds = (0.0, np.inf if metric in UNBOUNDED_ABOVE else 1.0)
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = mean_ci(group[metric].astype(float),
                                                                                bounds=bounds)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "–"
    if not np.isfinite(low):
        return f"{mean:.3g}"
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def markdown_table(summary: pd.DataFrame, metrics: Sequence[str] = REPORT_METRICS) -> str:
    """The summary as a Markdown table, ``mean [95 % CI]`` per metric."""
    present = [m for m in metrics if m in summary.columns]
    header = [*GROUP_COLUMNS, "field (µm)", "seeds", *present]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [str(row[c]) for c in GROUP_COLUMNS] + [f"{row['field_um']:.0f}", str(row["n_seeds"])]
        cells += [_fmt(row[m], row[f"{m}_low"], row[f"{m}_high"]) for m in present]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pareto_front(speed: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point dominates (higher is better for both arrays).

    A point is dominated when another is at least as fast and at least as good, and better in one.
    """
    speed, value = np.asarray(speed, float), np.asarray(value, float)
    ge = (speed[None, :] >= speed[:, None]) & (value[None, :] >= value[:, None])
    gt = (speed[None, :] > speed[:, None]) | (value[None, :] > value[:, None])
    return ~(ge & gt).any(axis=1)


def _task_panels(table: pd.DataFrame) -> tuple[Figure, list[tuple[Axes, str, pd.DataFrame]]]:
    """A figure with one panel per task, side by side, each with that task's rows."""
    tasks = list(dict.fromkeys(table["task"]))
    fig = Figure(figsize=(PANEL_INCHES[0] * len(tasks), PANEL_INCHES[1]))
    axes = fig.subplots(1, len(tasks), squeeze=False)[0]
    return fig, [(ax, task, table[table["task"] == task]) for ax, task in zip(axes, tasks)]


def plot_metric_vs_resolution(summary: pd.DataFrame, path: Path, metric: str = PLOT_METRIC) -> Path:
    """One panel per task: ``metric`` (mean and 95 % CI) against tile field of view, a line per MHSA placement."""
    fig, panels = _task_panels(summary)
    for ax, task, rows in panels:
        for (mhsa, tile), line in rows.groupby(["mhsa_blocks", "tile_size"], sort=False):
            line = line.sort_values("field_um")
            low = (line[metric] - line[f"{metric}_low"]).fillna(0)
            high = (line[f"{metric}_high"] - line[metric]).fillna(0)
            ax.errorbar(line["field_um"], line[metric], yerr=[low, high], marker="o", capsize=3,
                        label=f"MHSA {mhsa}, {tile} px")
            for x, y, res in zip(line["field_um"], line[metric], line["resolution"]):
                ax.annotate(str(res), (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.set(xscale="log", title=task, xlabel="tile field of view (µm, log)", ylabel=metric)
        fields = sorted(rows["field_um"].unique())
        ax.set_xticks(fields, [f"{field:g}" for field in fields])  # the fields studied, not 10^k
        ax.minorticks_off()
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(results: pd.DataFrame, path: Path, metric: str = PLOT_METRIC) -> Path:
    """``metric`` against measured throughput per cell, one panel per task, Pareto front joined."""
    fig, panels = _task_panels(results[results["status"] == "ok"])
    for ax, task, rows in panels:
        for (res, mhsa), group in rows.groupby(["resolution", "mhsa_blocks"], sort=False):
            ax.scatter(group["throughput"], group[metric], label=f"{res}, MHSA {mhsa}", s=18)
        front = rows[pareto_front(rows["throughput"].to_numpy(), rows[metric].to_numpy())].sort_values("throughput")
        ax.plot(front["throughput"], front[metric], color="black", lw=1, label="Pareto front")
        ax.set(title=task, xlabel="throughput (tiles/s, CPU)", ylabel=metric)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def write_report(out_dir: Path, results: pd.DataFrame, extra: str = "") -> Path:
    """Writes ``summary.csv``, the two plots and ``report.md`` (table, plots, then ``extra`` Markdown)."""
    summary = summarise(results)
    with atomic_path(out_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    lines = ["# Resolution study", "",
             f"{int((results['status'] == 'ok').sum())} of {len(results)} cells finished. Values are means over "
             "seeds with Student-t 95 % confidence intervals in brackets (none for a single seed). Tile metrics "
             "are on the test slides' tiles; slide metrics aggregate them per slide. Throughput is measured on "
             "this machine's CPU and is only comparable within one run.", "", markdown_table(summary), ""]
    if not summary.empty:
        plot_metric_vs_resolution(summary, out_dir / "metric_vs_resolution.png")
        plot_pareto(results, out_dir / "pareto.png")
        lines += ["![metric against field of view](metric_vs_resolution.png)", "",
                  "![metric against throughput](pareto.png)", ""]
    failed = results[results["status"] != "ok"]
    lines += [f"- cell `{r.cell}` failed: {r.error}" for r in failed.itertuples()]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines + ["", extra]).rstrip() + "\n")
    return out_dir / "report.md"
