"""Figures the notebooks show. Each function takes plain data and returns a matplotlib Figure;
saving goes through kvlib.report.tables so every PNG is written the same way."""
from __future__ import annotations

import textwrap
from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: papermill kernels have no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402


def token_length_histograms(lengths: Mapping[str, Sequence[int]], budget: Mapping[str, int] | None = None):
    """One panel per dataset: histogram of prompt token counts, with the prompt budget as a line."""
    names = list(lengths)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        ax.hist(lengths[name], bins=20, color="#4C72B0")
        if budget and name in budget:
            ax.axvline(budget[name], color="#C44E52", linestyle="--", label="budget")
            ax.legend(loc="upper left", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("prompt tokens")
    axes[0][0].set_ylabel("samples")
    fig.tight_layout()
    return fig


def gold_position_histograms(positions: Mapping[str, Sequence[int]], num_dicts: Mapping[str, int]):
    """One panel per dataset: how often the gold dictionary sits at each position (1-based)."""
    names = list(positions)
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names), 2.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        n = num_dicts[name]
        ax.hist(positions[name], bins=range(1, n + 2), color="#55A868", align="left")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("gold dictionary position")
        ax.set_xlim(0.5, n + 0.5)
    axes[0][0].set_ylabel("samples")
    fig.tight_layout()
    return fig


def loss_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]]):
    """Training loss (answer tokens only) against epoch, one line per run."""
    fig, ax = plt.subplots(figsize=(6, 3.4))
    for name, (epochs, losses) in curves.items():
        ax.plot(epochs, losses, label=name, linewidth=1)
    ax.set_xlabel("epoch")
    ax.set_ylabel("train loss (answer tokens)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def before_after_bars(table, metric: str = "exact"):
    """Held-out accuracy per run, original vs finetuned, with CI whiskers (`table`: a DataFrame with
    columns run, model, <metric>, <metric>_ci_low, <metric>_ci_high)."""
    runs = list(dict.fromkeys(table["run"]))
    models = list(dict.fromkeys(table["model"]))
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(runs)), 3.2))
    for j, model in enumerate(models):
        sub = table[table["model"] == model].set_index("run").reindex(runs)
        xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(runs))]
        err = [sub[metric] - sub[f"{metric}_ci_low"], sub[f"{metric}_ci_high"] - sub[metric]]
        ax.bar(xs, sub[metric], width, yerr=err, capsize=3, label=model)
    ax.set_xticks(range(len(runs)), runs, rotation=15, fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"held-out {metric} accuracy")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def accuracy_curves(table, panel: str, x: str, series: str, metric: str, xlabel: str, ylabel: str = "accuracy",
                    title_prefix: str = "", deltas=None, delta_metric: str = "delta_correct",
                    delta_label: str = "minus the original (points)"):
    """One panel per value of `panel`: `metric` against `x`, one line per value of `series`, with the 95% CI
    (`<metric>_ci_low`/`_ci_high` columns, as kvlib.engine.evaluate.summarize writes them) as a shaded band.
    `deltas` (a DataFrame with `panel`, `x`, `series`, `delta_metric`, ci_low, ci_high as fractions, e.g.
    kvlib.tasks.mdqa.position_curves): a second row of panels with each series' difference from the original at
    every `x` with its 95% CI, in points, in the same colours."""
    panels = list(dict.fromkeys(table[panel]))
    with_deltas = deltas is not None and len(deltas) > 0 and delta_metric in deltas
    rows = 2 if with_deltas else 1
    fig, axes = plt.subplots(rows, len(panels), figsize=(4.6 * len(panels), 3.4 if rows == 1 else 6.2),
                             squeeze=False, sharey="row", sharex="col",
                             gridspec_kw={"height_ratios": [3, 2]} if with_deltas else None)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    names = list(dict.fromkeys(table[series]))
    if with_deltas:
        names += [n for n in dict.fromkeys(deltas[series]) if n not in names]
    colors = {name: palette[i % len(palette)] for i, name in enumerate(names)}
    for ax, name in zip(axes[0], panels):
        sub = table[table[panel] == name]
        for label in dict.fromkeys(sub[series]):
            line = sub[sub[series] == label].sort_values(x)
            ax.plot(line[x], line[metric], marker="o", label=str(label), color=colors[label])
            ax.fill_between(line[x], line[f"{metric}_ci_low"], line[f"{metric}_ci_high"], alpha=0.15,
                            color=colors[label])
        ax.set_title(f"{title_prefix}{name}", fontsize=9)
        if not with_deltas:
            ax.set_xlabel(xlabel)
        ax.set_xticks(sorted(set(sub[x])))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    if with_deltas:
        for ax, name in zip(axes[1], panels):
            sub = deltas[deltas[panel] == name]
            labels = list(dict.fromkeys(sub[series]))
            ticks = sorted(set(table[table[panel] == name][x]))
            step = 0.03 * (max(ticks) - min(ticks) if len(ticks) > 1 else 1)  # side by side, not on top
            for j, label in enumerate(labels):
                line = sub[sub[series] == label].sort_values(x)
                line = line[line[delta_metric].notna()]
                shift = (j - (len(labels) - 1) / 2) * step
                delta = 100 * line[delta_metric].astype(float)
                err = [(delta - 100 * line["ci_low"].astype(float)).clip(lower=0),
                       (100 * line["ci_high"].astype(float) - delta).clip(lower=0)]
                ax.errorbar(line[x].astype(float) + shift, delta, yerr=err, marker="o", markersize=4, capsize=3,
                            linewidth=1, color=colors[label], label=str(label))
            ax.axhline(0, color="black", linewidth=0.8)
            ax.set_xlabel(xlabel)
            ax.set_xticks(ticks)
            ax.grid(alpha=0.3)
        axes[1][0].set_ylabel(delta_label)
    fig.tight_layout()
    return fig


