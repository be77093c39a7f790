"""General-ability benchmarks (kvlib.tasks.general, metrics in kvlib.engine.scoring): scoring on hand-made items with
known answers, loaders on small hand-written files (and their errors), the real data files' counts,
subsampling, prompts, and the evaluation loop end to end on fake backends (no model)."""
from __future__ import annotations

import bz2
import json
import math
from pathlib import Path

import pytest

from kvlib.tasks import general as g
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.scoring import exact_match_any, extract_gsm8k_flexible, extract_gsm8k_strict, gsm8k_exact_match, multiple_choice_scores, parse_choice_letter
from kvlib.engine.stats import macro_bootstrap_ci
from kvlib.pipeline import notebooks
from kvlib.report import general_tables

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------- GSM8K extraction


@pytest.mark.parametrize("reply, strict, flexible", [
    ("16 - 3 - 4 = 9. 9 * 2 = 18. The answer is 18.", "18", "18."),
    ("The answer is 1,234.\n", "1,234", "1,234."),  # the pattern's final "." does not match a newline
    ("The answer is $1,234.", "[invalid]", "$1,234."),  # strict allows no "$" (harness pattern)
    ("It got colder by 5 degrees. The answer is -5.", "-5", "-5."),
    ("Half of 7 is 3.5. The answer is 3.5.", "3.5", "3.5."),
    # the harness's strict pattern needs one more character after the number: at the very end it backs off
    ("The answer is 18", "1", "18"),
    ("The answer is 4. Wait, the answer is 6.", "4.", "6."),  # strict: first; flexible: last
    ("I do not know.", "[invalid]", "[invalid]"),
    ("x is 7", "[invalid]", "7"),  # a bare one-digit integer only through the second alternative
])
def test_gsm8k_extraction_follows_the_harness_filters(reply, strict, flexible):
    assert extract_gsm8k_strict(reply) == strict
    assert extract_gsm8k_flexible(reply) == flexible


@pytest.mark.parametrize("extracted, reference, expected", [
    ("18.", "18", 1.0), ("$1,234.", "1234", 1.0), ("1,000", "1000", 1.0), ("-5.", "-5", 1.0),
    ("5.00", "5", 0.0),  # compared as text, as in the harness
    ("1", "18", 0.0), ("[invalid]", "18", 0.0),
])
def test_gsm8k_exact_match_normalisation(extracted, reference, expected):
    assert gsm8k_exact_match(extracted, reference) == expected


def test_gsm8k_item_scoring_cuts_at_the_stop_string():
    spec = g.TASKS["gsm8k"]
    item = g.Item("gsm8k", "0", "q", answers=("1,200",))
    reply = "She earns 1200 dollars. The answer is 1200.\n\nQ: another question? A: The answer is 7."
    scores = g.score_item(spec, item, "generate", response=reply)
    assert scores["answer"].endswith("The answer is 1200.")
    assert (scores["exact_strict"], scores["exact_flexible"]) == (1.0, 1.0)
    wrong = g.score_item(spec, item, "generate", response="The answer is 12. Total 1200")
    assert (wrong["exact_strict"], wrong["exact_flexible"]) == (0.0, 1.0)


# ------------------------------------------------------------------------------ short answers, letters


def test_exact_match_any_uses_squad_normalisation_over_all_aliases():
    aliases = ["Mark Twain", "Samuel Clemens", "Twain, Mark"]
    assert exact_match_any("Mark Twain", aliases) == 1.0
    assert exact_match_any("  the  mark twain!", aliases) == 1.0  # case, articles, punctuation, spaces
    assert exact_match_any("samuel clemens", aliases) == 1.0
    assert exact_match_any("twain mark", aliases) == 1.0  # "Twain, Mark" normalised
    assert exact_match_any("Twain", aliases) == 0.0
    assert exact_match_any("Mark Twain wrote it", aliases) == 0.0
    assert exact_match_any("", ["*"]) == 0.0, "an empty reply never matches, even an alias normalising to ''"
    with pytest.raises(ValueError):
        exact_match_any("x", [])


