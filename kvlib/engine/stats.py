"""Intervals, p-values and multiplicity: every statistic behind kvlib's tables and verdicts.

Means (`mean_ci`): Wilson for 0/1 scores; for other scores in [0, 1] (a question's mean over gold positions, a
seed-averaged score) the wider of the t interval and Wilson on the summed scores, so a column of identical
scores still gets the width its n allows; anything else the seeded percentile bootstrap.

Paired differences, finetuned minus original on the same items (`paired_difference_test`), each as a
`DifferenceTest`: the 95% interval and, from the same method, one-sided p-values of the nulls the claims test
(`DifferenceTest.p_values`):
- 0/1 scores: Newcombe's paired score interval (1998, method 10, continuity-corrected phi); p-values by
  inverting it (the level at which its bound reaches the null).
- other scores in [0, 1]: the paired t interval, never narrower than Newcombe's interval on the 0/1 table
  with the same n, margins and spread of differences (`soft_table`): the hull of both, and the larger of their
  p-values. When every item agrees the t interval is a point and Newcombe's sets the width, as for 0/1 scores;
  where the differences have spread the two agree closely.
- unbounded scores (token losses): the paired t interval and test; no interval when all differences are
  equal or there is one item (no variance to estimate).
Seed groups (`seed_item_test`): a two-stage percentile bootstrap (resample seeds, then items), never narrower
than Newcombe's interval on the seed-averaged scores (`soft_table`) at the number of items. A difference of two paired
differences on the same items (`contrast_test`: a gain in one setting minus the gain in another): the paired t
interval on the per-item contrast, never narrower than the MOVER combination (Newcombe 2001) of the two
settings' Newcombe intervals.

Multiplicity: `holm` (statsmodels' Holm step-down) adjusts the p-values of a family of claims.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Callable, Sequence

import numpy as np

LEVEL = 0.95
_Z_MAX = 20.0  # the widest interval p-values are inverted over: one-sided p = 2.8e-89


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-item scores (0/1 or real) with a percentile bootstrap CI over items, seeded so
    reports are reproducible. Returns (mean, low, high). It collapses to a point when every item scored the
    same: the intervals that judge claims do not rest on it alone."""

    x = np.asarray(list(values), dtype=float)
    if x.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(x.mean()), float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _z(level: float) -> float:

    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return NormalDist().inv_cdf(0.5 + level / 2)


def _is_binary(x) -> bool:

    return bool(np.isin(x, (0.0, 1.0)).all())


def _is_unit(x) -> bool:
    return bool(((x >= 0) & (x <= 1)).all())


# ------------------------------------------------------------------------------------------ proportions


def _wilson_at_z(successes: float, n: float, z: float) -> tuple[float, float]:
    z2 = z * z
    p = successes / n
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = (z / (1 + z2 / n)) * (p * (1 - p) / n + z2 / (4 * n * n)) ** 0.5
    # exact ends where the closed form leaves float dust (0/n -> 2.8e-17)
    return (0.0 if successes <= 0 else max(0.0, centre - half)), (1.0 if successes >= n else min(1.0, centre + half))


