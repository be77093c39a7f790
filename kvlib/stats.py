"""Intervals of means and paired differences: the statistics behind kvlib's tables and verdicts."""
from __future__ import annotations


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-item scores (0/1 or real) with a percentile bootstrap CI over items, seeded so
    reports are reproducible. Returns (mean, low, high)."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _z(level: float) -> float:
    from statistics import NormalDist

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _is_binary(x) -> bool:
    import numpy as np

    return bool(np.isin(x, (0.0, 1.0)).all())


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion. Unlike the bootstrap it does not collapse to a point when every
    item scored the same (0/n -> [0, 0.56] at n = 3, [0, 0.025] at n = 150)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_ci needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    z2 = _z(level) ** 2
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = (z2 / (1 + z2 / n)) * ((p * (1 - p) / (n * z2) + 1 / (4 * n * n)) ** 0.5)
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_binary_difference_ci(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over paired 0/1 outcomes (same items) with Newcombe's hybrid score interval for paired
    proportions (Newcombe 1998, method 10): Wilson intervals of both proportions combined through the
    (continuity-corrected) phi correlation of the 2x2 table. It stays honest where the paired bootstrap fails:
    with no discordant pair the bootstrap says [0, 0] at any n, this says how large a difference n items cannot
    rule out."""
    import numpy as np

    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if x.size == 0 or x.size != y.size or not (_is_binary(x) and _is_binary(y)):
        raise ValueError(f"paired_binary_difference_ci needs two equally long non-empty 0/1 sequences "
                         f"(got {x.size} and {y.size} values)")
    n = x.size
    both, only_a = int(((x == 1) & (y == 1)).sum()), int(((x == 1) & (y == 0)).sum())
    only_b, neither = int(((x == 0) & (y == 1)).sum()), int(((x == 0) & (y == 0)).sum())
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = wilson_ci(both + only_a, n, level)
    l2, u2 = wilson_ci(both + only_b, n, level)
    # phi with Newcombe's continuity correction (as in Altman et al., "Statistics with Confidence", ch. 6):
    # uncorrected, all-concordant tables (no discordant pair) get phi = 1 and a zero-width interval
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    corrected = cross - n / 2 if cross > n / 2 else cross if cross < 0 else 0.0
    phi = corrected / denominator ** 0.5 if denominator else 0.0
    down = max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2) ** 0.5
    up = max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2) ** 0.5
    d = p1 - p2
    return d, max(-1.0, d - down), min(1.0, d + up)


def mean_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a 95% CI: Wilson for 0/1 outcomes (accuracy, exact match), else the seeded percentile
    bootstrap (`bootstrap_ci`). The one CI every per-item mean in kvlib's reports goes through."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    if x.size and _is_binary(x):
        return (float(x.mean()), *wilson_ci(int(x.sum()), int(x.size), level))
    return bootstrap_ci(x, n_boot, seed, level)


def paired_difference_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                         ) -> tuple[float, float, float]:
    """Mean of a - b over paired items with a 95% CI: Newcombe's paired score interval when both are 0/1
    outcomes (`paired_binary_difference_ci`), else the seeded paired bootstrap over item differences. The one
    CI every "finetuned minus original" difference in kvlib's reports goes through."""
    import numpy as np

    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if x.size != y.size:
        raise ValueError(f"paired_difference_ci needs paired values, got {x.size} and {y.size}")
    if x.size and _is_binary(x) and _is_binary(y):
        return paired_binary_difference_ci(x, y, level)
    return bootstrap_ci(x - y, n_boot, seed, level)


# ------------------------------------------------------------------------------- macro means (MMLU)


def _group_members(groups) -> list:
    """Index arrays of each group's items, groups in a fixed (name) order."""
    import numpy as np

    by_group: dict = {}
    for i, name in enumerate(groups):
        by_group.setdefault(name, []).append(i)
    return [np.asarray(by_group[name]) for name in sorted(by_group, key=str)]


def macro_mean(values, groups) -> float:
    """The mean of per-group means (MMLU over subjects): macro_bootstrap_ci's point estimate, without resampling."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    return float(np.mean([x[m].mean() for m in _group_members(list(groups))]))


def macro_bootstrap_ci(values, groups, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Macro mean (the mean of per-group means, e.g. MMLU over subjects) with a percentile bootstrap CI
    that resamples items within each group, so every resample still covers every group. For a paired
    comparison pass per-item differences: the macro mean is linear in the items. Returns (mean, low, high)."""
    import numpy as np

    x = np.asarray(list(values), dtype=float)
    g = list(groups)
    if x.size == 0 or len(g) != x.size:
        raise ValueError(f"macro_bootstrap_ci needs one group per value and at least one value "
                         f"(got {x.size} values, {len(g)} groups)")
    rng = np.random.default_rng(seed)
    members = _group_members(g)
    point = float(np.mean([x[m].mean() for m in members]))
    boots = np.mean([x[m][rng.integers(0, m.size, size=(n_boot, m.size))].mean(axis=1) for m in members], axis=0)
    alpha = (1 - level) / 2
    return point, float(np.quantile(boots, alpha)), float(np.quantile(boots, 1 - alpha))
