"""Parsing and scoring of free-text answers to the synthetic key-value tasks."""
import pytest

from kvlib.engine.scoring import parse_kv_answer, score_kv_answer

SIMPLE = {"task": "simple", "key": 2931, "value": 8364, "gold_dict_name": "32"}
MULTI = {"task": "multisubkey", "key": [7, 905, 51], "value": 1234, "gold_dict_name": "4",
         "query_subkeys": [51, 7, 905]}


@pytest.mark.parametrize(
    "text, value, dictionary",
    [
        ("The value of key 2931 is 8364 and it is in Dictionary [32].", 8364, "32"),
        ("The value of key 2931 is 8364 and it is in Dictionary 32.", 8364, "32"),
        ("8364", 8364, None),
        ("Key 2931 is in Dictionary [32] with value 8364.", 8364, "32"),
        ("In dictionary [32], key 2931 maps to 8364.", 8364, "32"),
        ("The value: 8364 (Dictionary [5])", 8364, "5"),
        ("2931", None, None),  # repeating the key is not an answer
        ("I cannot find it.", None, None),
        ("", None, None),
        ("The value of key 2931 is 83.64", None, None),  # a decimal is not an integer value
    ],
)
def test_parse_simple(text, value, dictionary):
    parsed = parse_kv_answer(text, query_key=2931)
    assert (parsed.value, parsed.dictionary) == (value, dictionary)


def test_parse_rejects_non_string():
    with pytest.raises(TypeError):
        parse_kv_answer(None)


def test_score_simple():
    good = score_kv_answer("The value of key 2931 is 8364 and it is in Dictionary [32].", SIMPLE)
    assert good["exact"] and good["value"] and good["dictionary"] and good["key"]
    wrong_dict = score_kv_answer("The value of key 2931 is 8364 and it is in Dictionary [31].", SIMPLE)
    assert wrong_dict["value"] and not wrong_dict["dictionary"] and not wrong_dict["exact"]
    wrong_value = score_kv_answer("The value of key 2931 is 8365 and it is in Dictionary [32].", SIMPLE)
    assert not wrong_value["value"] and wrong_value["dictionary"] and not wrong_value["exact"]
    # a number that merely contains the value is not the value
    assert not score_kv_answer("The value of key 2931 is 83641.", SIMPLE)["value"]


def test_score_multisubkey():
    text = ("The key that contains the integers 51, 7, 905 is (7, 905, 51), its value is 1234, "
            "and it is in Dictionary [4].")
    s = score_kv_answer(text, MULTI)
    assert s["exact"]
    permuted = score_kv_answer(text.replace("(7, 905, 51)", "(905, 7, 51)"), MULTI)
    assert permuted["value"] and not permuted["key"] and not permuted["exact"], "the full key must match in order"
    partial = score_kv_answer("The key is (7, 905), its value is 1234, in Dictionary [4].", MULTI)
    assert not partial["key"]
    # the subkeys of the question are never read as the value
    assert score_kv_answer("51, 7, 905", MULTI)["parsed_value"] is None


def test_score_needs_metadata():
    with pytest.raises(KeyError, match="gold_dict_name"):
        score_kv_answer("x", {"task": "simple", "key": 1, "value": 2})


def test_bootstrap_ci_is_seeded_and_brackets_the_mean():
    from kvlib.engine.stats import bootstrap_ci

    values = [1, 0, 1, 1, 0, 1, 1, 1, 0, 1]
    mean, lo, hi = bootstrap_ci(values)
    assert mean == 0.7 and lo <= mean <= hi and 0 <= lo < hi <= 1
    assert bootstrap_ci(values) == (mean, lo, hi), "same seed, same interval"
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0, 1.0)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_wilson_ci_matches_the_closed_form_and_never_collapses():
    from kvlib.engine.stats import wilson_ci

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
    from kvlib.engine.stats import bootstrap_ci, paired_binary_difference_ci

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

    from kvlib.engine.stats import paired_binary_difference_ci

    rng = np.random.default_rng(0)
    probs = [*cells, 1 - sum(cells)]
    truth, hits, reps = cells[1] - cells[2], 0, 1000
    for _ in range(reps):
        draw = rng.choice(4, size=n, p=probs)
        _, lo, hi = paired_binary_difference_ci(np.isin(draw, [0, 1]), np.isin(draw, [0, 2]))
        hits += lo <= truth <= hi
    assert hits / reps >= 0.94


def test_mean_and_paired_cis_choose_the_method_by_the_values():
    from kvlib.engine.stats import bootstrap_ci, mean_ci, paired_binary_difference_ci, paired_difference_ci, wilson_ci

    assert mean_ci([1, 0, 0, 0]) == (0.25, *wilson_ci(1, 4))
    assert mean_ci([0.5, 0.25, 1.0]) == bootstrap_ci([0.5, 0.25, 1.0])
    assert paired_difference_ci([1, 0, 1], [0, 0, 1]) == paired_binary_difference_ci([1, 0, 1], [0, 0, 1])
    assert paired_difference_ci([0.5, 1.0], [0.0, 1.0]) == bootstrap_ci([0.5, 0.0])
    with pytest.raises(ValueError, match="paired"):
        paired_difference_ci([1, 0], [1])


def test_summarize_groups_rows_with_cis():
    from kvlib.engine.evaluate import summarize

    rows = [{"run": "a", "model": m, "exact": e} for m, e in
            [("original", False), ("original", False), ("finetuned", True), ("finetuned", False)]]
    table = summarize(rows, ["run", "model"], ["exact"])
    by_model = {r["model"]: r for r in table}
    assert by_model["original"]["n"] == 2 and by_model["original"]["exact"] == 0.0
    assert by_model["finetuned"]["exact"] == 0.5
    assert by_model["finetuned"]["exact_ci_low"] <= 0.5 <= by_model["finetuned"]["exact_ci_high"]
