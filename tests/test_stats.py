"""kvlib.stats: intervals of means and paired differences."""
import pytest


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    from kvlib.stats import bootstrap_ci

    values = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    mean, lo, hi = bootstrap_ci(values)
    assert mean == 0.7 and lo <= mean <= hi and 0 <= lo < hi <= 1
    assert bootstrap_ci(values) == (mean, lo, hi), "same seed, same interval"
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_wilson_ci_matches_the_closed_form_and_never_collapses():
    from kvlib.stats import wilson_ci

    lo, hi = wilson_ci(0, 3)
    assert lo == 0 and hi == pytest.approx(1.96 ** 2 / (3 + 1.96 ** 2), abs=1e-4)  # 0/n: upper = z^2 / (n + z^2)
    assert wilson_ci(10, 20) == pytest.approx((0.2993, 0.7007), abs=1e-4)  # textbook value for 10/20
    assert wilson_ci(3, 3)[1] == 1 and wilson_ci(3, 3)[0] > 0.4
    for bad in [(4, 3), (-1, 3), (0, 0)]:
        with pytest.raises(ValueError):
            wilson_ci(*bad)


def _paired_table(both, only_a, only_b, neither):
    a = [1] * both + [1] * only_a + [0] * only_b + [0] * neither
    b = [1] * both + [0] * only_a + [1] * only_b + [0] * neither
    return a, b


def test_paired_binary_ci_is_wide_without_discordant_pairs_where_the_bootstrap_says_zero():
    from kvlib.stats import bootstrap_ci, paired_binary_difference_ci

    a, b = _paired_table(0, 0, 0, 3)  # 3 questions, both models wrong on all
    assert bootstrap_ci([x - y for x, y in zip(a, b)])[1:] == (0.0, 0.0), "the failure this interval fixes"
    d, lo, hi = paired_binary_difference_ci(a, b)
    assert d == 0 and lo == pytest.approx(-0.5615, abs=1e-3) and hi == pytest.approx(0.5615, abs=1e-3)
    d, lo, hi = paired_binary_difference_ci(*_paired_table(75, 0, 0, 75))  # all concordant, half right
    assert d == 0 and -0.05 < lo < 0 < hi < 0.05, "continuity-corrected phi: narrow but not zero width"
    d, lo, hi = paired_binary_difference_ci(*_paired_table(5, 12, 2, 31))
    assert d == pytest.approx(0.2) and 0 < lo < d < hi < 0.4
    swapped = paired_binary_difference_ci(*_paired_table(5, 12, 2, 31)[::-1])  # b minus a: the mirror image
    assert swapped == pytest.approx((-d, -hi, -lo))
    with pytest.raises(ValueError, match="0/1"):
        paired_binary_difference_ci([0.5, 1], [0, 1])
    with pytest.raises(ValueError):
        paired_binary_difference_ci([1, 0], [1])


@pytest.mark.parametrize("n, cells", [(12, (0.4, 0.1, 0.1)), (30, (0.3, 0.1, 0.05)), (150, (0.05, 0.02, 0.01))])
def test_paired_binary_ci_covers_the_true_difference(n, cells):
    """Coverage of the nominal 95% on simulated paired outcomes (both-right, only-a, only-b probabilities),
    including the rare-discordance regime of a 135M model near the floor, where the bootstrap under-covers."""
    import numpy as np

    from kvlib.stats import paired_binary_difference_ci

    rng = np.random.default_rng(0)
    probs = [*cells, 1 - sum(cells)]
    truth, hits, reps = cells[1] - cells[2], 0, 1000
    for _ in range(reps):
        draw = rng.choice(4, size=n, p=probs)
        _, lo, hi = paired_binary_difference_ci(np.isin(draw, [0, 1]), np.isin(draw, [0, 2]))
        hits += lo <= truth <= hi
    assert hits / reps >= 0.94


def test_mean_and_paired_cis_choose_the_method_by_the_values():
    from kvlib.stats import bootstrap_ci, mean_ci, paired_binary_difference_ci, paired_difference_ci, wilson_ci

    assert mean_ci([1, 0, 0, 0]) == (0.25, *wilson_ci(1, 4))
    assert mean_ci([0.5, 0.25, 1.0]) == bootstrap_ci([0.5, 0.25, 1.0])
    assert paired_difference_ci([1, 0, 1], [0, 0, 1]) == paired_binary_difference_ci([1, 0, 1], [0, 0, 1])
    assert paired_difference_ci([0.5, 1.0], [0.0, 1.0]) == bootstrap_ci([0.5, 0.0])
    with pytest.raises(ValueError, match="paired"):
        paired_difference_ci([1, 0], [1])
