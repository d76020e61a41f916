"""The study's summary: means and 95 % confidence intervals over seeds, findings in words, plots, ``report.md``.

The interval is Student's t: ``mean ± t(0.975, n - 1) · sd / √n`` over the seeds of a grid point
(no interval from a single seed). Throughput is a cost, the same for every seed of a grid point: it
is pooled by the median, so one disturbed measurement does not move it, and a cell more than
:data:`OUTLIER_FACTOR` away from its grid point's median is flagged. A grid point is *at chance*
when its interval reaches down to chance (1 / classes for balanced accuracy, 0.5 for AUROC), or,
with one seed, when its mean is within :data:`CHANCE_MARGIN` of it. Findings per task: the winning
resolution and MHSA placement (and MLP activation, when the grid varies it, with each activation's
median throughput), by how much, and whether *beyond the seed spread* (95 % intervals apart), and
the best cell's checkpoint. The resolution axis is physical: each grid point's µm/px is
what its tile stores delivered (``tile_mpp`` of ``results.csv``), and its field of view that times
the tile size; the configured resolution (e.g. ``20x``) is shown beside it. Plots: a metric against
tile field of view, one line per MHSA placement and activation and one panel per task; and a metric
against throughput per grid point, one marker per activation, with the Pareto front (the points not
at chance that no other beats on both). Rows recorded before ``act_layer`` was a grid axis are gelu.
"""
from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from scipy import stats

from pathology.atomic import atomic_path
from pathology.models.efficientformer import DEFAULT_ACT_LAYER
from wsi_tiling.resolution import power_to_mpp

__all__ = ["GROUP_COLUMNS", "REPORT_METRICS", "mean_ci", "chance_level", "at_chance", "summarise", "markdown_table",
           "pareto_front", "plot_metric_vs_resolution", "plot_pareto", "throughput_outliers", "findings_markdown",
           "write_report"]

GROUP_COLUMNS = ["task", "resolution", "mhsa_blocks", "act_layer", "tile_size"]
REPORT_METRICS = ["tile_balanced_accuracy", "tile_auroc", "slide_accuracy", "slide_auroc", "throughput"]
CI_LEVEL = 0.95
PLOT_METRIC = "tile_balanced_accuracy"
PANEL_INCHES = (4.5, 3.6)  # width, height of one task's plot
METRIC_HEADERS = {"throughput": "throughput (tiles/s, median)"}
OUTLIER_FACTOR = 1.5  # a cell this many times slower or faster than its grid point's median is flagged
FRACTION_BOUNDS = (0.0, 1.0)
CHANCE_MARGIN = 0.05  # a single seed this close to chance is reported as at chance
ROBUST_METRICS = {"throughput"}  # pooled by the median: one disturbed measurement must not move it
ACT_MARKERS = ("o", "s", "^", "D", "v", "P", "*", "X")  # Pareto plot: one marker per activation, in grid order


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


def chance_level(rows: pd.DataFrame, metric: str) -> float:
    """Chance of ``metric`` for these rows: 0.5 for AUROC, 1 / classes for accuracies; NaN when unknown."""
    if "auroc" in metric:
        return 0.5
    classes = rows["n_classes"].dropna().unique() if "n_classes" in rows else []
    return 1.0 / float(classes[0]) if len(classes) == 1 else float("nan")


def at_chance(values: pd.Series, chance: float) -> bool:
    """Whether a grid point's per-seed ``values`` are not told apart from ``chance`` (see module doc)."""
    mean, low, _ = mean_ci(values.astype(float), bounds=FRACTION_BOUNDS)
    if not np.isfinite(chance) or not np.isfinite(mean):
        return False
    return bool(low <= chance) if np.isfinite(low) else mean <= chance + CHANCE_MARGIN


