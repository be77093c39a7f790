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


def test_summarize_groups_rows_with_cis():
    from kvlib.engine.evaluate import summarize

    rows = [{"run": "a", "model": m, "exact": e} for m, e in
            [("original", False), ("original", False), ("finetuned", True), ("finetuned", False)]]
    table = summarize(rows, ["run", "model"], ["exact"])
    by_model = {r["model"]: r for r in table}
    assert by_model["original"]["n"] == 2 and by_model["original"]["exact"] == 0.0
    assert by_model["finetuned"]["exact"] == 0.5
    assert by_model["finetuned"]["exact_ci_low"] <= 0.5 <= by_model["finetuned"]["exact_ci_high"]