def delta_bars(table, group: str = "task", series: str = "model", ylabel: str = "difference vs baseline (points)",
               margin: float | None = None, published=None, note: str | None = None):
    """Paired differences as bars in percentage points, one group of bars per value of `group`, one bar per
    value of `series`, with 95% CI whiskers and a line at zero (`table`: a DataFrame with columns `group`,
    `series`, delta, ci_low, ci_high as fractions, as kvlib.tasks.general.benchmark_deltas writes them).
    `margin` (a fraction, kvlib.report.paper.equivalence_margin): a grey band of +-margin, the change "loses
    nothing" must rule out. `published` (a DataFrame with `group`, source, delta_points; e.g.
    kvlib.report.general_tables.figure_deltas): the paper's own differences as hatched bars beside ours. `note`: a
    line under the plot (e.g. which metrics are left out)."""
    groups = list(dict.fromkeys(table[group]))
    names = list(dict.fromkeys(table[series]))
    sources = [] if published is None or not len(published) else list(dict.fromkeys(published["source"]))
    bars = len(names) + len(sources)
    width = 0.8 / max(1, bars)
    fig, ax = plt.subplots(figsize=(min(12.0, max(7.5, 0.4 * bars * len(groups) + 3.5)), 3.8))
    if margin:
        ax.axhspan(-100 * margin, 100 * margin, color="#E3E3E3", zorder=0,
                   label=f"equivalence margin (+-{100 * margin:.2f} points)")
    offset = [(j - (bars - 1) / 2) * width for j in range(bars)]
    for j, name in enumerate(names):
        sub = table[table[series] == name].set_index(group).reindex(groups)
        xs = [i + offset[j] for i in range(len(groups))]
        delta = 100 * sub["delta"]
        err = [(delta - 100 * sub["ci_low"]).clip(lower=0), (100 * sub["ci_high"] - delta).clip(lower=0)]
        ax.bar(xs, delta, width, yerr=err, capsize=3, label=str(name), zorder=2)
    greys = ["#FFFFFF", "#D0D0D0", "#A0A0A0", "#707070"]
    for k, source in enumerate(sources):
        sub = published[published["source"] == source].set_index(group).reindex(groups)
        xs = [i + offset[len(names) + k] for i in range(len(groups))]
        ax.bar(xs, sub["delta_points"], width, color=greys[k % len(greys)], edgecolor="black", hatch="///",
               linewidth=0.6, label=str(source), zorder=2)
    ax.axhline(0, color="black", linewidth=0.8, zorder=3)
    ax.set_xticks(range(len(groups)), [str(g).replace(" (", "\n(") for g in groups], fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    if note:
        ax.text(0, -0.22, note, transform=ax.transAxes, fontsize=7, va="top", wrap=True, color="#444444")
    fig.tight_layout()
    return fig


def heatmaps(table, panel: str, rows: str, cols: str, value: str, row_label: str, col_label: str):
    """One heatmap per value of `panel` (e.g. model): `value` (0-1) by `rows` x `cols`, numbers printed."""

    panels = list(dict.fromkeys(table[panel]))
    row_values, col_values = sorted(set(table[rows])), sorted(set(table[cols]))
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.2), squeeze=False)
    for ax, name in zip(axes[0], panels):
        sub = table[table[panel] == name].set_index([rows, cols])[value]
        grid = np.array([[sub.get((r, c), np.nan) for c in col_values] for r in row_values], dtype=float)
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto", origin="lower")
        for i in range(len(row_values)):
            for j in range(len(col_values)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if grid[i, j] < 0.6 else "black")
        ax.set_xticks(range(len(col_values)), [str(c) for c in col_values], fontsize=7)
        ax.set_yticks(range(len(row_values)), [str(r) for r in row_values], fontsize=7)
        ax.set_xlabel(col_label)
        ax.set_title(str(name), fontsize=9)
    axes[0][0].set_ylabel(row_label)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    return fig


