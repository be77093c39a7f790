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
