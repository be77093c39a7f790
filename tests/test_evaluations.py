"""The evaluation runners of notebooks 03 and 07 on real data with a fake backend (no model): MDQA eval sets
and scoring, LitM key-value retrieval, the synthetic position x length grid, paired deltas, params."""
from __future__ import annotations

import gzip
import json

import pytest

from kvlib.engine import data
from kvlib.engine import evaluate
from kvlib.tasks import synthetic as generate
from kvlib.tasks import litm_kv
from kvlib.tasks import mdqa
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.scoring import score_mdqa_answer
from kvlib.pipeline import notebooks


class ScriptedBackend:
    """Answers each prompt by a function of its text; prompts longer than `limit` characters do not fit."""

    name = "scripted"

    def __init__(self, answer, limit: int | None = None):
        self.answer, self.limit = answer, limit

    def identity(self):
        return {"backend": self.name, "model": {"spec": "scripted", "weights_sha256": None}}

    def fits(self, requests, max_new_tokens):
        return [self.limit is None or len(r[-1]["content"]) <= self.limit for r in requests]

    def generate(self, requests, max_new_tokens, on_result=None):
        return [self.answer(r[-1]["content"]) for r in requests]


@pytest.fixture(scope="module")
def sets():
    try:
        data.mdqa_paths()
    except FileNotFoundError as exc:
        pytest.skip(f"MDQA data not available: {exc}")
    return mdqa.build_eval_sets(["random", "retrieved"], 5, 6, question_seed=3, distractor_seed=1)


def test_mdqa_settings_share_questions_and_move_only_the_gold(sets):
    random_set, retrieved = sets["random"], sets["retrieved"]
    assert [e.qid for e in random_set.examples] == [e.qid for e in retrieved.examples]
    assert random_set.label == mdqa.SETTING_RANDOM and retrieved.label == mdqa.SETTING_RETRIEVED
    for example in random_set.examples + retrieved.examples:
        assert len(example.documents) == 5 and example.gold_index == 0
        prompts = dict(mdqa.position_prompts(example, [1, 3, 5]))
        for position, prompt in prompts.items():
            lines = [line for line in prompt.splitlines() if line.startswith("Document [")]
            gold_line = f"Document [{position}](Title: {example.gold.title}) {example.gold.text}"
            assert lines[position - 1] == gold_line and len(lines) == 5
            others = [line.split(") ", 1)[1] for i, line in enumerate(lines) if i != position - 1]
            assert others == [d.text for d in example.distractors]  # same order at every position
        for d in example.distractors:
            assert not mdqa.passage_has_answer(d, example.answers) or example in retrieved.examples
    again = mdqa.build_eval_sets(["random", "retrieved"], 5, 6, question_seed=3, distractor_seed=1)
    assert again["random"].examples == random_set.examples  # deterministic
    assert not random_set.source.startswith("/")  # recorded relative to the data directory


def test_mdqa_first_line_metric():
    assert score_mdqa_answer("Paris\nnot London", ["London"]) == 0.0
    assert score_mdqa_answer("  The answer is Paris.\nfoo", ["paris"]) == 1.0
    with pytest.raises(TypeError):
        score_mdqa_answer(None, ["x"])


def test_evaluate_mdqa_rows_scores_and_over_length(sets):
    s = sets["retrieved"]
    backend = ScriptedBackend(lambda prompt: "zzz", limit=None)
    rows = mdqa.evaluate_mdqa(backend, s, [1, 5], 16, "m")
    assert len(rows) == 2 * len(s.examples) and {r["position"] for r in rows} == {1, 5}
    assert all(r["correct"] == 0.0 and r["backend"] == "scripted" and r["max_new_tokens"] == 16 for r in rows)
    by_question = {e.question: e.answers[0] for e in s.examples}  # a model that knows every answer
    knows = ScriptedBackend(lambda p: by_question[p.split("Question: ")[-1].split("\nAnswer:")[0]])
    rows = mdqa.evaluate_mdqa(knows, s, [2], 16, "m")
    assert all(r["correct"] == 1.0 for r in rows)
    shortest = min(len(p) for e in s.examples for _, p in mdqa.position_prompts(e, [1]))
    rows = mdqa.evaluate_mdqa(ScriptedBackend(lambda p: "x", limit=shortest), s, [1], 16, "m")
    counts = evaluate.count_over_length(rows, ["setting"])
    assert counts[0]["n_items"] == len(s.examples) and counts[0]["n_over_length"] == len(s.examples) - 1
    table = evaluate.summarize(rows, ["setting"], ["correct"])
    assert table[0]["n"] == len(s.examples) and table[0]["correct"] == 0.0  # over the one scored item
    # a model that writes something before its answer is scored on what `final_answer` keeps of each reply
    quoting = ScriptedBackend(lambda p: "Quote: " + by_question[p.split("Question: ")[-1].split("\nAnswer:")[0]])
    rows = mdqa.evaluate_mdqa(quoting, s, [1], 16, "m", final_answer=lambda reply: "")
    assert all(r["correct"] == 0.0 and r["final_answer"] == "" and r["response"].startswith("Quote: ") for r in rows)
    assert "final_answer" not in mdqa.evaluate_mdqa(quoting, s, [1], 16, "m")[0]