def token_losses(rows, pairs: Sequence[tuple[str, str]]):
    """Paper Fig. 4. Left: per-token loss over the answer of the first sample, with vs without the template
    (original and finetuned); right: mean loss per token kind (format / key / value) for every run and model.
    `rows`: a DataFrame of kvlib.engine.train.answer_token_losses rows with a "run" column."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 3.6), gridspec_kw={"width_ratios": [3, 2]})
    styles = {"original": "-", "finetuned": "--"}
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = {run: palette[i % len(palette)] for i, run in enumerate(dict.fromkeys(rows["run"]))}  # one per run
    if pairs:
        with_t, without = pairs[0]
        for run in (with_t, without):
            color = colors[run]
            sub = rows[rows["run"] == run]
            first = sub["id"].iloc[0]
            for model, style in styles.items():
                one = sub[(sub["id"] == first) & (sub["model"] == model)]
                if len(one):
                    left.plot(one["index"], one["loss"], style, color=color, marker=".", label=f"{run} ({model})")
                    tokens = list(one["token"])
        left.set_xticks(range(len(tokens)))
        left.set_xticklabels([t.replace("\n", "\\n") for t in tokens], rotation=70, fontsize=7)
        left.set_ylabel("loss (nats)")
        left.set_title("answer of the first held-out sample", fontsize=9)
        left.legend(fontsize=7)
    means = rows.groupby(["run", "model", "kind"], sort=False)["loss"].mean().unstack("kind")
    kinds = [k for k in ("format", "key", "value") if k in means.columns]
    width = 0.8 / max(len(means), 1)
    for i, ((run, model), row) in enumerate(means.iterrows()):
        right.bar([k + i * width for k in range(len(kinds))], [row[k] for k in kinds], width, color=colors[run],
                  label=f"{run} ({model})", hatch="//" if model == "finetuned" else None, edgecolor="white")
    right.set_xticks([k + 0.4 - width / 2 for k in range(len(kinds))])
    right.set_xticklabels(kinds)
    right.set_ylabel("mean loss per token (nats)")
    right.set_title("by token kind", fontsize=9)
    right.legend(fontsize=6)
    fig.tight_layout()
    return fig


# Verdict categories (kvlib.report.paper.verdict_category) and their colours in every figure that shows verdicts.
VERDICT_COLORS = {"holds": "#2E7D32", "does not hold": "#C62828", "inconclusive": "#EF8F00",
                  "untestable at this model's level": "#9E9E9E", "untestable (both score 0)": "#9E9E9E",
                  "not measured": "#BDBDBD"}
PUBLISHED_MARKERS = ("D", "s", "^", "v")
UNIT_LABELS = {"points": "difference from the original (percentage points)",
               "nats": "difference (nats per token)"}


def claims_forest(rows: Sequence[Mapping], title: str = ""):
    """The claims figure: one row per claim (kvlib.report.paper.forest_rows), grouped under its artifact's
    heading, with our difference and its 95% interval coloured by verdict, the paper's published differences as
    open markers, and the equivalence margin as a grey band behind "loses nothing" / "does not improve" claims.
    Pre-registered primary claims are labelled in bold with the half-width they reached. One panel per unit
    (points; Fig. 4's token losses in nats), each on its own axis."""
    units = list(dict.fromkeys(r["unit"] for r in rows))
    layout = {}  # unit -> [(kind, row or heading)]
    for unit in units:
        lines, last = [], None
        for r in (r for r in rows if r["unit"] == unit):
            if r["heading"] != last:
                lines.append(("heading", r["heading"]))
                last = r["heading"]
            lines.append(("claim", r))
        layout[unit] = lines
    heights = [len(lines) for lines in layout.values()]
    fig, axes = plt.subplots(len(units), 1, figsize=(11, 0.24 * sum(heights) + 1.3 * len(units) + 1.0),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    published_models = list(dict.fromkeys(m for r in rows for m in r["published"]))
    markers = {m: PUBLISHED_MARKERS[i % len(PUBLISHED_MARKERS)] for i, m in enumerate(published_models)}
    categories = list(dict.fromkeys(r["category"] for r in rows))
    any_band = any(r["margin"] for r in rows)
    for ax, unit in zip(axes[:, 0], units):
        lines = layout[unit]
        n = len(lines)
        labels = []
        for i, (kind, item) in enumerate(lines):
            y = n - 1 - i
            if kind == "heading":
                labels.append(item)
                ax.axhline(y, color="#EEEEEE", linewidth=8, zorder=0)
                continue
            r = item
            labels.append(r["label"])
            if r["ci_low"] is None:  # in the plot, where the interval would be, so the label keeps its width
                note = textwrap.fill(r["no_interval"], 40)  # the panel is narrow
                ax.text(0.5, y, note, transform=ax.get_yaxis_transform(), ha="center", va="center", fontsize=6.5,
                        style="italic", color="#555555", zorder=5, linespacing=1.0,
                        bbox={"facecolor": "white", "edgecolor": "none", "pad": 0.5})
            if r["margin"]:
                ax.fill_betweenx([y - 0.42, y + 0.42], -r["margin"], r["margin"], color="#E3E3E3", zorder=0,
                                 linewidth=0)
            color = VERDICT_COLORS.get(r["category"], "#555555")
            if r["ci_low"] is not None:
                x = r["delta"] if r["delta"] is not None else (r["ci_low"] + r["ci_high"]) / 2
                ax.errorbar([x], [y], xerr=[[max(x - r["ci_low"], 0)], [max(r["ci_high"] - x, 0)]], fmt="o",
                            color=color, markersize=5, capsize=2.5, linewidth=1.6, zorder=3)
            for model, value in r["published"].items():
                ax.plot([value], [y], marker=markers[model], markersize=5.5, markerfacecolor="none",
                        markeredgecolor="black", markeredgewidth=1.0, linestyle="none", zorder=4)
        ax.set_yticks(range(n), list(reversed(labels)), fontsize=7.5)
        for tick, (kind, item) in zip(ax.get_yticklabels(), reversed(lines)):
            if kind == "heading":
                tick.set_fontweight("bold")
                tick.set_fontsize(8.5)
            elif item.get("role") == "primary":  # a pre-registered claim: its label says the half-width reached
                tick.set_fontweight("bold")
        ax.set_ylim(-0.7, n - 0.3)
        if unit == "points":  # a difference of percentages lies in [-100, 100], whatever an interval's method says
            low, high = ax.get_xlim()
            ax.set_xlim(max(low, -105), min(high, 105))
        ax.axvline(0, color="black", linewidth=0.8, zorder=1)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(UNIT_LABELS.get(unit, f"difference ({unit})"), fontsize=8.5)
        ax.tick_params(axis="x", labelsize=8)
    handles = [Line2D([], [], marker="o", color=VERDICT_COLORS.get(c, "#555555"), linestyle="-", markersize=5,
                      label=c) for c in categories]
    handles += [Line2D([], [], marker=markers[m], markerfacecolor="none", markeredgecolor="black", linestyle="none",
                       label=f"paper: {m}") for m in published_models]
    if any_band:
        handles.append(Patch(color="#E3E3E3", label="equivalence margin (loses nothing / does not improve)"))
    height = fig.get_figheight()
    legend_rows = -(-len(handles) // 4)
    fig.legend(handles=handles, loc="lower center", ncol=min(4, len(handles)), fontsize=7.5, frameon=False)
    top = 1.0
    if title:
        fig.suptitle(title, fontsize=10, fontweight="bold")
        top = 1 - 0.45 / height
    fig.tight_layout(rect=(0, (0.1 + 0.2 * legend_rows) / height, 1, top))
    return fig