def wilson_ci(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion. Unlike the bootstrap it does not collapse to a point when every
    item scored the same (0/n -> [0, 0.56] at n = 3, [0, 0.025] at n = 150). `successes` may be a sum of scores
    in [0, 1] (a soft count)."""
    if n <= 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_ci needs 0 <= successes <= n and n > 0, got {successes}/{n}")
    return _wilson_at_z(successes, n, _z(level))


def soft_table(a, b) -> tuple[float, float, float, float]:
    """The paired 2x2 table (both, only a, only b, neither) behind Newcombe's interval for two equally long
    sequences of scores in [0, 1]. For 0/1 scores, the ordinary table. For other scores (a question's mean over
    gold positions, a seed average) the 0/1 table with the same n, the same two sums (margins) and a discordant
    count matching the spread of the differences d = a - b: only a + only b = max(sum of d^2, |sum of d|), the
    count a 0/1 table with that mean difference and variance of differences has (for 0/1 scores sum of d^2 is the
    number of discordant items, so both definitions agree). When no item differs it is all concordant, and
    Newcombe's interval on it has the width that n items leave when none differs: the floor of the paired t
    interval (`paired_difference_test`), which it does not widen where the differences have spread."""

    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if x.size == 0 or x.size != y.size or not (_is_unit(x) and _is_unit(y)):
        raise ValueError(f"soft_table needs two equally long non-empty sequences of scores in [0, 1] "
                         f"(got {x.size} and {y.size} values)")
    d = x - y
    total = float(d.sum())
    discordant = max(float((d * d).sum()), abs(total))
    only_a, only_b = (discordant + total) / 2, (discordant - total) / 2
    both = max(0.0, float(y.sum()) - only_b)
    return both, only_a, only_b, max(0.0, x.size - both - only_a - only_b)


def _newcombe_at_z(table: tuple[float, float, float, float], z: float) -> tuple[float, float]:
    both, only_a, only_b, neither = table
    n = both + only_a + only_b + neither
    p1, p2 = (both + only_a) / n, (both + only_b) / n
    l1, u1 = _wilson_at_z(both + only_a, n, z)
    l2, u2 = _wilson_at_z(both + only_b, n, z)
    # phi with Newcombe's continuity correction (as in Altman et al., "Statistics with Confidence", ch. 6):
    # uncorrected, all-concordant tables (no discordant pair) get phi = 1 and a zero-width interval
    denominator = (both + only_a) * (only_b + neither) * (both + only_b) * (only_a + neither)
    cross = both * neither - only_a * only_b
    corrected = cross - n / 2 if cross > n / 2 else cross if cross < 0 else 0.0
    phi = corrected / denominator ** 0.5 if denominator > 0 else 0.0
    down = max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2) ** 0.5
    up = max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2) ** 0.5
    d = p1 - p2
    return max(-1.0, d - down), min(1.0, d + up)


def newcombe_paired_ci(both: float, only_a: float, only_b: float, neither: float,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval for the difference of paired proportions (Newcombe 1998, method 10) from
    the paired 2x2 table: (p_a - p_b, low, high). Counts may be soft (`soft_table`)."""
    table = (both, only_a, only_b, neither)
    if min(table) < 0 or sum(table) <= 0:
        raise ValueError(f"newcombe_paired_ci needs non-negative counts with a positive total, got {table}")
    n = sum(table)
    return ((only_a - only_b) / n, *_newcombe_at_z(table, _z(level)))


def paired_binary_difference_ci(a, b, level: float = 0.95) -> tuple[float, float, float]:
    """Mean of a - b over paired 0/1 outcomes (same items) with Newcombe's hybrid score interval for paired
    proportions (Newcombe 1998, method 10): Wilson intervals of both proportions combined through the
    (continuity-corrected) phi correlation of the 2x2 table. It stays honest where the paired bootstrap fails:
    with no discordant pair the bootstrap says [0, 0] at any n, this says how large a difference n items cannot
    rule out."""

    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if x.size == 0 or x.size != y.size or not (_is_binary(x) and _is_binary(y)):
        raise ValueError(f"paired_binary_difference_ci needs two equally long non-empty 0/1 sequences "
                         f"(got {x.size} and {y.size} values)")
    return newcombe_paired_ci(*soft_table(x, y), level=level)


def balanced_accuracy(labels, predictions) -> float:
    """Mean of the recalls of the two classes (True/False labels; a prediction that is neither, e.g. None for an
    unparseable reply, is wrong for both): 0.5 for any constant answer, whatever the label balance."""
    tp, p, tn, n = _class_counts(labels, predictions)
    return (tp / p + tn / n) / 2


def _class_counts(labels, predictions) -> tuple[int, int, int, int]:
    labels, predictions = list(labels), list(predictions)
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if any(not isinstance(label, bool) for label in labels):
        raise ValueError("balanced accuracy needs True/False labels")
    positives = [p for label, p in zip(labels, predictions) if label]
    negatives = [p for label, p in zip(labels, predictions) if not label]
    if not positives or not negatives:
        raise ValueError(f"balanced accuracy needs both classes, got {len(positives)} True and "
                         f"{len(negatives)} False labels")
    return (sum(p is True for p in positives), len(positives), sum(p is False for p in negatives), len(negatives))


def balanced_accuracy_ci(labels, predictions, level: float = 0.95) -> tuple[float, float, float]:
    """Balanced accuracy with its interval: the two recalls are independent proportions (the labels are fixed),
    so their mean's interval combines their Wilson intervals by MOVER (Zou & Donner 2008; Newcombe's
    square-and-add). Returns (balanced accuracy, low, high)."""
    tp, p, tn, n = _class_counts(labels, predictions)
    r1, r2 = tp / p, tn / n
    (l1, u1), (l2, u2) = wilson_ci(tp, p, level), wilson_ci(tn, n, level)
    ba = (r1 + r2) / 2
    return ba, ba - ((r1 - l1) ** 2 + (r2 - l2) ** 2) ** 0.5 / 2, ba + ((u1 - r1) ** 2 + (u2 - r2) ** 2) ** 0.5 / 2


# --------------------------------------------------------------------------------- tests of differences


@dataclass(frozen=True)
class DifferenceTest:
    """A difference with its interval and the one-sided p-values of the same method. `p_greater(null)` is the
    p-value of H0: difference <= null (small: the difference is above null), `p_less(null)` of H0: difference
    >= null. Consistent with the interval: at level 95%, ci_low > null exactly when p_greater(null) < 0.025
    (and ci_high < null when p_less(null) < 0.025)."""

    estimate: float
    ci_low: float
    ci_high: float
    method: str
    p_greater: Callable[[float], float]
    p_less: Callable[[float], float]

    @property
    def interval(self) -> tuple[float, float, float]:
        return self.estimate, self.ci_low, self.ci_high

    def p_values(self, margin: float | None) -> dict[str, float | None]:
        """The nulls kvlib's claims test (kvlib.report.paper): `p_increase` (H0: diff <= 0), `p_decrease` (H0: diff
        >= 0), `p_no_loss` (H0: diff <= -margin) and `p_no_gain` (H0: diff >= margin); the last two None without a
        margin (the caller states it: kvlib.report.paper.equivalence_margin)."""
        return {"p_increase": self.p_greater(0.0), "p_decrease": self.p_less(0.0),
                "p_no_loss": None if margin is None else self.p_greater(-margin),
                "p_no_gain": None if margin is None else self.p_less(margin)}

    def row(self, margin: float | None) -> dict:
        """The columns a difference row carries: ci_low, ci_high, ci_method and the four claim p-values."""
        return {"ci_low": self.ci_low, "ci_high": self.ci_high, "ci_method": self.method, **self.p_values(margin)}


def _nan(_: float) -> float:
    return math.nan


def _unmeasured(estimate: float, method: str) -> DifferenceTest:
    return DifferenceTest(estimate, math.nan, math.nan, method, _nan, _nan)


def hull(tests: Sequence[DifferenceTest], method: str | None = None) -> DifferenceTest:
    """The union of intervals of the same difference (the first test's estimate): lowest low, highest high, and
    at each null the largest p-value, so the hull holds a claim only where every member does."""
    tests = list(tests)
    return DifferenceTest(
        tests[0].estimate, min(t.ci_low for t in tests), max(t.ci_high for t in tests),
        method or " | ".join(t.method for t in tests),
        lambda null: max(t.p_greater(null) for t in tests), lambda null: max(t.p_less(null) for t in tests))


def _inverted(bounds_at_z: Callable[[float], tuple[float, float]], estimate: float, level: float, method: str
              ) -> DifferenceTest:
    """A test from a family of intervals indexed by z (the two-sided level 2*Phi(z) - 1; bounds at z = 0 are the
    estimate): the p-value of a null is the one-sided tail of the z at which a bound reaches it."""
    from scipy.optimize import brentq
    from scipy.stats import norm

    def p_greater(null: float) -> float:
        if estimate == null:
            return 0.5
        bound = 0 if estimate > null else 1  # the lower bound must pass the null; if below it, the upper one
        gap = (lambda z: bounds_at_z(z)[0] - null) if estimate > null else (lambda z: bounds_at_z(z)[1] - null)
        if gap(_Z_MAX) * gap(0.0) > 0:  # not reached within the widest interval considered
            return float(norm.sf(_Z_MAX)) if bound == 0 else float(norm.cdf(_Z_MAX))
        z = brentq(gap, 0.0, _Z_MAX, xtol=1e-12)
        return float(norm.sf(z)) if bound == 0 else float(norm.cdf(z))

    def p_less(null: float) -> float:
        return 1.0 - p_greater(null) if estimate != null else 0.5

    lo, hi = bounds_at_z(_z(level))
    return DifferenceTest(estimate, lo, hi, method, p_greater, p_less)


def newcombe_test(table: tuple[float, float, float, float], level: float = 0.95,
                  method: str = "Newcombe paired score") -> DifferenceTest:
    """Newcombe's paired interval of a (possibly soft) 2x2 table as a test (p-values by inverting it)."""
    n = sum(table)
    return _inverted(lambda z: _newcombe_at_z(table, z), (table[1] - table[2]) / n, level, method)


def t_test(diffs, level: float = 0.95) -> DifferenceTest:
    """The one-sample t interval and tests of the mean of `diffs` (scipy.stats.ttest_1samp; for paired scores,
    the paired t test). Equal differences (or a single one) leave no variance to estimate: the interval is the
    point and p is 0 or 1 by the side of the null, so such a test only ever counts inside a `hull` with a floor."""
    from scipy import stats

    d = np.asarray(list(diffs), dtype=float)
    if d.size == 0:
        raise ValueError("t_test needs at least one difference")
    mean = float(d.mean())
    if d.size < 2 or np.ptp(d) == 0:
        def point(null: float, above: bool) -> float:
            return 0.5 if mean == null else float((mean > null) != above)

        return DifferenceTest(mean, mean, mean, "paired t (no variance)", lambda null: point(null, True),
                              lambda null: point(null, False))
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(level)
    return DifferenceTest(
        mean, float(ci.low), float(ci.high), "paired t",
        lambda null: float(stats.ttest_1samp(d, null, alternative="greater").pvalue),
        lambda null: float(stats.ttest_1samp(d, null, alternative="less").pvalue))


def paired_difference_test(a, b, level: float = 0.95) -> DifferenceTest:
    """a - b over paired items (module docstring): Newcombe for 0/1 scores; for scores in [0, 1] the hull of the
    paired t interval and Newcombe's interval on the soft table; otherwise the paired t interval, left
    unmeasured (NaN) when there is no variance to estimate."""

    x, y = np.asarray(list(a), dtype=float), np.asarray(list(b), dtype=float)
    if x.size != y.size:
        raise ValueError(f"paired_difference_test needs paired values, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired_difference_test needs at least one pair")
    if _is_binary(x) and _is_binary(y):
        return newcombe_test(soft_table(x, y), level)
    t = t_test(x - y, level)
    if _is_unit(x) and _is_unit(y):
        return hull([t, newcombe_test(soft_table(x, y), level, "Newcombe on the soft table")],
                    "paired t, floored by Newcombe on the soft table")
    if t.method == "paired t (no variance)":
        return _unmeasured(t.estimate, "paired t (no variance: not measured)")
    return t


def _bootstrap_test(stats_, estimate: float, level: float, method: str) -> DifferenceTest:
    """A test from a bootstrap distribution of the statistic: percentile interval (inverted-CDF quantiles) and
    p_greater(null) = share of resamples <= null, so that ci_low > null exactly when p_greater(null) < alpha."""

    s = np.sort(np.asarray(stats_, dtype=float))
    alpha = (1 - level) / 2
    lo = float(np.quantile(s, alpha, method="inverted_cdf"))
    hi = float(-np.quantile(-s, alpha, method="inverted_cdf"))
    return DifferenceTest(estimate, lo, hi, method,
                          lambda null: float(np.searchsorted(s, null, side="right")) / s.size,
                          lambda null: float(s.size - np.searchsorted(s, null, side="left")) / s.size)


def seed_item_bootstrap(diffs, n_boot: int = 2000, seed: int = 0):
    """Two-stage bootstrap of the mean of a seeds x items array of paired differences: each resample draws the
    seeds with replacement, then the items with replacement, and averages. Returns the n_boot means."""

    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 1:
        raise ValueError(f"seed_item_bootstrap needs a seeds x items array, got shape {d.shape}")
    k, n = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, k, size=(n_boot, k))
    items = rng.integers(0, n, size=(n_boot, n))
    per_item = d[seeds].mean(axis=1)  # (n_boot, n): each item's mean over the drawn seeds
    return np.take_along_axis(per_item, items, axis=1).mean(axis=1)


