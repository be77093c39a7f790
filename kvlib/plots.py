"""Figures the notebooks show. Each function takes plain data and returns a matplotlib Figure;
saving goes through kvlib.reporting so every PNG is written the same way."""
from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib

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