def test_short_answer_scoring_cuts_at_the_harness_stops():
    spec = g.TASKS["triviaqa"]
    item = g.Item("triviaqa", "t", "Who wrote Tom Sawyer?", answers=("Mark Twain", "Samuel Clemens", "The The"))
    assert g.score_item(spec, item, "generate", response="Mark Twain. He also wrote...")["em"] == 1.0
    assert g.score_item(spec, item, "generate", response="Samuel Clemens, an American")["em"] == 1.0
    cut = g.score_item(spec, item, "generate", response="The author is Mark Twain.\nMore")
    assert (cut["em"], cut["contains"]) == (0.0, 1.0)  # contains: LitM's best_subspan_em on the first line
    other = g.score_item(spec, item, "generate", response="Charles Dickens")
    assert (other["em"], other["contains"]) == (0.0, 0.0), "'The The' normalises to '' and must not match all"


@pytest.mark.parametrize("reply, letter", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("A. 42", "A"), ("B) True, True", "B"),
    ("The answer is (C).", "C"), ("Answer: D", "D"), ("the correct option is B", "B"),
    ("A good guess would be C", None), ("E", None), ("I think it is probably b", None), ("", None),
])
def test_parse_choice_letter(reply, letter):
    assert parse_choice_letter(reply) == letter


# ---------------------------------------------------------------------------- multiple choice, CIs


def test_acc_norm_divides_by_characters_of_the_choice():
    # "ab" (2 chars) at -4 beats "abcdefgh" (8 chars) at -8 by raw log-likelihood, loses per character
    scores = multiple_choice_scores([-4.0, -8.0], ["ab", "abcdefgh"], gold=1)
    assert (scores["pred"], scores["pred_norm"], scores["acc"], scores["acc_norm"]) == (0, 1, 0.0, 1.0)
    # characters, not bytes (lm-eval's acc_norm): "éé" is 2 characters but 4 bytes
    chars = multiple_choice_scores([-3.0, -4.0], ["éé", "abc"], gold=1)
    assert chars["pred_norm"] == 1  # -1.5/char vs -1.33/char; per byte it would have been choice 0
    assert multiple_choice_scores([-1.0, -1.0], ["x", "y"], gold=0)["pred"] == 0, "ties go to the first"
    with pytest.raises(ValueError):
        multiple_choice_scores([-1.0, -2.0], ["a", "b"], gold=2)


def test_hellaswag_item_scoring_reports_both_accuracies():
    spec = g.TASKS["hellaswag"]
    item = g.Item("hellaswag", "0", "ctx", ("short.", "a much longer ending here."), gold=1)
    scores = g.score_item(spec, item, "loglikelihood", logliks=[-5.0, -10.0])
    assert (scores["acc"], scores["acc_norm"]) == (0.0, 1.0)


def test_macro_bootstrap_ci_averages_groups_and_resamples_within_them():
    values, groups = [1, 1, 1, 0], ["a", "a", "a", "b"]
    assert macro_bootstrap_ci(values, groups) == (0.5, 0.5, 0.5), "no variance within groups: no CI width"
    values, groups = [1, 0, 1, 0, 1, 1], ["a", "a", "b", "b", "c", "c"]
    mean, lo, hi = macro_bootstrap_ci(values, groups, seed=3)
    assert math.isclose(mean, (0.5 + 0.5 + 1.0) / 3) and lo <= mean <= hi
    assert macro_bootstrap_ci(values, groups, seed=3) == (mean, lo, hi)
    from kvlib.engine.stats import macro_mean

    assert macro_mean(values, groups) == mean, "the point estimate without resampling"
    with pytest.raises(ValueError):
        macro_bootstrap_ci([1, 0], ["a"])


# ------------------------------------------------------------------------------------------- loaders


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _mmlu_dir(root: Path) -> Path:
    for split, rows in (("test", 3), ("dev", 5)):
        for subject in ("algebra", "world_history"):
            lines = [f"{subject} {split} question {k}?,opt a,opt b,opt c,opt d,{'ABCD'[k % 4]}" for k in range(rows)]
            _write(root / split / f"{subject}_{split}.csv", "\n".join(lines) + "\n")
    return root


