"""kvlib.stats: intervals that do not collapse, p-values consistent with them, Holm, balanced accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest

from kvlib.engine import stats

MARGIN = 0.0219  # kvlib.report.paper.equivalence_margin()


def _paired_table(both, only_a, only_b, neither):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return a, b


# ------------------------------------------------------------------------------- moved from test_scoring


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    values = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    mean, lo, hi = stats.bootstrap_ci(values)
    assert mean == 0.7 and lo <= mean <= hi and 0 <= lo < hi <= 1
    assert stats.bootstrap_ci(values) == (mean, lo, hi), "same seed, same interval"
    assert stats.bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        stats.bootstrap_ci([])


def test_wilson_ci_matches_the_closed_form_and_never_collapses():
    lo, hi = stats.wilson_ci(0, 3)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / (3 + 1.96 ** 2), abs=1e-4)  # 0/n: upper = z^2 / (n + z^2)
    assert stats.wilson_ci(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)  # textbook value for 10/20
    assert stats.wilson_ci(3, 3)[1] == 1 and stats.wilson_ci(3, 3)[0] > 0.4
    for bad in [(4, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            stats.wilson_ci(*bad)


@pytest.mark.parametrize("successes, n, want", [
    (81, 263, (0.2553, 0.3662)), (15, 148, (0.0624, 0.1605)), (0, 20, (0.0, 0.1611)), (1, 29, (0.0061, 0.1718)),
])
def test_wilson_ci_reference_values(successes, n, want):
    """The four examples of Newcombe (1998a, "Two-sided confidence intervals for the single proportion", Table I),
    checked against statsmodels' Wilson interval (the reference implementation here) to 4 decimals."""
    from statsmodels.stats.proportion import proportion_confint

    got = stats.wilson_ci(successes, n)
    assert got == pytest.approx(proportion_confint(successes, n, method="wilson"), abs=1e-12)
    assert got == pytest.approx(want, abs=5e-5)


def test_newcombe_paired_reference_value():
    """Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables" (2017), ch. 8: complete response
    before and after consolidation therapy (Cavo et al. 2012), table [[59, 6], [16, 80]]: Newcombe's square-and-add
    interval (continuity-corrected phi) -0.0621 (-0.1186 to -0.0046), as the R package contingencytables prints
    it (Newcombe_square_and_add_CI_paired_2x2, its test-ch8.R)."""
    d, lo, hi = stats.paired_binary_difference_ci(*_paired_table(59, 6, 16, 80))
    assert (round(d, 4), round(lo, 4), round(hi, 4)) == (-0.0621, -0.1186, -0.0046)
    assert stats.newcombe_paired_ci(59, 6, 16, 80) == pytest.approx((d, lo, hi))


def test_paired_binary_ci_is_wide_without_discordant_pairs_where_the_bootstrap_says_zero():
    a, b = _paired_table(0, 0, 0, 3)  # 3 questions, both models wrong on all
    assert stats.bootstrap_ci([x - y for x, y in zip(a, b)])[1:] == (0.0, 0.0), "the failure this interval fixes"
    d, lo, hi = stats.paired_binary_difference_ci(a, b)
    assert d == 0 and lo == pytest.approx(-0.5615, abs=1e-3) and hi == pytest.approx(0.5615, abs=1e-3)
    d, lo, hi = stats.paired_binary_difference_ci(*_paired_table(75, 0, 0, 75))  # all concordant, half right
    assert d == 0 and -0.05 < lo < 0 < hi < 0.05, "continuity-corrected phi: narrow but not zero width"
    d, lo, hi = stats.paired_binary_difference_ci(*_paired_table(5, 12, 2, 31))
    assert d == pytest.approx(0.2) and 0 < lo < d < hi < 0.4
    swapped = stats.paired_binary_difference_ci(*_paired_table(5, 12, 2, 31)[::-1])  # b minus a: the mirror image
    assert swapped == pytest.approx((-d, -hi, -lo))
    with pytest.raises(ValueError, match="0/1"):
        stats.paired_binary_difference_ci([0.5, 1], [0, 1])
    with pytest.raises(ValueError):
        stats.paired_binary_difference_ci([1, 0], [1])