def test_paired_deltas():
    rows = [{"model": m, "g": 1, "qid": q, "c": c} for m, q, c in [
        ("base", "a", 0.0), ("base", "b", 1.0), ("base", "c", 0.0), ("ft", "a", 1.0), ("ft", "b", 1.0),
        ("ft", "c", None), ("ft", "d", 1.0)]]
    (row,) = evaluate.paired_deltas(rows, "base", ["g"], "c", "qid")
    assert row["model"] == "ft" and row["n_pairs"] == 2 and row["n_unpaired"] == 2
    from kvlib.engine.stats import paired_binary_difference_ci

    assert row["delta_c"] == 0.5  # items a and b: ft (1, 1) vs base (0, 1); at n = 2 the CI is wide and spans 0
    assert (row["ci_low"], row["ci_high"]) == paired_binary_difference_ci([1, 1], [0, 1])[1:]
    assert row["ci_low"] < 0 < 0.5 < row["ci_high"] <= 1


def test_paired_with_base_pairs_items_both_scored_in_the_models_order():
    rows = [{"model": m, "g": g, "qid": q, "c": c} for m, g, q, c in [
        ("base", 1, "a", 0.0), ("base", 1, "b", None), ("base", 1, "c", 1.0), ("ft", 1, "c", 0.0), ("ft", 1, "a", 1.0),
        ("ft", 1, "b", 1.0), ("base", 2, "a", 1.0), ("other", 2, "a", 0.0), ("other", 2, "z", 0.0)]]
    paired = evaluate.paired_with_base(rows, "base", ["g"], "c", "qid")
    # "b": base did not score it; items stay in ft's row order (c before a), not the base's
    assert paired[(1,)] == {"ft": ([("c", 0.0, 1.0), ("a", 1.0, 0.0)], 1)}
    assert paired[(2,)] == {"other": ([("a", 0.0, 1.0)], 1)}  # "z": the base has no such item
    assert evaluate.paired_with_base(rows, "nobody", [], "c", "qid")[()]["ft"] == ([], 3)


def test_mdqa_params_validation():
    ok = from_mapping(notebooks.MDQANotebookParams, {"models": {"o": {}}, "num_documents": 10, "positions": [1, 10]})
    assert ok.positions == [1, 10]
    for bad, message in [({"positions": [0]}, "positions: every position"), ({"settings": ["rnd"]}, "settings"),
                         ({"num_documents": 30}, "num_documents"), ({"models": {}}, "models: at least one"),
                         ({"models": {"x": {"run": "nope"}}}, "models.x.run: 'nope' is not a run")]:
        with pytest.raises(ParamError, match=message):
            from_mapping(notebooks.MDQANotebookParams, {"models": {"o": {}}, **bad})