def test_mmlu_loader_reads_subjects_and_names_malformed_lines(tmp_path):
    root = _mmlu_dir(tmp_path / "mmlu")
    items, report = g.load_mmlu(root)
    assert report.records == 6 and report.groups == 2
    assert items[0] == g.Item("mmlu", "algebra/0", "algebra test question 0?", ("opt a", "opt b", "opt c", "opt d"),
                              0, group="algebra", source=f"{root / 'test' / 'algebra_test.csv'}:1")
    # a quoted field over two lines: the next record's line number is still right
    bad = _write(root / "test" / "algebra_test.csv", '"two\nlines",a,b,c,d,A\nq,a,b,c,d\n')
    with pytest.raises(g.GeneralDataError, match=rf"{bad}:3: expected 6 columns"):
        g.load_mmlu(root)
    _write(bad, "q,a,b,c,d,E\n")
    with pytest.raises(g.GeneralDataError, match=rf"{bad}:1: the answer must be one of A, B, C, D"):
        g.load_mmlu(root)
    with pytest.raises(FileNotFoundError, match="no .*<subject>_test.csv"):
        g.load_mmlu(tmp_path / "nothing")


def test_mmlu_shots_are_the_first_dev_questions_and_must_exist(tmp_path):
    root = _mmlu_dir(tmp_path / "mmlu")
    shots = g.mmlu_shots(root, ["algebra"], 2)
    assert [s.id for s in shots["algebra"]] == ["algebra/0", "algebra/1"]
    with pytest.raises(g.GeneralDataError, match="needs 5 dev questions for subject 'geometry', found 0"):
        g.mmlu_shots(root, ["geometry"], 5)


HELLASWAG_TEXT = """Roof shingle removal: A man is sitting on a roof. he
3
is using wrap to wrap a pair of skis.
is ripping level tiles off.
is holding a rubik's cube.
starts pulling up roofing on a roof.
Home and Garden: How to clean a grill. Heat the grill.
0
Scrub the grates with a brush.
Eat the grill.
Paint the grill blue.
Sell the grill.
"""


def test_hellaswag_text_loader_restores_capitalisation_and_names_bad_lines(tmp_path):
    path = tmp_path / "hellaswag_val_full.txt.bz2"
    path.write_bytes(bz2.compress(HELLASWAG_TEXT.encode()))
    items, report = g.load_hellaswag(path)
    assert report.records == 2 and dict(report.notes)["ctx_b capitalised (approximation)"] == 1
    assert items[0].question == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].gold == 3 and items[0].choices[3] == "starts pulling up roofing on a roof."
    assert items[1].question == "Home and Garden: How to clean a grill. Heat the grill."
    bad = _write(tmp_path / "bad.txt", HELLASWAG_TEXT.replace("\n0\n", "\nzero\n"))
    with pytest.raises(g.GeneralDataError, match=rf"{bad}:8: expected the gold ending index 0-3"):
        g.load_hellaswag(bad)
    short = _write(tmp_path / "short.txt", "\n".join(HELLASWAG_TEXT.split("\n")[:9]) + "\n")
    with pytest.raises(g.GeneralDataError, match=rf"{short}:7: incomplete item: 3 of its 6 lines"):
        g.load_hellaswag(short)


