"""Figures the notebooks show. Each function takes plain data and returns a matplotlib Figure;
saving goes through kvlib.report.tables so every PNG is written the same way."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")  # headless: papermill kernels have no display
import matplotlib.pyplot as plt  # noqa: E402


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
                    title_prefix: str = ""):
    """One panel per value of `panel`: `metric` against `x`, one line per value of `series`, with the 95% CI
    (`<metric>_ci_low`/`_ci_high` columns, as kvlib.engine.evaluate.summarize writes them) as a shaded band."""
    panels = list(dict.fromkeys(table[panel]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], panels):
        sub = table[table[panel] == name]
        for label in dict.fromkeys(sub[series]):
            line = sub[sub[series] == label].sort_values(x)
            ax.plot(line[x], line[metric], marker="o", label=str(label))
            ax.fill_between(line[x], line[f"{metric}_ci_low"], line[f"{metric}_ci_high"], alpha=0.15)
        ax.set_title(f"{title_prefix}{name}", fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_xticks(sorted(set(sub[x])))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def delta_bars(table, group: str = "task", series: str = "model", ylabel: str = "difference vs baseline (points)"):
    """Paired differences as bars in percentage points, one group of bars per value of `group`, one bar per
    value of `series`, with 95% CI whiskers and a line at zero (`table`: a DataFrame with columns `group`,
    `series`, delta, ci_low, ci_high as fractions, as kvlib.tasks.general.benchmark_deltas writes them)."""
    groups = list(dict.fromkeys(table[group]))
    names = list(dict.fromkeys(table[series]))
    width = 0.8 / max(1, len(names))
    fig, ax = plt.subplots(figsize=(max(4.5, 1.5 * len(groups)), 3.2))
    for j, name in enumerate(names):
        sub = table[table[series] == name].set_index(group).reindex(groups)
        xs = [i + (j - (len(names) - 1) / 2) * width for i in range(len(groups))]
        delta = 100 * sub["delta"]
        err = [(delta - 100 * sub["ci_low"]).clip(lower=0), (100 * sub["ci_high"] - delta).clip(lower=0)]
        ax.bar(xs, delta, width, yerr=err, capsize=3, label=str(name))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
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