def _kv_file(tmp_path, records, name="kv-retrieval-3_keys.jsonl.gz"):
    path = tmp_path / name
    with gzip.open(path, "wt") as fh:
        for r in records:
            fh.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def test_litm_kv_prompt_position_and_metric(tmp_path):
    pairs = [["k1", "v1"], ["k2", "v2"], ["k3", "v3"]]
    (example,), report = litm_kv.load_kv_retrieval(_kv_file(tmp_path, [{"ordered_kv_records": pairs, "key": "k2",
                                                                          "value": "v2"}]))
    assert report.records == 1 and example.gold_index == 1
    assert litm_kv.with_gold_at(example, 3) == [("k1", "v1"), ("k3", "v3"), ("k2", "v2")]
    assert litm_kv.with_gold_at(example, 1, num_pairs=2) == [("k2", "v2"), ("k1", "v1")]
    prompt = litm_kv.format_kv_prompt(litm_kv.with_gold_at(example, 1), "k2")
    assert prompt == ('Extract the value corresponding to the specified key in the JSON object below.\n\n'
                      'JSON data:\n{"k2": "v2",\n "k1": "v1",\n "k3": "v3"}\n\nKey: "k2"\nCorresponding value:')
    assert json.loads(prompt.split("JSON data:\n")[1].split("\n\nKey")[0]) == {"k2": "v2", "k1": "v1", "k3": "v3"}
    assert litm_kv.score_kv_retrieval("The value is V2.", "v2") == 1.0
    assert litm_kv.score_kv_retrieval("v1", "v2") == 0.0
    with pytest.raises(ValueError, match="position"):
        litm_kv.with_gold_at(example, 4)


def test_litm_kv_malformed_lines_name_file_and_line(tmp_path):
    good = {"ordered_kv_records": [["a", "1"], ["b", "2"], ["c", "3"]], "key": "a", "value": "1"}
    for bad, message in [({**good, "key": "z"}, "not among the records"), ({**good, "ordered_kv_records": [["a", "1"]] * 3},
                                                                           "duplicate"), ("{oops", "")]:
        with pytest.raises((litm_kv.KVRetrievalFormatError, ValueError), match=r":2"):
            litm_kv.load_kv_retrieval(_kv_file(tmp_path, [good, bad]))
    with pytest.raises(litm_kv.KVRetrievalFormatError, match="promises 3 pairs"):
        litm_kv.load_kv_retrieval(_kv_file(tmp_path, [{**good, "ordered_kv_records": [["a", "1"], ["b", "2"]]}]))


def test_litm_kv_real_files_and_over_length():
    try:
        path = litm_kv.kv_retrieval_path(75)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    examples, report = litm_kv.load_kv_retrieval(path)
    assert report.records == 500 and all(len(e.pairs) == 75 for e in examples)
    chosen = litm_kv.sample_examples(examples, 3, seed=0)
    assert chosen == litm_kv.sample_examples(examples, 3, seed=0) and len(chosen) == 3
    rows = litm_kv.evaluate_litm_kv(ScriptedBackend(lambda p: p.split('Key: "')[1], limit=2000), chosen, [1, 10],
                                     10, 48, "m")
    assert len(rows) == 6 and all(r["num_pairs"] == 10 for r in rows)
    assert all(r["correct"] == 0.0 for r in rows)  # the key is not the value
    rows = litm_kv.evaluate_litm_kv(ScriptedBackend(lambda p: "x", limit=2000), chosen, [1], None, 48, "m")
    assert all(r["over_length"] and r["correct"] is None for r in rows)  # 75 pairs >> 2000 characters


def test_position_length_grid():
    cfg = generate.GenerationConfig(num_dicts=10, n_train=4, n_eval=2, max_tokens=1200, seed=5)
    grid = generate.position_length_grid(cfg, [4, 9], [0.0, 0.5, 1.0], 2)
    cells = [(s.meta["num_dicts"], s.meta["gold_position"]) for s in grid]
    assert cells == [(4, 1), (4, 1), (4, 3), (4, 3), (4, 4), (4, 4), (9, 1), (9, 1), (9, 5), (9, 5), (9, 9), (9, 9)]
    assert all(f"Dictionary [{s.meta['gold_position']}]" in s.answer for s in grid)
    assert [s.prompt for s in generate.position_length_grid(cfg, [4, 9], [0.0, 0.5, 1.0], 2)] == [s.prompt for s in grid]
    rows = generate.evaluate_kv_grid(ScriptedBackend(lambda p: "no idea"), grid, 32, "m")
    assert {r["relative_position"] for r in rows} == {0.0, 0.5, 1.0} and all(r["value"] == 0 for r in rows)
    # both key-value scorers record which weights answered (02's held-out items: rejudge's evaluated_weights)
    weighed = ScriptedBackend(lambda p: "no idea")
    weighed.identity = lambda: {"backend": "scripted", "model": {"spec": "s", "weights_sha256": "ab" * 32}}
    assert {r["weights_sha256"] for r in generate.evaluate_kv(weighed, grid[:2], 32, "m")} == {"ab" * 32}
    with pytest.raises(ParamError, match="max_tokens"):
        generate.position_length_grid(cfg, [200], [0.0], 1)