def _tile_mpp(rows: pd.DataFrame) -> pd.Series:
    """µm/px of each cell's tiles: what its stores delivered (``tile_mpp``). Cells recorded before
    that was stored fall back to the requested µm/px, or wsi_tiling's nominal µm/px of the
    requested objective power."""
    requested = pd.Series(np.where(rows["unit"] == "mpp", rows["mpp_or_power"], power_to_mpp(rows["mpp_or_power"])),
                          index=rows.index, dtype=float)
    return rows["tile_mpp"].astype(float).fillna(requested) if "tile_mpp" in rows else requested


def _finished(results: pd.DataFrame) -> pd.DataFrame:
    """The finished cells; ``act_layer`` is gelu where a row was recorded before it was a grid axis."""
    ok = results[results["status"] == "ok"]
    act = ok["act_layer"].fillna(DEFAULT_ACT_LAYER) if "act_layer" in ok else DEFAULT_ACT_LAYER
    return ok.assign(act_layer=act)


def summarise(results: pd.DataFrame, metrics: Sequence[str] = REPORT_METRICS) -> pd.DataFrame:
    """One row per grid point (seeds pooled): ``n_seeds``, ``tile_mpp`` (delivered, median over seeds)
    and ``field_um`` (a tile's edge in µm), ``at_chance`` (by :data:`PLOT_METRIC`), and
    ``<metric>``, ``<metric>_low``, ``<metric>_high`` for each metric present (intervals clipped to [0, 1]);
    throughput is the median over seeds, without an interval. Failed cells are left out."""
    ok = _finished(results)
    present = [m for m in metrics if m in ok.columns]
    rows = []
    for key, group in ok.groupby(GROUP_COLUMNS, sort=False):
        row = dict(zip(GROUP_COLUMNS, key)) | {"n_seeds": len(group)}
        row["tile_mpp"] = float(_tile_mpp(group).median())
        row["field_um"] = row["tile_mpp"] * float(row["tile_size"])
        for metric in present:  # every metric but throughput is a fraction
            values = group[metric].astype(float)
            row[metric], row[f"{metric}_low"], row[f"{metric}_high"] = \
                (float(values.median()), float("nan"), float("nan")) if metric in ROBUST_METRICS \
                else mean_ci(values, bounds=FRACTION_BOUNDS)
        if PLOT_METRIC in group:
            row["at_chance"] = at_chance(group[PLOT_METRIC], chance_level(group, PLOT_METRIC))
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(mean: float, low: float, high: float) -> str:
    if not np.isfinite(mean):
        return "–"
    if not np.isfinite(low):
        return f"{mean:.3g}"
    return f"{mean:.3g} [{low:.3g}, {high:.3g}]"