def seed_item_test(scores, baseline, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> DifferenceTest:
    """Seed-averaged difference of a group of models (`scores`: seeds x items) from the baseline (`baseline`:
    its score on the same items): the two-stage bootstrap over seeds and items (`seed_item_bootstrap`), never
    narrower than Newcombe's interval on the seed-averaged scores at the number of items (for 0/1 scores on
    which the seeds agree, exactly the per-item paired interval)."""

    x, y = np.asarray(scores, dtype=float), np.asarray(baseline, dtype=float)
    if x.ndim != 2 or y.shape != (x.shape[1],):
        raise ValueError(f"seed_item_test needs seeds x items scores and one baseline score per item, got "
                         f"{x.shape} and {y.shape}")
    d = x - y
    estimate = float(d.mean())
    boot = _bootstrap_test(seed_item_bootstrap(d, n_boot, seed), estimate, level, "two-stage bootstrap")
    averaged = x.mean(axis=0)
    if not (_is_unit(averaged) and _is_unit(y)):
        return boot
    floor = newcombe_test(soft_table(averaged, y), level)
    return hull([boot, floor], "two-stage bootstrap (seeds, items), floored by Newcombe")


def _mover_at_z(first: tuple, second: tuple, z: float) -> tuple[float, float]:
    d1, d2 = (first[1] - first[2]) / sum(first), (second[1] - second[2]) / sum(second)
    l1, u1 = _newcombe_at_z(first, z)
    l2, u2 = _newcombe_at_z(second, z)
    d = d1 - d2
    return d - ((d1 - l1) ** 2 + (u2 - d2) ** 2) ** 0.5, d + ((u1 - d1) ** 2 + (d2 - l2) ** 2) ** 0.5


def mover_contrast_test(first: tuple, second: tuple, level: float = 0.95) -> DifferenceTest:
    """(a1 - b1) - (a2 - b2) from two paired 2x2 tables: the MOVER combination of their Newcombe intervals
    (Newcombe 2001's interaction interval), as if the two differences were independent. On the same items they
    are usually positively correlated, which makes it wider than needed: a floor, not an estimate of width."""
    estimate = (first[1] - first[2]) / sum(first) - (second[1] - second[2]) / sum(second)
    return _inverted(lambda z: _mover_at_z(first, second, z), estimate, level, "MOVER of Newcombe intervals")


def contrast_test(a1, b1, a2, b2, level: float = 0.95) -> DifferenceTest:
    """Difference of two paired differences on the same items: mean of (a1 - b1) - (a2 - b2), e.g. a model's
    gain over the original with random distractors minus its gain with retrieved ones, per question. Scores in
    [0, 1]: the paired t interval on the per-item contrast, never narrower than the MOVER combination of the
    two Newcombe intervals (`mover_contrast_test`)."""

    arrays = [np.asarray(list(v), dtype=float) for v in (a1, b1, a2, b2)]
    if len({v.size for v in arrays}) != 1 or arrays[0].size == 0:
        raise ValueError(f"contrast_test needs four equally long non-empty sequences, got {[v.size for v in arrays]}")
    x1, y1, x2, y2 = arrays
    t = t_test((x1 - y1) - (x2 - y2), level)
    if all(_is_unit(v) for v in arrays):
        return hull([t, mover_contrast_test(soft_table(x1, y1), soft_table(x2, y2), level)],
                    "paired t, floored by MOVER of Newcombe intervals")
    return t if t.method == "paired t" else _unmeasured(t.estimate, "paired t (no variance: not measured)")


def seed_contrast_test(scores1, baseline1, scores2, baseline2, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> DifferenceTest:
    """`contrast_test` for a seed group (scores: seeds x items in each setting, baseline: per item): the
    two-stage bootstrap of the per-seed, per-item contrast, floored by MOVER on the seed-averaged scores."""

    x1, x2 = np.asarray(scores1, dtype=float), np.asarray(scores2, dtype=float)
    y1, y2 = np.asarray(baseline1, dtype=float), np.asarray(baseline2, dtype=float)
    c = (x1 - y1) - (x2 - y2)
    boot = _bootstrap_test(seed_item_bootstrap(c, n_boot, seed), float(c.mean()), level, "two-stage bootstrap")
    m1, m2 = x1.mean(axis=0), x2.mean(axis=0)
    if not all(_is_unit(v) for v in (m1, m2, y1, y2)):
        return boot
    return hull([boot, mover_contrast_test(soft_table(m1, y1), soft_table(m2, y2), level)],
                "two-stage bootstrap (seeds, items), floored by MOVER of Newcombe intervals")


def p_from_interval(estimate: float, ci_low: float, ci_high: float, null: float, side: str,
                    level: float = 0.95) -> float:
    """Approximate one-sided p-value read off a reported interval (normal approximation, the half-width on the
    null's side as 1.96 standard errors): only for difference rows that carry no p-values of their own. At the
    interval's level it agrees with the interval (p < 0.025 exactly when the bound is beyond the null)."""
    from scipy.stats import norm

    if any(v is None or math.isnan(v) for v in (estimate, ci_low, ci_high)):
        return math.nan
    z = _z(level)
    if side == "greater":
        se = (estimate - ci_low) / z
        return float(norm.sf((estimate - null) / se)) if se > 0 else (0.0 if estimate > null else 1.0)
    if side == "less":
        se = (ci_high - estimate) / z
        return float(norm.cdf((estimate - null) / se)) if se > 0 else (0.0 if estimate < null else 1.0)
    raise ValueError(f"side must be 'greater' or 'less', got {side!r}")


# ---------------------------------------------------------------------------- planning: expected widths
#
# Before a run: how wide will a claim's 95% interval be at the planned number of units (questions, items), from
# the spread of the units' paired differences an earlier run measured (or a stated prior)? Each method above is a
# t (or bootstrap) interval over units that never goes below a Newcombe floor, so the expected width is the larger
# of the two at the planned n: `expected_half_width`.


def seed_item_spread(diffs) -> tuple[float, float]:
    """(unit_sd, seed_sd) of a seeds x units array of paired differences (one row per seed; one row for a single
    model), what a planned interval needs. `unit_sd`: the standard deviation over units of their seed-averaged
    difference. `seed_sd`: the spread of the seeds' mean differences beyond what sampling the units explains (the
    between-seed standard deviation of a one-way random-effects model: the variance of the seeds' means minus the
    mean within-seed variance over the number of units, floored at 0); 0 for one seed."""
    d = np.asarray(diffs, dtype=float)
    if d.ndim != 2 or d.shape[1] < 1:
        raise ValueError(f"seed_item_spread needs a seeds x units array, got shape {d.shape}")
    k, n = d.shape
    unit_sd = float(d.mean(axis=0).std(ddof=1)) if n > 1 else 0.0
    if k < 2:
        return unit_sd, 0.0
    within = float(d.var(axis=1, ddof=1).mean()) if n > 1 else 0.0
    between = float(d.mean(axis=1).var(ddof=1)) - within / n
    return unit_sd, math.sqrt(max(between, 0.0))


def planned_table(n: int, base_rate: float, unit_sd: float, mean: float = 0.0) -> tuple[float, float, float, float]:
    """The paired 2x2 table (soft counts, as `soft_table` builds it) that n units are expected to give when the
    original scores `base_rate` on average and the units' differences have mean `mean` and standard deviation
    `unit_sd`: discordant = n x max(unit_sd^2 + mean^2, |mean|), split by the mean, the rest concordant."""
    if n < 1 or not 0 <= base_rate <= 1 or unit_sd < 0:
        raise ValueError(f"planned_table needs n >= 1, base_rate in [0, 1] and unit_sd >= 0, got {n}, {base_rate}, "
                         f"{unit_sd}")
    discordant = min(n * max(unit_sd ** 2 + mean ** 2, abs(mean)), float(n))
    only_a, only_b = (discordant + n * mean) / 2, (discordant - n * mean) / 2
    both = max(0.0, n * base_rate - only_b)
    return both, only_a, only_b, max(0.0, n - both - only_a - only_b)


def expected_half_width(n: int, unit_sd: float, floor_tables: Sequence[tuple], seed_sd: float = 0.0,
                        seeds: int = 1, level: float = 0.95) -> float:
    """Half the width of the 95% interval a claim is expected to reach from n units: the larger of
    - the spread part, t_{(1+level)/2, n-1} x sqrt(unit_sd^2 / n + seed_sd^2 / seeds): the paired t interval over
      units (scipy.stats.t), and for a seed group the two-stage bootstrap's spread, whose seed part does not
      shrink with n (`seed_item_spread`);
    - the floor the judged method never goes below: Newcombe's interval on the one planned table of
      `floor_tables` (`planned_table`), or the MOVER combination of two (a contrast of two settings).
    Never 0 (the floor has the width n units leave when none differs); infinite below 2 units (no t interval)."""
    from scipy.stats import t as student_t

    if n < 2:
        return math.inf
    spread = float(student_t.ppf(0.5 + level / 2, n - 1)) * math.sqrt(unit_sd ** 2 / n + seed_sd ** 2 / seeds)
    z = _z(level)
    if len(floor_tables) == 1:
        lo, hi = _newcombe_at_z(tuple(floor_tables[0]), z)
    elif len(floor_tables) == 2:
        lo, hi = _mover_at_z(tuple(floor_tables[0]), tuple(floor_tables[1]), z)
    else:
        raise ValueError(f"expected_half_width takes one table (a difference) or two (a contrast), got "
                         f"{len(floor_tables)}")
    return max(spread, (hi - lo) / 2)


def detectable_difference(half_width: float, n: int, alpha: float = 0.025, power: float = 0.8,
                          level: float = 0.95) -> float:
    """The smallest true difference a one-sided test at `alpha` (Holm's first step in a family of m: 0.025 / m)
    finds with probability `power`, for an interval of `half_width` from n units: (t_{1-alpha} + t_{power}) x SE
    with SE = half_width / t_{(1+level)/2} (n - 1 degrees of freedom)."""
    from scipy.stats import t as student_t

    if n < 2 or not math.isfinite(half_width):
        return math.inf
    df = n - 1
    se = half_width / float(student_t.ppf(0.5 + level / 2, df))
    return (float(student_t.ppf(1 - alpha, df)) + float(student_t.ppf(power, df))) * se


# ------------------------------------------------------------------------------------------------ means


def mean_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """Mean with a 95% CI: Wilson for 0/1 outcomes (accuracy, exact match); for other scores in [0, 1] the hull of
    the t interval and Wilson on the summed scores (never narrower than Wilson at that n); else the seeded
    percentile bootstrap (`bootstrap_ci`). The one CI every per-item mean in kvlib's reports goes through."""

    x = np.asarray(list(values), dtype=float)
    if x.size and _is_binary(x):
        return (float(x.mean()), *wilson_ci(int(x.sum()), int(x.size), level))
    if x.size and _is_unit(x):
        lo, hi = wilson_ci(float(x.sum()), int(x.size), level)
        t = t_test(x, level)
        return float(x.mean()), max(0.0, min(lo, t.ci_low)), min(1.0, max(hi, t.ci_high))
    return bootstrap_ci(x, n_boot, seed, level)


def paired_difference_ci(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95
                         ) -> tuple[float, float, float]:
    """Mean of a - b over paired items with a 95% CI (`paired_difference_test`: Newcombe's paired score interval
    for 0/1 outcomes, the paired t interval floored by Newcombe for other scores in [0, 1], else the paired t
    interval). The one CI every "finetuned minus original" difference in kvlib's reports goes through.
    `n_boot` and `seed` are accepted for compatibility; no method here resamples."""
    return paired_difference_test(a, b, level).interval


# ------------------------------------------------------------------------------- macro means (MMLU)


def _group_members(groups) -> list:
    """Index arrays of each group's items, groups in a fixed (name) order."""

    by_group: dict = {}
    for i, name in enumerate(groups):
        by_group.setdefault(name, []).append(i)
    return [np.asarray(by_group[name]) for name in sorted(by_group, key=str)]


def macro_mean(values, groups) -> float:
    """The mean of per-group means (MMLU over subjects): macro_bootstrap_ci's point estimate, without resampling."""

    x = np.asarray(list(values), dtype=float)
    return float(np.mean([x[m].mean() for m in _group_members(list(groups))]))


def macro_bootstrap_ci(values, groups, n_boot: int = 2000, seed: int = 0,
                       level: float = 0.95) -> tuple[float, float, float]:
    """Macro mean (the mean of per-group means, e.g. MMLU over subjects) with a percentile bootstrap CI
    that resamples items within each group, so every resample still covers every group. For a paired
    comparison pass per-item differences: the macro mean is linear in the items. Returns (mean, low, high).
    Descriptive only (it collapses when no item varies); no claim is judged on it."""

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


# ------------------------------------------------------------------------------------------ multiplicity


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-adjusted p-values of a family (statsmodels.stats.multitest.multipletests, method "holm"): rejecting
    where the adjusted p is below alpha controls the family-wise error rate at alpha."""
    if not len(p_values):
        return []
    from statsmodels.stats.multitest import multipletests

    return [float(p) for p in multipletests(list(p_values), method="holm")[1]]