def test_kv_notebook_params():
    p = from_mapping(notebooks.KVRetrievalNotebookParams, {
        "profile": "smoke", "models": {"o": {}}, "in_distribution": {"dataset": "simple-template"}, "litm": None,
        "grid": {"dataset": "simple-template", "num_dicts": [4]}})
    assert p.litm is None and p.grid_config().max_tokens == 8000
    for bad, message in [({"litm": {"num_keys": 80}}, "litm.num_keys"),
                         ({"litm": {"num_pairs": 10, "positions": [11]}}, "litm.positions"),
                         ({"grid": {"dataset": "nope"}}, "grid.dataset"),
                         ({"grid": {"dataset": "simple-template", "relative_positions": [1.5]}}, "grid.relative")]:
        with pytest.raises(ParamError, match=message):
            from_mapping(notebooks.KVRetrievalNotebookParams, {
                "profile": "smoke", "models": {"o": {}}, "in_distribution": None, "litm": None, "grid": None, **bad})
    assert [generate.position_bin(p, 20, 4) for p in (1, 5, 6, 20)] == ["1-5", "1-5", "6-10", "16-20"]
    assert [generate.position_bin_index(p, 20, 4) for p in (1, 5, 6, 20)] == [1, 1, 2, 4]


def test_seed_group_deltas_average_seeds_with_both_cis():
    """Three seeds of a finetuned model vs the original: the mean over seeds, a t interval across the per-seed
    means (n_seeds - 1 df, shown only) and the interval claims are judged on (two-stage bootstrap over seeds and
    items, floored by Newcombe) with its p-values; groups then stand in for their members when claims are judged."""
    from scipy import stats

    from kvlib.engine import evaluate
    from kvlib.engine import stats as stats_

    rows = []
    for q in range(10):
        rows.append({"model": "original", "setting": "s", "qid": q, "correct": 0.0})
        for m, p in (("ft-s0", 0.2), ("ft-s1", 0.4), ("ft-s2", 0.6)):
            rows.append({"model": m, "setting": "s", "qid": q, "correct": float(q < 10 * p)})
        rows.append({"model": "other", "setting": "s", "qid": q, "correct": 1.0})
    groups = {"ft": ["ft-s0", "ft-s1", "ft-s2"]}
    (g,) = evaluate.seed_group_deltas(rows, "original", groups, ["setting"], "correct", "qid")
    assert g["group"] == "ft" and g["n_seeds"] == 3 and g["n_items"] == 10 and g["delta"] == pytest.approx(0.4)
    half = stats.t.ppf(0.975, 2) * 0.2 / 3 ** 0.5  # stdev of (0.2, 0.4, 0.6) is 0.2
    assert (g["seed_ci_low"], g["seed_ci_high"]) == (pytest.approx(0.4 - half), pytest.approx(0.4 + half))
    assert 0 < g["ci_low"] < 0.4 < g["ci_high"] <= 1 and g["ci_method"].startswith("two-stage bootstrap")
    floor = stats_.newcombe_test(stats_.soft_table([1, 1, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0], [0.0] * 10))
    assert g["ci_low"] <= floor.ci_low and g["ci_high"] >= floor.ci_high  # never narrower than the per-item floor
    assert g["p_increase"] < 0.025 < g["p_decrease"] and "item_ci_low" not in g
    assert g["per_seed"] == "ft-s0: +0.2000, ft-s1: +0.4000, ft-s2: +0.6000"
    assert (g["value"], g["baseline_value"]) == (pytest.approx(0.4), 0.0)  # so claims can tell a floor from no change
    assert g["baseline_ci_low"] == 0.0 and 0.2 < g["baseline_ci_high"] < 0.35  # Wilson of 0/10
    pooled = evaluate.paired_deltas(rows, "original", ["setting"], "correct", "qid")
    merged = evaluate.with_seed_groups(pooled, [g], groups)
    assert sorted(d["model"] for d in merged) == ["ft", "other"]
    ft = next(d for d in merged if d["model"] == "ft")
    assert ft["delta_correct"] == ft["delta"] == pytest.approx(0.4) and ft["ci_low"] == g["ci_low"]
    assert evaluate.compared_labels(["original", "ft-s0", "ft-s1", "ft-s2", "other"], "original", groups) == ["other", "ft"]
    assert evaluate.compared_labels(["original", "ft-s0", "ft-s1", "ft-s2", "other"], None, groups) == [
        "original", "other", "ft"]