def markdown_table(summary: pd.DataFrame, metrics: Sequence[str] = REPORT_METRICS) -> str:
    """The summary as a Markdown table: the configured resolution and the delivered µm/px, then
    ``mean [95 % CI]`` per metric."""
    present = [m for m in metrics if m in summary.columns]
    header = ["task", "resolution", "µm/px", "mhsa_blocks", "act_layer", "tile_size", "field (µm)", "seeds",
              *(METRIC_HEADERS.get(m, m) for m in present)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary.to_dict("records"):
        cells = [row["task"], str(row["resolution"]), f"{row['tile_mpp']:.3g}", str(row["mhsa_blocks"]),
                 str(row["act_layer"]), str(row["tile_size"]), f"{row['field_um']:.0f}", str(row["n_seeds"])]
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
    """One panel per task: ``metric`` (mean and 95 % CI) against tile field of view at the delivered µm/px,
    a line per MHSA placement, activation and tile size; each point is labelled with its configured
    resolution and µm/px."""
    fig, panels = _task_panels(summary)
    for ax, task, rows in panels:
        for (mhsa, act, tile), line in rows.groupby(["mhsa_blocks", "act_layer", "tile_size"], sort=False):
            line = line.sort_values("field_um")
            low = (line[metric] - line[f"{metric}_low"]).fillna(0)
            high = (line[f"{metric}_high"] - line[metric]).fillna(0)
            ax.errorbar(line["field_um"], line[metric], yerr=[low, high], marker="o", capsize=3,
                        label=f"MHSA {mhsa}, {act}, {tile} px")
            for x, y, res, mpp in zip(line["field_um"], line[metric], line["resolution"], line["tile_mpp"]):
                ax.annotate(f"{res}, {mpp:.3g} µm/px", (x, y), textcoords="offset points", xytext=(4, -10),
                            fontsize=7)
        ax.set(xscale="log", title=task, xlabel="tile field of view (µm at the delivered µm/px, log)",
               ylabel=metric)
        fields = sorted(rows["field_um"].unique())
        ax.set_xticks(fields, [f"{field:g}" for field in fields])  # the fields studied, not 10^k
        ax.minorticks_off()
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_pareto(summary: pd.DataFrame, path: Path, metric: str = PLOT_METRIC) -> Path:
    """``metric`` (mean over seeds) against median throughput per grid point, one panel per task, one
    marker per activation; the Pareto front joins the points not at chance (those are drawn as grey
    crosses, off the front)."""
    fig, panels = _task_panels(summary)
    markers = dict(zip(dict.fromkeys(summary["act_layer"]), itertools.cycle(ACT_MARKERS)))
    for ax, task, rows in panels:
        chance = rows["at_chance"].astype(bool) if "at_chance" in rows else pd.Series(False, index=rows.index)
        for (res, mhsa, act), group in rows[~chance].groupby(["resolution", "mhsa_blocks", "act_layer"], sort=False):
            ax.scatter(group["throughput"], group[metric], label=f"{res}, MHSA {mhsa}, {act}", s=18,
                       marker=markers[act])
        if chance.any():
            ax.scatter(rows.loc[chance, "throughput"], rows.loc[chance, metric], marker="x", color="grey",
                       label="at chance", s=18)
        learned = rows[~chance]
        front = learned[pareto_front(learned["throughput"].to_numpy(), learned[metric].to_numpy())]
        front = front.sort_values("throughput")
        ax.plot(front["throughput"], front[metric], color="black", lw=1, label="Pareto front")
        ax.set(title=task, xlabel="throughput (tiles/s, CPU, median over seeds)", ylabel=metric)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return path


def throughput_outliers(results: pd.DataFrame) -> pd.DataFrame:
    """Finished cells whose throughput is more than :data:`OUTLIER_FACTOR` away from their grid point's
    median, with ``median_throughput``: measurements disturbed by other work on the machine."""
    ok = _finished(results)
    if ok.empty or "throughput" not in ok:
        return ok.iloc[0:0]
    ok["median_throughput"] = ok.groupby(GROUP_COLUMNS, sort=False)["throughput"].transform("median")
    ratio = ok["throughput"] / ok["median_throughput"]
    return ok[(ratio > OUTLIER_FACTOR) | (ratio < 1 / OUTLIER_FACTOR)]


def _compare(rows: pd.DataFrame, axis: str, metric: str) -> str:
    """One sentence: the best value of ``axis`` (its best grid point against the best grid point of the
    runner-up value), the difference and whether it is beyond the seed spread."""
    points = [(key, mean_ci(group[metric].astype(float), bounds=FRACTION_BOUNDS)) for key, group in
              rows.groupby(GROUP_COLUMNS, sort=False)]
    best_by_value: dict[str, tuple[float, float, float]] = {}
    for key, interval in points:
        value = dict(zip(GROUP_COLUMNS, key))[axis]
        if np.isfinite(interval[0]) and (value not in best_by_value or interval[0] > best_by_value[value][0]):
            best_by_value[value] = interval
    ranked = sorted(best_by_value.items(), key=lambda item: -item[1][0])
    if len(ranked) < 2:
        return f"only one {axis} ({ranked[0][0] if ranked else 'none'}) finished"
    (winner, (mean, low, _)), (second, (other, _, other_high)) = ranked[0], ranked[1]
    if not (np.isfinite(low) and np.isfinite(other_high)):
        spread = "one seed, so the seed spread is unknown"
    elif low > other_high:
        spread = "beyond the seed spread (95 % intervals apart)"
    else:
        spread = "within the seed spread (95 % intervals overlap)"
    return f"{axis} {winner} won: {metric} {mean:.3f} against {other:.3f} at {second} (+{mean - other:.3f}), {spread}"


def findings_markdown(results: pd.DataFrame, metric: str) -> str:
    """The "Findings" section of ``report.md``: per task the winning resolution and MHSA placement (and
    activation, with each one's median throughput, when the grid varies it), the grid points at chance,
    the best cell and its checkpoint, then disturbed throughput measurements."""
    ok = _finished(results)
    lines = ["## Findings", "", f"By `{metric}` on the test slides, per task:", ""]
    for task, rows in ok.groupby("task", sort=False):
        chance = chance_level(rows, metric)
        chance_points = [", ".join(str(v) for v in key[1:]) for key, group in rows.groupby(GROUP_COLUMNS, sort=False)
                         if at_chance(group[metric], chance)]
        chance_text = f"At chance ({chance:.2f})" if np.isfinite(chance) else "At chance (classes not recorded)"
        best = rows.loc[rows[metric].astype(float).idxmax()]
        compared = [_compare(rows, axis, metric) for axis in ("resolution", "mhsa_blocks")]
        if rows["act_layer"].nunique() > 1:
            speeds = rows.groupby("act_layer", sort=False)["throughput"].median()
            compared.append(_compare(rows, "act_layer", metric) + "; median throughput " +
                            ", ".join(f"{act} {speed:.1f}" for act, speed in speeds.items()) + " tiles/s")
        lines += [f"- **{task}**: {'; '.join(compared)}.",
                  f"  {chance_text}: {'; '.join(chance_points) or 'none'}.",
                  f"  Best cell `{best['cell']}` ({metric} {float(best[metric]):.3f}), checkpoint "
                  f"`{best.get('checkpoint', 'not recorded')}`."]
    outliers = throughput_outliers(results)
    backends = ", ".join(map(str, ok["backend"].dropna().unique())) if "backend" in ok else ""
    lines += ["", f"Throughput (tiles/s on this machine{f', through {backends}' if backends else ''}) in the "
              "table and the Pareto plot is the median over a grid point's seeds, so one disturbed measurement "
              "does not move them; grid points at chance are left off the Pareto front."]
    lines += [f"- cell `{r.cell}` measured {r.throughput:.1f} tiles/s against a median of {r.median_throughput:.1f}: "
              f"disturbed, not used" for r in outliers.itertuples()]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results: pd.DataFrame, extra: str = "") -> Path:
    """Writes ``summary.csv``, the two plots and ``report.md`` (table, findings, plots, then ``extra``)."""
    summary = summarise(results)
    with atomic_path(out_dir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)
    lines = ["# Resolution study", "",
             f"{int((results['status'] == 'ok').sum())} of {len(results)} cells finished. Values are means over "
             "seeds with Student-t 95 % confidence intervals in brackets (none for a single seed). Tile metrics "
             "are on the test slides' tiles; slide metrics aggregate them per slide. Throughput is measured on "
             "this machine's CPU and is only comparable within one run.", "", markdown_table(summary), ""]
    if not summary.empty:
        lines += [findings_markdown(results, PLOT_METRIC)]
    if not summary.empty:
        plot_metric_vs_resolution(summary, out_dir / "metric_vs_resolution.png")
        plot_pareto(summary, out_dir / "pareto.png")
        lines += ["![metric against field of view](metric_vs_resolution.png)", "",
                  "![metric against throughput](pareto.png)", ""]
    failed = results[results["status"] != "ok"]
    lines += [f"- cell `{r.cell}` failed: {r.error}" for r in failed.itertuples()]
    with atomic_path(out_dir / "report.md") as tmp:
        tmp.write_text("\n".join(lines + ["", extra]).rstrip() + "\n")
    return out_dir / "report.md"