def test_hellaswag_official_jsonl_gets_the_harness_preprocessing(tmp_path):
    records = [
        {"ind": 4, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
         "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                     "is holding a rubik's cube.", "starts pulling up roofing on a roof."], "label": 3},
        {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to clean a grill [title] Heat the "
         "grill. [step] Let it warm up.", "ctx_b": "", "endings": ["[substeps] Scrub  it.", "b", "c", "d"],
         "label": "0"},
    ]
    path = _write(tmp_path / "hellaswag_val.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    items, report = g.load_hellaswag(path)
    text_items, _ = g.load_hellaswag(_write(tmp_path / "v.txt", HELLASWAG_TEXT))
    assert items[0].question == text_items[0].question == "Roof shingle removal: A man is sitting on a roof. He"
    assert items[0].choices == text_items[0].choices
    assert items[1].question == "Home and Garden: How to clean a grill. Heat the grill. Let it warm up."
    assert items[1].choices[0] == " Scrub it." and items[1].gold == 0
    _write(path, json.dumps({**records[0], "label": None}) + "\n")
    with pytest.raises(g.GeneralDataError, match=rf"{path}:1: label must be an ending index"):
        g.load_hellaswag(path)


def test_gsm8k_loader_takes_the_final_number_and_names_bad_lines(tmp_path):
    path = _write(tmp_path / "test.jsonl", json.dumps({"question": "2+2?", "answer": "2+2=<<2+2=4>>4\n#### 4"}) + "\n"
                  + json.dumps({"question": "Big?", "answer": "so\n#### 1,000"}) + "\n")
    items, report = g.load_gsm8k(path)
    assert report.records == 2 and [i.answers for i in items] == [("4",), ("1,000",)]
    _write(path, json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(g.GeneralDataError, match=rf"{path}:1: the answer has no '#### <final number>'"):
        g.load_gsm8k(path)
    _write(path, json.dumps({"question": "q", "answer": "#### 1"}) + "\n{broken\n" + json.dumps({"a": 1}) + "\n")
    with pytest.raises(ValueError, match=rf"{path}:2: malformed JSON"):
        g.load_gsm8k(path)
    _write(path, json.dumps({"question": "", "answer": "#### 1"}) + "\n")
    with pytest.raises(g.GeneralDataError, match=rf"{path}:1: question must be a non-empty string"):
        g.load_gsm8k(path)


def test_gsm8k_cot_exemplars_are_the_harness_eight():
    shots = g.gsm8k_cot_exemplars()
    assert len(shots) == 8
    assert shots[0].question.startswith("There are 15 trees in the grove.")
    assert all(s.answers[0].rstrip(".").split("The answer is ")[-1].isdigit() for s in shots)


def test_triviaqa_loader_reads_three_shapes_and_undoes_csv_quotes(tmp_path):
    flashrag = [{"id": "test_1", "question": '"Who wrote ""Tom Sawyer""?"', "golden_answers": ["Mark Twain", "Twain"]},
                {"id": "test_2", "question": 'Is "this" kept?', "golden_answers": ["yes"]}]
    items, report = g.load_triviaqa(_write(tmp_path / "t.jsonl", "".join(json.dumps(r) + "\n" for r in flashrag)))
    assert [i.question for i in items] == ['Who wrote "Tom Sawyer"?', 'Is "this" kept?']
    assert dict(report.notes)["csv_quotes_undone"] == 1 and items[0].id == "test_1"
    hf = {"question": "Capital of France?", "question_id": "tc_1",
          "answer": {"aliases": ["Paris", "Paris, France"], "value": "Paris", "normalized_aliases": ["paris"]}}
    items, _ = g.load_triviaqa(_write(tmp_path / "hf.jsonl", json.dumps(hf) + "\n"))
    assert items[0].answers == ("Paris", "Paris, France") and items[0].id == "tc_1"
    official = {"Data": [{"Question": "Capital of Italy?", "QuestionId": "tc_2",
                          "Answer": {"Aliases": ["Rome"], "Value": "Roma"}}], "Version": 1.0}
    items, report = g.load_triviaqa(_write(tmp_path / "dev.json", json.dumps(official)))
    assert items[0].answers == ("Rome", "Roma") and "format: official JSON" in dict(report.notes)
    bad = _write(tmp_path / "bad.jsonl", json.dumps(hf) + "\n" + json.dumps({"question": "q", "answers": ["a"]}) + "\n")
    with pytest.raises(g.GeneralDataError, match=rf"{bad}:2: not a TriviaQA record"):
        g.load_triviaqa(bad)
    dup = _write(tmp_path / "dup.jsonl", json.dumps(flashrag[0]) + "\n" + json.dumps(flashrag[0]) + "\n")
    with pytest.raises(g.GeneralDataError, match="duplicate id 'test_1'"):
        g.load_triviaqa(dup)


def test_nq_open_loader_validates_answers(tmp_path):
    path = _write(tmp_path / "nq.jsonl", json.dumps({"question": "when", "answer": ["1972", "December 1972"]}) + "\n")
    items, report = g.load_nq_open(path)
    assert report.records == 1 and items[0].answers == ("1972", "December 1972") and items[0].id == "0"
    _write(path, json.dumps({"question": "when", "answer": "1972"}) + "\n")
    with pytest.raises(g.GeneralDataError, match=rf"{path}:1: answer must be a non-empty list of strings"):
        g.load_nq_open(path)


def _data_dir() -> Path:
    from kvlib.engine.data import resolve_data_dir

    try:
        return resolve_data_dir()
    except FileNotFoundError as exc:
        pytest.skip(f"no data directory: {exc}")


@pytest.mark.parametrize("name, records, groups", [
    ("mmlu", 14042, 57), ("hellaswag", 10042, 0), ("gsm8k", 1319, 0), ("triviaqa", 1000, 0), ("nq_open", 3610, 0),
])
def test_real_data_files_load_with_the_official_counts(name, records, groups):
    data = _data_dir()
    spec = g.TASKS[name]
    try:
        path = g.task_path(spec, data)
    except FileNotFoundError as exc:
        pytest.skip(f"{name} data absent: {exc}")
    items, report = spec.loader(path)
    assert report.records == len(items) == records and report.groups == groups
    assert len({i.id for i in items}) == records, "ids are unique"
    if name == "mmlu":
        assert sum(len(v) for v in g.mmlu_shots(path, {i.group for i in items}, 5).values()) == 285


# ------------------------------------------------------------------------------------ subsampling


def _items(n_per_group: dict[str, int]) -> list[g.Item]:
    return [g.Item("mmlu", f"{grp}/{k}", f"{grp} q{k}", ("a", "b", "c", "d"), 0, group=grp)
            for grp, n in n_per_group.items() for k in range(n)]


def test_subsample_is_deterministic_ordered_and_seeded():
    items = _items({"": 200})
    a, b = g.subsample(items, 20, seed=0), g.subsample(items, 20, seed=0)
    assert [i.id for i in a] == [i.id for i in b] and len(a) == 20
    assert [i.id for i in a] != [i.id for i in g.subsample(items, 20, seed=1)]
    assert [items.index(i) for i in a] == sorted(items.index(i) for i in a), "original order kept"
    assert g.subsample(items) == items and g.subsample(items, 500) == items
    assert len(g.subsample(items, fraction=0.2)) == 40
    with pytest.raises(ValueError):
        g.subsample(items, 10, fraction=0.5)


def test_stratified_subsample_covers_every_group_proportionally():
    items = _items({"big": 300, "mid": 90, "small": 10})
    chosen = g.subsample(items, 40, seed=0, stratify=True)
    counts = {grp: sum(i.group == grp for i in chosen) for grp in ("big", "mid", "small")}
    assert counts == {"big": 29, "mid": 9, "small": 2}  # 1 each, then the other 37 in proportion to what is left
    few = g.subsample(items, 2, seed=0, stratify=True)
    assert len(few) == 2 and {i.group for i in few} == {"big", "mid"}, "fewer items than groups: largest first"
    assert [i.id for i in g.subsample(items, 40, seed=0, stratify=True)] == [i.id for i in chosen]


# ----------------------------------------------------------------------------------------- prompts


def test_mmlu_prompt_matches_the_harness_layout(tmp_path):
    root = _mmlu_dir(tmp_path / "mmlu")
    task = g.prepare_task("mmlu", {"n_shot": 1, "path": str(root)})
    item = task.items[0]
    context = ("The following are multiple choice questions (with answers) about algebra.\n\n"
               "algebra dev question 0?\nA. opt a\nB. opt b\nC. opt c\nD. opt d\nAnswer: A\n\n"
               "algebra test question 0?\nA. opt a\nB. opt b\nC. opt c\nD. opt d\nAnswer:")
    assert g.loglikelihood_requests(task.spec, item, task.shots_for(item)) == [
        (context, " A"), (context, " B"), (context, " C"), (context, " D")]
    messages = g.build_prompt(task.spec, item, task.shots_for(item), "multiturn")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"].startswith("The following are") and messages[1]["content"] == "A"
    single = g.build_prompt(task.spec, item, task.shots_for(item), "single_turn")
    assert single == [{"role": "user", "content": context}]


def test_zero_shot_qa_prompts_are_the_harness_text():
    tqa = g.Item("triviaqa", "1", "Who wrote Hamlet?", answers=("Shakespeare",))
    assert g.build_prompt(g.TASKS["triviaqa"], tqa, ()) == [
        {"role": "user", "content": "Question: Who wrote Hamlet??\nAnswer:"}]  # the harness appends "?"
    nq = g.Item("nq_open", "1", "who wrote hamlet", answers=("Shakespeare",))
    assert g.build_prompt(g.TASKS["nq_open"], nq, ())[0]["content"] == "Answer these questions:\n\nQ: who wrote hamlet?\nA:"


def test_truncate_at_stop_uses_the_earliest_stop():
    assert g.truncate_at_stop(" Paris, France. Yes", ("\n", ".", ",")) == "Paris"
    assert g.truncate_at_stop("no stop here", ("Q:",)) == "no stop here"


# ------------------------------------------------------------------------------------ params


def _params(**overrides):
    data = {"profile": "smoke", "params_root": str(ROOT / "params"),
            "models": {"original": {"model": "smollm2-135m-instruct"}}, "tasks": {"mmlu": {"max_examples": 5}}}
    return from_mapping(notebooks.GeneralBenchmarksNotebookParams, {**data, **overrides})


@pytest.mark.parametrize("overrides, message", [
    ({"tasks": {"mmlux": {}}}, r"tasks\.mmlux: unknown benchmark \(did you mean 'mmlu'\?\)"),
    ({"tasks": {"mmlu": {"n_shot": 6}}}, r"tasks\.mmlu\.n_shot: mmlu has 5 few-shot examples"),
    ({"tasks": {"triviaqa": {"n_shot": 1}}}, r"tasks\.triviaqa\.n_shot: triviaqa has 0 few-shot"),
    ({"tasks": {"mmlu": {"max_examples": 5, "fraction": 0.2}}}, r"tasks\.mmlu\.fraction: give max_examples or"),
    ({"tasks": {"hellaswag": {"variant": "generate"}}}, r"tasks\.hellaswag\.variant: hellaswag runs as"),
    ({"tasks": {"mmlu": {"max_exampels": 5}}}, r"tasks\.mmlu\.max_exampels: unknown parameter \(did you mean"),
    ({"baseline": "base"}, r"baseline: must be one of the models"),
    ({"tasks": {}}, r"tasks: at least one benchmark"),
    ({"models": {"original": {"model": "gpt-3.5-turbo-1106", "kind": "openai"}},
      "tasks": {"mmlu": {"variant": "loglikelihood"}}}, r"tasks\.mmlu\.variant: model 'original' is a openai"),
])
def test_params_fail_early_naming_the_field(overrides, message):
    with pytest.raises(ParamError, match=message):
        _params(**overrides)


def test_headline_keys_name_each_benchmark_once_in_first_seen_order():
    keys = g.headline_keys(["nq_open", "mmlu", "nq_open", "gsm8k", "mmlu"])
    assert keys == [{"task": "nq_open", "metric": "em"}, {"task": "mmlu", "metric": "acc"},
                    {"task": "gsm8k", "metric": "exact_strict"}]
    assert g.headline_keys([]) == []
    assert all(g.HEADLINES[k["task"]] == k["metric"] for k in keys)
    with pytest.raises(KeyError):
        g.headline_keys(["not_a_benchmark"])


def test_params_list_tasks_in_declaration_order():
    p = _params(tasks={"nq_open": {}, "mmlu": {"fraction": 0.2}})
    assert [spec.name for spec, _ in p.task_list()] == ["mmlu", "nq_open"]


# ----------------------------------------------------------------------- evaluation with fake backends


class FakeChat:
    """A chat-only backend (no log-likelihoods): replies from a function of the last user message."""

    name = "fake-chat"

    def __init__(self, reply, too_long: str | None = None):
        self.reply, self.too_long, self.calls = reply, too_long, []

    def identity(self) -> dict:
        return {"backend": self.name, "model": "fake"}

    def fits(self, requests, max_new_tokens):
        return [not (self.too_long and self.too_long in r[-1]["content"]) for r in requests]

    def generate(self, requests, max_new_tokens, on_result=None):
        self.calls.append(max_new_tokens)
        return [self.reply(r[-1]["content"]) for r in requests]


class FakeLM(FakeChat):
    """Also scores continuations: log-likelihood from a function of (context, continuation)."""

    name = "fake-lm"

    def __init__(self, reply, ll, too_long: str | None = None):
        super().__init__(reply, too_long)
        self.ll = ll

    def loglikelihood(self, pairs, on_result=None):
        from kvlib.engine.backends import ContextLengthError

        over = [i for i, (c, _) in enumerate(pairs) if self.too_long and self.too_long in c]
        if over:
            raise ContextLengthError(over, [9999] * len(over), 2048, "context + continuation")
        return [(self.ll(c, k), False) for c, k in pairs]


@pytest.fixture()
def tiny_tasks(tmp_path):
    root = _mmlu_dir(tmp_path / "mmlu")
    hs = tmp_path / "hs.txt"
    hs.write_text(HELLASWAG_TEXT, encoding="utf-8")
    qa = _write(tmp_path / "nq.jsonl", "".join(json.dumps(r) + "\n" for r in [
        {"question": "capital of france", "answer": ["Paris"]},
        {"question": "capital of italy", "answer": ["Rome", "Roma"]},
        {"question": "a question far TOO LONG", "answer": ["x"]}]))
    gsm = _write(tmp_path / "gsm.jsonl", json.dumps({"question": "What is 6 times 7?", "answer": "#### 42"}) + "\n")
    return {"mmlu": g.prepare_task("mmlu", {"path": str(root)}),
            "hellaswag": g.prepare_task("hellaswag", {"path": str(hs)}),
            "nq_open": g.prepare_task("nq_open", {"path": str(qa)}),
            "gsm8k": g.prepare_task("gsm8k", {"path": str(gsm), "n_shot": 2})}


def _gold_letter_ll(context, continuation):
    # prefers the letter written after "question <k>?" in our tiny MMLU files: k=0 -> A, 1 -> B, 2 -> C;
    # elsewhere (HellaSwag) the shortest continuation
    if "question " not in context:
        return -float(len(continuation))
    k = int(context.rsplit("question ", 1)[1][0])
    return -1.0 if continuation.strip() == "ABCD"[k % 4] else -5.0


def test_evaluation_end_to_end_on_a_log_likelihood_backend(tiny_tasks):
    good = FakeLM(lambda q: "The answer is 42." if "6 times 7" in q else ("Paris." if "france" in q else "Milan"),
                  _gold_letter_ll, too_long="TOO LONG")
    bad = FakeLM(lambda q: "The answer is 41.", lambda c, k: -1.0 if k == " D" else -len(k), too_long="TOO LONG")
    rows = []
    for label, backend in (("original", good), ("finetuned", bad)):
        for task in tiny_tasks.values():
            rows += g.evaluate_task(backend, task, label)
    by = {(r["model"], r["task"], r["id"]): r for r in rows}
    assert by[("original", "mmlu", "algebra/1")]["answer"] == "B" and by[("original", "mmlu", "algebra/1")]["acc"] == 1
    assert by[("original", "nq_open", "2")]["skipped"] == "over context length", "reported, not dropped"
    assert by[("original", "gsm8k", "0")]["exact_strict"] == 1.0 and good.calls[-1] == 256
    assert by[("original", "mmlu", "algebra/0")]["backend"] == "fake-lm", "result_fields on every row"

    summary = {(s["model"], s["task"], s["metric"]): s for s in g.summarize_benchmarks(rows)}
    assert summary[("original", "mmlu", "acc")]["value"] == 1.0
    assert summary[("original", "mmlu", "acc_macro")]["groups"] == 2
    assert summary[("finetuned", "mmlu", "acc")]["value"] == 0.0  # always D; gold is A/B/C
    nq = summary[("original", "nq_open", "em")]
    assert (nq["n"], nq["n_skipped"], nq["value"]) == (2, 1, 0.5)
    hs = summary[("original", "hellaswag", "acc_norm")]
    assert hs["variant"] == "loglikelihood" and hs["n"] == 2

    deltas = {(d["task"], d["metric"]): d for d in g.benchmark_deltas(rows, "original")}
    assert deltas[("mmlu", "acc")]["delta"] == -1.0 and deltas[("mmlu", "acc")]["n"] == 6
    assert deltas[("mmlu", "acc_macro")]["delta"] == -1.0
    assert deltas[("gsm8k", "exact_strict")]["delta"] == -1.0
    assert deltas[("nq_open", "em")]["n"] == 2, "pairs only items both models scored"

    table = general_tables.headline_table(g.summarize_benchmarks(rows), g.benchmark_deltas(rows, "original"), "original")
    assert list(table["row"]) == ["original", "finetuned", "finetuned - original"]
    assert table.loc[0, "MMLU (acc)"] == "100.0 [61.0, 100.0] (n=6)"  # 6/6: Wilson lower bound 0.610
    assert table.loc[2, "MMLU (acc)"].startswith("-100.0")


def test_chat_only_backend_runs_mmlu_generatively_and_reports_hellaswag_not_run(tiny_tasks):
    chat = FakeChat(lambda q: "The answer is (B)." if "question 1?" in q else "I am not sure")
    rows = g.evaluate_task(chat, tiny_tasks["mmlu"], "api") + g.evaluate_task(chat, tiny_tasks["hellaswag"], "api")
    mmlu = [r for r in rows if r["task"] == "mmlu"]
    assert {r["variant"] for r in mmlu} == {"generate"}
    assert sum(r["acc"] for r in mmlu) == 2 and sum(r["parsed"] for r in mmlu) == 2
    hs = [r for r in rows if r["task"] == "hellaswag"]
    assert {r["skipped"] for r in hs} == {"no log-likelihoods on this backend"}
    summary = {(s["task"], s["metric"]): s for s in g.summarize_benchmarks(rows)}
    assert summary[("hellaswag", "acc")]["n"] == 0 and math.isnan(summary[("hellaswag", "acc")]["value"])
    assert summary[("mmlu", "parsed")]["value"] == pytest.approx(2 / 6)


def test_cached_backend_wrapping_a_chat_api_counts_as_without_log_likelihoods():
    class Wrapper:  # like kvlib.engine.cache.CachedBackend: always has loglikelihood, wraps `backend`
        def __init__(self, backend):
            self.backend = backend

        def loglikelihood(self, pairs):
            raise NotImplementedError

    assert not g.supports_loglikelihood(Wrapper(FakeChat(str)))
    assert g.supports_loglikelihood(Wrapper(FakeLM(str, lambda c, k: 0.0)))


def test_conventions_table_lists_every_prepared_task(tiny_tasks):
    table = general_tables.conventions_table(list(tiny_tasks.values()))
    assert list(table["benchmark"]) == ["MMLU", "HellaSwag", "NQ-Open", "GSM8K"]
    assert table.loc[0, "shots"].startswith("5: dev split")
    assert table.loc[0, "prompt of a test item"].startswith("The following are multiple choice questions (with "
                                                            "answers) about {subject}.\\n\\n{question}\\nA. {A}")
    assert table.loc[0, "metrics by variant"] == "loglikelihood: acc; generate: acc, parsed (+ macro over subjects)"
    assert "cut at ['Q:']" in table.loc[3, "generation"]
    assert table.loc[3, "prompt format"] == ("local models: raw text, no chat template (harness default); "
                                             "chat APIs: chat template, shots multiturn")
    assert table.loc[1, "prompt format"] == "raw text (log-likelihood)"
    assert set(general_tables.paper_reference_table()["MMLU"].dropna()) >= {53.42, 68.07}


def test_seed_group_claims_at_the_em_floor_fall_back_to_contains():
    """Three seeds and the original all score em 0 on TriviaQA: the seed-averaged claim is untestable on em (the
    original does not clear TriviaQA's floor; not a "holds" from a collapsed [0, 0] CI) and is judged on `contains`,
    the task's declared floor metric, where the original does clear it."""
    from kvlib.engine import evaluate
    from kvlib.tasks import general
    from kvlib.report import paper

    rows = []
    for i in range(40):
        for model, contains in (("original", i < 8), ("ft-s0", i < 2), ("ft-s1", i < 3), ("ft-s2", i < 1)):
            rows.append({"model": model, "task": "triviaqa", "variant": "generate", "id": f"q{i}", "skipped": None,
                         "em": 0.0, "contains": float(contains)})
    groups = {"ft": ["ft-s0", "ft-s1", "ft-s2"]}
    seed_rows = general.benchmark_seed_group_deltas(rows, "original", groups)
    assert [(r["task"], r["metric"]) for r in seed_rows] == [("triviaqa", "em"), ("triviaqa", "contains")]
    assert seed_rows[1]["delta"] == pytest.approx((2 + 3 + 1) / 120 - 8 / 40)
    merged = evaluate.with_seed_groups(general.benchmark_deltas(rows, "original"), seed_rows, groups)
    claims = paper.general_claims(merged, ["ft"], {"triviaqa": "em"}, {"triviaqa": "TriviaQA"})
    assert claims[0]["verdict"] == (f"{paper.UNTESTABLE} (the original's em 0.0% [0.0, 8.8] does not clear floor 0% "
                                    f"by 2.19 points)")
    assert claims[1]["verdict"] == "does not hold" and claims[1]["family_size"] == 1
    assert claims[1]["claim"] == "synthetic finetuning loses nothing on TriviaQA (contains; em is 0 for both models)"
    assert claims[1]["ci_method"].startswith("two-stage bootstrap") and claims[1]["original"].startswith("contains 20.0%")