@pytest.mark.parametrize("n, cells", [(12, (0.4, 0.1, 0.1)), (30, (0.3, 0.1, 0.05)), (150, (0.05, 0.02, 0.01))])
def test_paired_binary_ci_covers_the_true_difference(n, cells):
    """Coverage of the nominal 95% on simulated paired outcomes (both-right, only-a, only-b probabilities),
    including the rare-discordance regime of a 135M model near the floor, where the bootstrap under-covers."""
    rng = np.random.default_rng(0)
    probs = [*cells, 1 - sum(cells)]
    truth, hits, reps = cells[1] - cells[2], 0, 1000
    for _ in range(reps):
        draw = rng.choice(4, size=n, p=probs)
        _, lo, hi = stats.paired_binary_difference_ci(np.isin(draw, [0, 1]), np.isin(draw, [0, 2]))
        hits += lo <= truth <= hi
    assert hits / reps >= 0.94


def test_mean_and_paired_cis_choose_the_method_by_the_values():
    assert stats.mean_ci([1, 0, 0, 0]) == (0.25, *stats.wilson_ci(1, 4))
    assert stats.mean_ci([2.5, 0.25, 1.0]) == stats.bootstrap_ci([2.5, 0.25, 1.0])  # not in [0, 1]
    mean, lo, hi = stats.mean_ci([0.5, 0.5, 0.5])  # scores in [0, 1] that all agree: Wilson on the sum, not a point
    assert mean == 0.5 and (lo, hi) == pytest.approx(stats.wilson_ci(1.5, 3))
    assert stats.paired_difference_ci([1, 0, 1], [0, 0, 1]) == stats.paired_binary_difference_ci([1, 0, 1], [0, 0, 1])
    assert stats.paired_difference_test([0.5, 1.0], [0.0, 1.0]).method == "paired t, floored by Newcombe on the soft table"
    assert stats.paired_difference_test([2.0, 3.0, 5.0], [1.0, 1.0, 1.0]).method == "paired t"
    with pytest.raises(ValueError, match="paired"):
        stats.paired_difference_ci([1, 0], [1])


# ------------------------------------------------------------------------------------- edge cases


def test_all_items_agree_gives_the_width_n_items_allow():
    """40 items, both models wrong on all (GSM8K at the floor): the bootstrap said [+0.0, +0.0] and "loses
    nothing" held; Newcombe says +-8.8 points, so a 2.19-point loss is not ruled out."""
    test = stats.paired_difference_test(*_paired_table(0, 0, 0, 40))
    assert test.estimate == 0 and test.ci_low == pytest.approx(-test.ci_high) and test.ci_high > 0.08
    p = test.p_values(MARGIN)
    assert p["p_no_loss"] > 0.025 and p["p_increase"] == p["p_decrease"] == 0.5


def test_one_discordant_item_and_n_two():
    test = stats.paired_difference_test(*_paired_table(0, 1, 0, 39))
    assert test.estimate == pytest.approx(0.025) and test.ci_low < 0 < test.ci_high
    assert 0.025 < test.p_values(MARGIN)["p_increase"] < 0.5
    tiny = stats.paired_difference_test([1, 0], [1, 0])
    assert tiny.estimate == 0 and tiny.ci_high > 0.5 and tiny.ci_low < -0.5  # n = 2: little is ruled out
    soft = stats.paired_difference_test([1 / 3, 2 / 3], [1 / 3, 2 / 3])  # question means that agree, n = 2
    assert soft.ci_high - soft.ci_low > 1


def test_three_seeds_that_agree_get_the_per_item_interval():
    """Seeds that answer alike leave the seed stage of the bootstrap (and the t interval across seeds) nothing to
    vary: the seed-group interval is still never narrower than Newcombe's on one seed, and is exactly that when no
    item differs either (where the two-stage bootstrap is a point)."""
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, size=40).astype(float)
    one = np.where(rng.random(40) < 0.2, 1 - base, base)
    test = stats.seed_item_test(np.vstack([one, one, one]), base)
    _, lo, hi = stats.paired_binary_difference_ci(one, base)
    assert test.ci_low <= lo and test.ci_high >= hi and test.estimate == pytest.approx((one - base).mean())
    same = stats.seed_item_test(np.vstack([base, base, base]), base)  # nothing differs anywhere
    assert same.interval == pytest.approx(stats.paired_binary_difference_ci(base, base))
    assert same.ci_high > 0.04 and same.p_values(MARGIN)["p_no_loss"] > 0.025


def test_seed_groups_widen_with_disagreeing_seeds():
    rng = np.random.default_rng(2)
    base = rng.integers(0, 2, size=60).astype(float)
    seeds = np.vstack([np.where(rng.random(60) < r, 1.0, base) for r in (0.05, 0.3, 0.6)])
    test = stats.seed_item_test(seeds, base)
    floor = stats.newcombe_test(stats.soft_table(seeds.mean(axis=0), base))
    assert test.ci_low <= floor.ci_low and test.ci_high >= floor.ci_high
    assert test.estimate == pytest.approx((seeds - base).mean())
    assert stats.seed_item_test(seeds, base).interval == test.interval


