"""params/paper_reference.yaml: validated on load, consistent with itself, and a malformed file fails clearly."""
from __future__ import annotations

import pytest

from kvlib import paper
from kvlib.config import ParamError


def test_reference_loads_and_has_the_published_rows():
    ref = paper.load()
    scores = ref.general_scores()
    assert scores["Mistral-7B-Instruct-v0.1: original"]["triviaqa"] == 47.63
    assert scores["GPT-3.5 Turbo (1106): key-value, with template"] == {"mmlu": 67.75, "gsm8k": 71.65}
    assert {"mistral", "gpt35"} <= set(ref.training)


def test_table2_triviaqa_range_claim_matches_table2_rows():
    """The recorded Table 2 range is what Table 2's own rows give (the abstract's range differs; kept apart)."""
    scores = paper.load().general_scores()
    original = scores["Mistral-7B-Instruct-v0.1: original"]["triviaqa"]
    drops = [original - scores[f"Mistral-7B-Instruct-v0.1: {b}"]["triviaqa"]
             for b in ("MultidocQA", "IN2", "needle-in-a-haystack")]
    assert [round(min(drops), 2), round(max(drops), 2)] == paper.load().claim("triviaqa_drop_baselines_table2")["range"]
    assert paper.load().claim("triviaqa_drop_baselines_abstract")["range"] == [2.33, 6.19]


def test_tables_render():
    table = paper.general_table({"mmlu": "MMLU"})
    assert "MMLU" in table.columns and len(table) == 7
    assert set(paper.claims_table()["id"]) == set(paper.load().claims)


@pytest.mark.parametrize("text, message", [
    ("general_benchmarks: [{model: m, finetuning: f, source: s, scores: {mmlu: 153}}]", "percentage in [0, 100]"),
    ("general_benchmarks: [{model: m, finetuning: f, source: s, scores: {mmluu: 50}}]", "unknown benchmark"),
    ("general_benchmarks: [{model: m, source: s, scores: {mmlu: 50}}]", "missing ['finetuning']"),
    ("claims: [{id: a, source: s, unit: points, text: t}]", "exactly one of value or range"),
    ("claims: [{id: a, source: s, unit: points, text: t, range: [3, 1]}]", "expected [low, high]"),
    ("tables: {}", "unknown sections"),
])
def test_malformed_reference_fails_with_the_field(tmp_path, text, message):
    path = tmp_path / "ref.yaml"
    path.write_text(text)
    with pytest.raises(ParamError, match=message.replace("[", r"\[").replace("]", r"\]")):
        paper.load(path)