def test_seed_group_means_average_each_item_over_seeds():
    from kvlib.engine import evaluate

    rows = [{"model": m, "id": i, "gold_position": i + 1, "response": "r", "value": v, "exact": None if m == "b" else v}
            for m, vals in (("a", [1.0, 0.0]), ("b", [0.0, 0.0]), ("o", [1.0, 1.0])) for i, v in enumerate(vals)]
    means = evaluate.seed_group_means(rows, {"ab": ["a", "b"]}, ["id"], ["value", "exact"])
    assert [(r["model"], r["id"], r["value"], r["exact"], r["n_seeds"]) for r in means] == [
        ("ab", 0, 0.5, 1.0, 2), ("ab", 1, 0.0, 0.0, 2)]  # None (not scored) is left out of the mean
    assert "response" not in means[0] and means[1]["gold_position"] == 2
    (summary,) = evaluate.summarize(means, ["model"], ["value"])
    assert summary["value"] == pytest.approx(0.25) and summary["n"] == 2


@pytest.mark.parametrize("groups, message", [
    ({"ft": ["a"]}, "at least two distinct"), ({"ft": ["a", "zz"]}, "'zz' is not one of the models"),
    ({"ft": ["original", "a"]}, "is the baseline"), ({"a": ["b", "c"]}, "must differ from the model labels"),
    ({"g1": ["a", "b"], "g2": ["b", "c"]}, "already in seed group 'g1'"),
])
def test_seed_groups_are_validated(groups, message):
    from kvlib.engine import evaluate
    from kvlib.engine.config import ParamError

    with pytest.raises(ParamError, match=message):
        evaluate.check_seed_groups(groups, ["original", "a", "b", "c"])


def test_mdqa_contrast_pairs_questions_across_settings():
    """Fig. 10's contrast: per question, the gain with random distractors minus the gain with retrieved ones (each a
    mean over gold positions), for single models and seed groups, added to the pooled rows when both settings ran."""
    from kvlib.engine import evaluate
    from kvlib.tasks.mdqa import SETTING_CONTRAST, SETTING_RANDOM, SETTING_RETRIEVED

    rows = []
    for q in range(12):
        for pos in (1, 2):
            for model, random_ok, retrieved_ok in (("original", q < 3, q < 3), ("ft", q < 9, q < 3),
                                                   ("s0", q < 9, q < 4), ("s1", q < 8, q < 3)):
                rows.append({"model": model, "setting": SETTING_RANDOM, "position": pos, "qid": f"q{q}",
                             "correct": float(random_ok)})
                rows.append({"model": model, "setting": SETTING_RETRIEVED, "position": pos, "qid": f"q{q}",
                             "correct": None if (model == "ft" and q == 11) else float(retrieved_ok)})
    groups = {"g": ["s0", "s1"]}
    contrast = {r["model"]: r for r in mdqa.mdqa_contrast_deltas(rows, "original", groups, SETTING_RANDOM,
                                                                     SETTING_RETRIEVED)}
    assert set(contrast) == {"ft", "g"} and contrast["ft"]["setting"] == SETTING_CONTRAST
    assert contrast["ft"]["n_pairs"] == 11  # q11 has no retrieved score for ft: left out of the pairing
    assert contrast["ft"]["delta_correct"] == pytest.approx(6 / 11) and contrast["ft"]["ci_low"] > 0
    assert contrast["g"]["delta_correct"] == pytest.approx(((6 - 1) + (5 - 0)) / 2 / 12)
    assert contrast["g"]["ci_method"].startswith("two-stage bootstrap") and contrast["g"]["p_increase"] < 0.05
    pooled, seed_rows = mdqa.mdqa_pooled_deltas(rows, "original", groups)
    assert [(r["model"], r["setting"]) for r in pooled if r["setting"] == SETTING_CONTRAST] == [
        ("ft", SETTING_CONTRAST), ("g", SETTING_CONTRAST)]
    assert len(seed_rows) == 2 and all(r["baseline_ci_high"] > r["baseline_value"] for r in pooled
                                       if r["setting"] != SETTING_CONTRAST)
    only_random = [r for r in rows if r["setting"] == SETTING_RANDOM]
    assert all(r["setting"] == SETTING_RANDOM for r in mdqa.mdqa_pooled_deltas(only_random, "original", {})[0])