# ------------------------------------------------------------------ p-values agree with the intervals


def test_p_values_are_the_intervals_inverted():
    newcombe = stats.paired_difference_test(*_paired_table(59, 6, 16, 80))
    assert newcombe.p_greater(newcombe.ci_low) == pytest.approx(0.025, abs=1e-9)
    assert newcombe.p_less(newcombe.ci_high) == pytest.approx(0.025, abs=1e-9)
    assert newcombe.p_less(0.0) < 0.025 and newcombe.p_greater(-0.2) < 0.025  # the CI is below 0, above -0.2
    assert newcombe.p_greater(0.0) == pytest.approx(1 - newcombe.p_less(0.0)) and newcombe.p_greater(0.0) > 0.9
    t = stats.t_test([0.3, -0.1, 0.4, 0.2, 0.5])
    assert t.p_greater(t.ci_low) == pytest.approx(0.025) and t.p_less(t.ci_high) == pytest.approx(0.025)
    boot = stats.seed_item_test(np.array([[1, 0, 1, 1, 0, 1, 0, 1.0], [1, 1, 1, 0, 0, 1, 0, 1]]),
                                np.array([0, 0, 1, 0, 0, 1, 0, 0.0]))
    for null in (boot.ci_low - 1e-9, boot.ci_low, boot.ci_high, boot.ci_high + 1e-9):
        assert (boot.ci_low > null) == (boot.p_greater(null) < 0.025)
        assert (boot.ci_high < null) == (boot.p_less(null) < 0.025)
    combined = stats.hull([newcombe, t])
    assert combined.p_greater(0.1) == max(newcombe.p_greater(0.1), t.p_greater(0.1))


def test_p_from_interval_agrees_at_the_bound():
    assert stats.p_from_interval(0.1, 0.0, 0.2, 0.0, "greater") == pytest.approx(0.025)
    assert stats.p_from_interval(0.1, 0.0, 0.3, 0.3, "less") == pytest.approx(0.025)
    assert math.isnan(stats.p_from_interval(0.1, math.nan, 0.2, 0.0, "greater"))


def test_unbounded_equal_differences_are_not_measured():
    """Token losses (not in [0, 1]) with identical differences leave no variance to estimate and no floor."""
    test = stats.paired_difference_test([1.5, 2.5], [0.5, 1.5])
    assert test.estimate == 1.0 and math.isnan(test.ci_low) and math.isnan(test.p_greater(0.0))


# ------------------------------------------------------------------------------------- contrasts


def test_contrast_of_two_gains_is_paired_and_never_collapses():
    rng = np.random.default_rng(3)
    b1, b2 = rng.integers(0, 2, 50).astype(float), rng.integers(0, 2, 50).astype(float)
    a1 = np.where(rng.random(50) < 0.4, 1.0, b1)  # gains in setting 1
    test = stats.contrast_test(a1, b1, b2, b2)  # no gain in setting 2
    assert test.estimate == pytest.approx((a1 - b1).mean()) and test.ci_low > 0
    same = stats.contrast_test(b1, b1, b2, b2)  # no item changes: the t interval is a point, MOVER is not
    assert same.estimate == 0 and same.ci_low < -0.03 and same.ci_high > 0.03
    seeds = stats.seed_contrast_test(np.vstack([a1, a1]), b1, np.vstack([b2, b2]), b2)
    assert seeds.estimate == pytest.approx(test.estimate) and seeds.ci_low <= test.ci_high


# ------------------------------------------------------------------------------------- Holm, BA


def test_holm_matches_the_step_down_by_hand():
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert stats.holm([0.001, 0.2]) == pytest.approx([0.002, 0.2])
    assert stats.holm([]) == []


def test_balanced_accuracy_puts_any_constant_answer_at_one_half():
    labels = [True] * 30 + [False] * 10  # unbalanced on purpose
    assert stats.balanced_accuracy(labels, [True] * 40) == 0.5  # plain accuracy would say 75%
    assert stats.balanced_accuracy(labels, [None] * 40) == 0.0  # unparseable is wrong for both classes
    ba, lo, hi = stats.balanced_accuracy_ci(labels, labels)
    assert ba == 1.0 and hi == 1.0 and 0.8 < lo < 1
    ba, lo, hi = stats.balanced_accuracy_ci([True] * 75 + [False] * 75, [True] * 150)
    assert ba == 0.5 and lo < 0.5 < hi and hi - lo < 0.06
    with pytest.raises(ValueError, match="both classes"):
        stats.balanced_accuracy([True, True], [True, False])
