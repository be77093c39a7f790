"""Notebook 06 (baselines): its params class rejects bad params naming the field, before any compute, and the
library helpers it calls work on tiny inputs (verdicts, pooling, token-matching and Table 2 tables, NQ-Open
exclusion in kvlib.tasks.general.prepare_task). Reads the repo's params and the data directory; no model weights."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvlib.tasks import baseline_sets as bl
from kvlib.report import paper
from kvlib.engine.config import ParamError, from_mapping
from kvlib.pipeline import notebooks
from kvlib.pipeline import baselines_study as study

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # params refer to each other relative to the repo root


def _params(**over) -> dict:
    base = {"profile": "smoke", "params_root": "params",
            "models": {"original": {"model": "smollm2-135m-instruct"}, "finetuned": {"run": "simple-template"}},
            "match": "simple-template",
            "baselines": {"MDQA": {"kind": "mdqa", "num_documents": 3}, "needle": {"kind": "niah"}},
            "mdqa": {"settings": ["random"], "num_documents": 3, "positions": [1, 3], "num_questions": 2},
            "flenqa": {"styles": ["normal"]},
            "general": {"tasks": {"nq_open": {"max_examples": 2}}}}
    base.update(over)
    return base


def test_valid_params_and_derived_configs(tmp_path):
    P = from_mapping(notebooks.BaselinesNotebookParams, _params(paper_rows={"finetuned": "key-value, with template"}))
    cfg = P.baseline_config("MDQA")
    assert cfg.kind == "mdqa" and cfg.tokenizer == "smollm2-135m-instruct"  # the matched dataset's tokenizer
    assert P.match_job().name == "simple-template"
    assert P.mdqa_params().num_documents == 3 and P.general_params().baseline == "original"
    assert P.flenqa_params().styles == ["normal"]
    assert P.baseline_dir("needle") == Path("runs/data/smoke/baselines/needle")
    assert P.paper_row("needle") == "needle-in-a-haystack" and P.paper_row("MDQA") is None
    assert P.paper_row("finetuned") == "key-value, with template"
    assert P.baseline_backend(str(tmp_path)).model == str(tmp_path)  # a trained baseline's checkpoint folder


@pytest.mark.parametrize("over, field", [
    ({"match": None}, "match"),
    ({"match": "nope"}, "match"),
    ({"original": "base"}, "original"),
    ({"baselines": {"x": {"kind": "in3"}}}, "baselines.x.kind"),
    ({"baselines": {"x": {"num_documents": 3}}}, "baselines.x"),
    ({"baselines": {"x": {"kind": "niah", "token_total": 100}}}, "baselines.x.token_total"),
    ({"baselines": {"original": {"kind": "niah"}}}, "baselines.original"),
    ({"baselines": {"A b": {"kind": "niah"}, "a-B": {"kind": "in2"}}}, "baselines.a-B"),
    ({"baselines": {"x": {"kind": "niah", "sample_token": [1, 2]}}}, "baselines.x.sample_token"),
    ({"mdqa": {"num_documents": 30}}, "mdqa.num_documents"),
    ({"mdqa": {"models": {}}}, "mdqa.models"),
    ({"mdqa": [1]}, "mdqa"),
    ({"flenqa": {"styles": []}}, "flenqa.styles"),
    ({"general": {"tasks": {"nq_opn": {}}}}, "general.tasks.nq_opn"),
    ({"general": {"tasks": {"nq_open": {}}, "baseline": "finetuned"}}, "general.baseline"),
    ({"general": {"tasks": {"nq_open": {}}, "harness_crosscheck": ["original"]}}, "general.harness_crosscheck"),
    ({"backend": {"kind": "openai"}, "models": {"original": {"model": "gpt-x"}}}, "backend.kind"),
    ({"paper_rows": {"finetuned": "key-value"}}, "paper_rows.finetuned"),
    ({"paper_rows": {"ghost": "IN2"}}, "paper_rows.ghost"),
])
def test_bad_params_name_the_field(over, field):
    with pytest.raises(ParamError, match=rf"^{field.replace('.', '[.]')}: "):
        from_mapping(notebooks.BaselinesNotebookParams, _params(**over))


def test_no_baselines_profile_validates_without_match():
    P = from_mapping(notebooks.BaselinesNotebookParams, {
        "profile": "paper-gpt35", "models": {"original": {"model": "gpt-3.5-turbo-1106"}},
        "backend": {"kind": "openai"}, "baselines": {}, "mdqa": None, "flenqa": None, "general": None})
    assert P.mdqa_params() is None and P.flenqa_params() is None and P.general_params() is None
    assert study.claims(P) == []


def test_token_matching_table():
    class B:
        def __init__(self, kind, total, lo, hi, n):
            self.config = bl.BaselineConfig(kind=kind)
            self.tokens = {"n": n, "total_tokens": total, "min": lo, "max": hi, "mean": total / n}

    rows = study.token_matching_table("synthetic", [100, 110, 120], {"a": B("niah", 330, 100, 120, 3),
                                                                  "b": B("mdqa", 360, 60, 120, 4)})
    assert [r["set"] for r in rows] == ["synthetic", "a", "b"] and rows[0]["total_tokens"] == 330
    assert rows[1]["within_tolerance"] and rows[1]["in_synthetic_range"] and rows[1]["ratio_to_synthetic"] == 1.0
    assert not rows[2]["within_tolerance"] and not rows[2]["in_synthetic_range"]


def test_table2_deltas_and_claims():
    P = from_mapping(notebooks.BaselinesNotebookParams, _params(paper_rows={"finetuned": "key-value, with template"}))
    deltas = [{"model": "needle", "task": "triviaqa", "metric": "em", "n": 10, "delta": -0.05, "ci_low": -0.09,
               "ci_high": -0.01},
              {"model": "finetuned", "task": "nq_open", "metric": "em", "n": 10, "delta": 0.0, "ci_low": -0.1,
               "ci_high": 0.1},
              {"model": "finetuned", "task": "nq_open", "metric": "contains", "n": 10, "delta": 0.0, "ci_low": -0.1,
               "ci_high": 0.1}]
    beside = study.table2_deltas(P, deltas)
    assert len(beside) == 2  # headline metrics only
    assert beside[0]["paper_delta_points"] == pytest.approx(41.30 - 47.63)
    assert beside[1]["paper_delta_points"] == pytest.approx(11.98 - 11.61)
    mdqa = [{"setting": "derived (random distractors)", "model": "finetuned", "n_pairs": 2, "delta_correct": 0.5,
             "ci_low": 0.1, "ci_high": 0.9},
            {"setting": "derived (random distractors)", "model": "MDQA", "n_pairs": 2, "delta_correct": 0.0,
             "ci_low": -0.5, "ci_high": 0.5},
            {"setting": "retrieved distractors (LitM)", "model": "finetuned", "n_pairs": 2, "delta_correct": 0.5,
             "ci_low": 0.1, "ci_high": 0.9}]
    verdicts = {(c["model"], c["artifact"]): c["verdict"] for c in study.claims(P, mdqa, [], deltas)}
    assert verdicts == {("finetuned", "fig8"): "holds", ("MDQA", "fig5"): "inconclusive",
                        ("needle", "table2"): "holds",
                        # "loses nothing" with a CI reaching -10 points: a loss larger than the paper's smallest
                        ("finetuned", "table2"): "inconclusive"}
    # at the floor (both models answer nothing), a baseline's "loses" claim cannot be tested either
    floor = [{"model": "needle", "task": "nq_open", "metric": "em", "n": 10, "value": 0.0, "baseline_value": 0.0,
              "delta": 0.0, "ci_low": 0.0, "ci_high": 0.0}]
    assert [c["verdict"] for c in study.claims(P, [], [], floor)] == [paper.AT_FLOOR]
    # ... unless the task's floor metric has signal: the claim is then judged again on it, named in the claim
    lenient = {"model": "needle", "task": "nq_open", "metric": "contains", "n": 10, "value": 0.1,
               "baseline_value": 0.3, "delta": -0.2, "ci_low": -0.35, "ci_high": -0.05}
    judged = study.claims(P, [], [], floor + [lenient])
    assert [(c["verdict"], c["delta"]) for c in judged] == [(paper.AT_FLOOR, 0.0), ("holds", pytest.approx(-20))]
    assert judged[1]["claim"].endswith("(contains; em is 0 for both models)")


def test_prepare_task_excludes_trained_on_questions():
    from kvlib.tasks import general
    from kvlib.tasks.contamination import question_key

    full = general.prepare_task("nq_open", {"max_examples": 3}, seed=0)
    used = {question_key(full.items[0].question)}
    task = general.prepare_task("nq_open", {"max_examples": 3}, seed=0, exclude_questions=used)
    assert dict(task.report.notes)["excluded_trained_on"] == 1 and len(task.items) == 3
    assert all(question_key(i.question) not in used for i in task.items)
    assert "excluded_trained_on: 1" in task.report.summary()


def test_answer_format_of_a_restating_baseline():
    """MultidocQA's trained reply quotes, then answers after a marker: its final answer is what follows the marker,
    a reply cut inside its quotes answered nothing, a direct reply is its own answer; other kinds have no format."""
    from kvlib.tasks.synthetic import load_template

    fmt = study.answer_format("multidocqa")
    assert fmt == study.AnswerFormat("The relevant original text:", "So the answer is:")
    reply = load_template("baseline_multidocqa.answer").format(quotes='Document [2]: "Paris is in France."',
                                                                answer="Paris")
    assert fmt.final_answer(reply) == "Paris"
    assert fmt.final_answer('The relevant original text:\nDocument [2]: "Paris is') == ""
    assert fmt.final_answer("Paris, of course.") == "Paris, of course."
    assert [study.answer_format(k) for k in ("mdqa", "in2", "niah")] == [None, None, None]


def test_mdqa_answer_rules_budget_the_longest_target(tmp_path):
    """A restating baseline gets the MDQA budget plus its longest training target (tokens); others get none."""
    from kvlib.tasks.synthetic import Sample, write_split

    P = from_mapping(notebooks.BaselinesNotebookParams, _params(
        baselines={"MultidocQA": {"kind": "multidocqa"}, "needle": {"kind": "niah"}}, data_dir=str(tmp_path)))
    samples = [Sample(prompt="p", answer="a", meta={"id": str(i), "n_tokens": 9, "draws": 1, "n_answer_tokens": n})
               for i, n in enumerate((7, 40))]
    write_split(P.baseline_dir("MultidocQA"), "train", samples)
    rules = study.mdqa_answer_rules(P)
    assert list(rules) == ["MultidocQA"]
    assert rules["MultidocQA"] == (study.answer_format("multidocqa"), P.mdqa_params().max_new_tokens + 40)
    table = study.answer_format_table([
        {"model": "MultidocQA", "setting": "s", "response": "The relevant original text:\nX\nSo the answer is: Y",
         "correct": 1.0, "max_new_tokens": 140},
        {"model": "MultidocQA", "setting": "s", "response": "The relevant original text:\nX", "correct": 0.0,
         "max_new_tokens": 140},
        {"model": "original", "setting": "s", "response": "Y", "correct": 1.0, "max_new_tokens": 100},
        {"model": "original", "setting": "s", "response": None, "correct": None, "max_new_tokens": 100}], P)
    assert table == [
        {"model": "MultidocQA", "setting": "s", "max_new_tokens": 140, "replies": 2, "opened_restatement": 2,
         "reached_answer": 1, "accuracy": 0.5},
        {"model": "original", "setting": "s", "max_new_tokens": 100, "replies": 1, "opened_restatement": 0,
         "reached_answer": 0, "accuracy": 1.0}]
