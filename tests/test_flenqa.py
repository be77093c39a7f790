"""FLenQA (kvlib.tasks.flenqa): the regenerated benchmark is correct by an independent proof, the official format
loads, prompts are the authors', and verdicts parse. No model: only the embedded model's tokenizer (local)
measures lengths. The "different" padding reads the Wikipedia passages of the data directory and is left out,
saying why, when it is absent."""
from __future__ import annotations

import gzip
import json
import re
import zipfile
from collections import Counter, defaultdict

import pytest

from kvlib.tasks import flenqa
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.scoring import parse_true_false
from kvlib.pipeline import notebooks

TOKENIZER = "smollm2-135m-instruct"


# ---------------------------------------------------------------- an independent solver
# Written from the sentence forms alone (kvlib/tasks/templates/flenqa.sentences.txt), not from the generator: it
# reads every sentence of a text, keeps those that state a fact, and decides the question by logic.

NAME = r"[A-Z][a-z]+ [A-Z][a-z]+"
ROOM = r"[a-z]+ [a-z]+"
# lesser -> greater wording of each comparison; a strict order: x lesser y == y greater x
COMPARATIVES = {"younger": "older", "shorter": "taller", "lighter": "heavier", "poorer": "richer",
                "slower": "faster", "weaker": "stronger", "quieter": "louder", "calmer": "busier"}
GREATER = {g: lesser for lesser, g in COMPARATIVES.items()}


def sentences(text: str) -> list[str]:
    """Sentences of each line (a paragraph may end cut mid-sentence; the next line starts afresh)."""
    return [s.strip() for line in text.split("\n") for s in re.findall(r"[^.?!]*[.?!]", line) if s.strip()]


def _less_than(text: str) -> dict[str, set[tuple[str, str]]]:
    """dimension (the lesser word) -> pairs (x, y) with x below y."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for s in sentences(text):
        m = re.fullmatch(rf"({NAME}) is (\w+) than ({NAME})\.", s)
        if m:
            x, word, y = m.groups()
            if word in COMPARATIVES:
                edges[word].add((x, y))
            elif word in GREATER:
                edges[GREATER[word]].add((y, x))
            else:
                raise AssertionError(f"unknown comparison {word!r} in {s!r}")
    return edges


def _reaches(pairs: set[tuple[str, str]], start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        node = todo.pop()
        for x, y in pairs:
            if x == node and y not in seen:
                if y == goal:
                    return True
                seen.add(y)
                todo.append(y)
    return False


def solve_monorel(text: str, question: str) -> bool | None:
    m = re.fullmatch(rf"Is ({NAME}) (\w+) than ({NAME})\?", question)
    assert m, question
    x, word, y = m.groups()
    lesser, (a, b) = (word, (x, y)) if word in COMPARATIVES else (GREATER[word], (y, x))  # asks a < b
    pairs = _less_than(text)[lesser]
    below, above = _reaches(pairs, a, b), _reaches(pairs, b, a)
    assert not (below and above), f"contradictory order between {a} and {b}"
    return True if below else False if above else None


def solve_pir(text: str, question: str) -> bool | None:
    where: dict[str, set[str]] = defaultdict(set)
    looks: dict[tuple[str, str], set[str]] = defaultdict(set)  # (room, "color"/"floor") -> values
    for s in sentences(text):
        if m := re.fullmatch(rf"({NAME}) is in the ({ROOM})\.", s):
            where[m[1]].add(m[2])
        elif m := re.fullmatch(rf"The ({ROOM}) is painted (\w+)\.", s):
            looks[(m[1], "color")].add(m[2])
        elif m := re.fullmatch(rf"The ({ROOM}) has an? (\w+) floor\.", s):
            looks[(m[1], "floor")].add(m[2])
    if m := re.fullmatch(rf"Is ({NAME}) in a room painted (\w+)\?", question):
        person, category, asked = m[1], "color", m[2]
    else:
        m = re.fullmatch(rf"Is ({NAME}) in a room with an? (\w+) floor\?", question)
        assert m, question
        person, category, asked = m[1], "floor", m[2]
    rooms = where[person]
    assert len(rooms) <= 1, f"{person} is in several rooms: {rooms}"
    if not rooms:
        return None
    values = looks[(next(iter(rooms)), category)]
    assert len(values) <= 1, f"a room with several {category}s: {values}"
    return (asked in values) if values else None  # a room has one colour and one floor


def solve_ruletaker(text: str, rule: str, statement: str) -> bool:
    m = re.fullmatch(r"If someone is (\w+) and (\w+) then they are (\w+)\.", rule)
    assert m, rule
    a, b, c = m.groups()
    s = re.fullmatch(rf"({NAME}) is (\w+)\.", statement)
    assert s, statement
    held = {m2[2] for x in sentences(text) if (m2 := re.fullmatch(rf"({NAME}) is (\w+)\.", x)) and m2[1] == s[1]}
    while {a, b} <= held and c not in held:  # forward chaining to the fixed point
        held.add(c)
    return s[2] in held  # "can be derived"


def solve(record: flenqa.FLenQARecord, text: str) -> bool | None:
    if record.task == "MonoRel":
        return solve_monorel(text, record.question)
    if record.task == "PIR":
        return solve_pir(text, record.question)
    return solve_ruletaker(text, record.rule, record.question)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def counter():
    from kvlib.engine.models import load_token_counter

    return load_token_counter(TOKENIZER)


@pytest.fixture(scope="module")
def passages():
    try:
        return flenqa.load_padding_passages()[0]
    except FileNotFoundError as exc:
        pytest.skip(f"no data directory with the LitM oracle file (Wikipedia padding): {exc}")


@pytest.fixture(scope="module")
def config() -> flenqa.FLenQAConfig:
    return from_mapping(flenqa.FLenQAConfig, dict(
        samples_per_task=4, lengths=[250, 500], paddings=["duplicate", "similar", "different"],
        tokenizer=TOKENIZER, similar_pool_problems=40))


@pytest.fixture(scope="module")
def records(config, counter, passages) -> list[flenqa.FLenQARecord]:
    return flenqa.generate_flenqa(config, count_tokens=counter.count, passages=passages)


# ---------------------------------------------------------------- the regenerated benchmark


def test_every_label_is_proved_from_its_key_paragraphs(records):
    assert len(records) == 3 * 4 * 2 * (1 + 4 + 4)  # tasks x problems x lengths x (padding, dispersion)
    for r in records:
        assert solve(r, "\n".join(r.key_paragraphs)) is r.label, r.id
        # the key paragraphs state exactly the released facts, and sit in the mixin where recorded
        for fact, paragraph, pos in zip(r.facts, r.key_paragraphs, r.key_positions):
            assert paragraph.startswith(fact) and r.mixin.split("\n")[pos] == paragraph
        # the padding neither contradicts nor decides anything: the whole mixin proves the same label
        assert solve(r, r.mixin) is r.label, r.id


def test_elaborations_state_no_fact():
    for kind, lines in flenqa._keyed_lines("flenqa.elaborations").items():
        for line in lines:
            assert not re.search(r" is | than |painted|floor", line), (kind, line)


def test_labels_are_balanced(records):
    by = Counter((r.task, r.ctx_size, r.padding, r.dispersion, r.label) for r in records)
    for (task, size, padding, dispersion, label), n in by.items():
        assert by[(task, size, padding, dispersion, not label)] == n == 2


def test_lengths_are_measured_and_within_tolerance(records, config, counter):
    counts = counter.count([r.mixin for r in records])
    for r, n in zip(records, counts):
        assert r.n_tokens == n and r.tokenizer == TOKENIZER
        assert abs(n - r.ctx_size) <= config.length_tolerance, (r.id, n)


def test_dispersions_place_the_key_paragraphs(records):
    for r in records:
        lines = r.mixin.split("\n")
        first, second = r.key_positions
        assert first < second
        if r.dispersion in ("first", "repeated"):
            assert (first, second) == (0, 1)
        elif r.dispersion == "last":
            assert (first, second) == (len(lines) - 2, len(lines) - 1)
        elif r.dispersion == "middle":  # at the padding's halfway mark, give or take one sentence
            before, after = len(" ".join(lines[:first])), len(" ".join(lines[second + 1:]))
            longest = max(len(x) for line in lines for x in sentences(line))
            assert second == first + 1 and abs(before - after) <= 2 * longest, r.id
    randoms = [r.key_positions for r in records if r.dispersion == "random"]
    assert len(set(randoms)) > 1  # really scattered, not one fixed place


def test_padding_kinds(records):
    for r in records:
        padding = [x for i, x in enumerate(r.mixin.split("\n")) if i not in r.key_positions]
        if r.padding == "duplicate":  # copies of the key paragraphs, the last possibly cut after its fact
            assert all(any(k.startswith(x) for k in r.key_paragraphs) for x in padding)
            continue
        names = {part for name in re.findall(NAME, " ".join(r.key_paragraphs)) for part in name.split()}
        for x in padding:  # never the sample's people (not even a shared first or last name) or rooms
            assert not any(n in x for n in names), (r.id, x)
            if r.task == "PIR":
                room = re.search(rf"is in the ({ROOM})\.", r.facts[0] + r.facts[1])[1]
                assert room not in x
        if r.padding == "similar":  # other problems' key paragraphs of the same task
            facts = [x for line in padding for x in sentences(line) if solve_like_fact(r.task, x)]
            assert len(facts) >= len(padding) // 2  # (a paragraph split in the middle has one half without)


def solve_like_fact(task: str, sentence: str) -> bool:
    forms = {"MonoRel": [rf"{NAME} is \w+ than {NAME}\."],
             "PIR": [rf"{NAME} is in the {ROOM}\.", rf"The {ROOM} is painted \w+\.", rf"The {ROOM} has an? \w+ floor\."],
             "Simplified RuleTaker": [rf"{NAME} is \w+\."]}[task]
    return any(re.fullmatch(f, sentence) for f in forms)


def test_longer_mixins_extend_shorter_ones(records):
    by_key = {(r.problem_id, r.padding, r.dispersion, r.ctx_size): r for r in records}
    for (pid, padding, dispersion, size), r in by_key.items():
        if size != 250 or dispersion != "first":
            continue
        short, long = r.mixin.split("\n"), by_key[(pid, padding, dispersion, 500)].mixin.split("\n")
        # same padding stream: the shorter mixin is a prefix of the longer one, line by line, except that
        # its last line is a cut, and so may be the one before it (kvlib.tasks.flenqa._fill trims the previous
        # paragraph to make room for the next one's shortest cut)
        assert len(short) <= len(long)
        differing = [i for i, line in enumerate(short) if line != long[i]]
        assert all(i >= len(short) - 2 for i in differing), (pid, differing, len(short))
        assert all(long[i].startswith(short[i]) for i in differing)


def test_one_per_length_gives_each_problem_one_setting_per_length(counter):
    cfg = from_mapping(flenqa.FLenQAConfig, dict(tasks=["PIR"], samples_per_task=4, lengths=[250, 300, 350],
                                                 paddings=["duplicate", "similar"], variants="one_per_length",
                                                 similar_pool_problems=20, tokenizer=TOKENIZER))
    records = flenqa.generate_flenqa(cfg, count_tokens=counter.count)
    assert Counter((r.problem_id, r.ctx_size) for r in records) == {(p, n): 1 for p in {r.problem_id for r in records}
                                                                     for n in (250, 300, 350)}
    assert len({(r.padding, r.dispersion) for r in records}) == 5  # the settings cycle over problems and lengths


def test_same_seed_same_bytes_other_seed_other_data(tmp_path, counter):
    def make(seed: int, name: str) -> bytes:
        cfg = from_mapping(flenqa.FLenQAConfig, dict(samples_per_task=2, lengths=[250], paddings=["duplicate", "similar"],
                                                     similar_pool_problems=20, seed=seed, tokenizer=TOKENIZER))
        records = flenqa.generate_flenqa(cfg, count_tokens=counter.count)
        path = flenqa.write_flenqa(records, tmp_path / name, {"config": {"seed": seed}})
        assert flenqa.read_flenqa(tmp_path / name) == records  # round trip
        return path.read_bytes()

    first = make(0, "a")
    assert make(0, "b") == first
    assert make(1, "c") != first
    assert all(json.loads(line)["source"] == "regenerated" for line in first.decode().splitlines())


def test_ensure_reuses_data_of_the_same_config(tmp_path, monkeypatch, counter):
    cfg = from_mapping(flenqa.FLenQAConfig, dict(tasks=["MonoRel"], samples_per_task=2, lengths=[250],
                                                 paddings=["duplicate"], tokenizer=TOKENIZER))
    first = flenqa.ensure_flenqa(cfg, tmp_path)
    monkeypatch.setattr(flenqa, "generate_flenqa", lambda *a, **k: pytest.fail("regenerated instead of reused"))
    assert flenqa.ensure_flenqa(cfg, tmp_path) == first


@pytest.mark.parametrize("change, message", [
    ({"samples_per_task": 3}, "samples_per_task: must be even"),
    ({"lengths": []}, "lengths: must not be empty"),
    ({"lengths": [250, 250]}, "lengths: must not repeat"),
    ({"paddings": ["books"]}, "paddings[0]: must be one of"),
    ({"tasks": ["PIR", "RuleTaker"]}, "tasks[1]: must be one of"),
    ({"elaborations": 99}, "elaborations: must be in"),
    ({"sample_per_task": 2}, "did you mean 'samples_per_task'"),
])
def test_config_errors_name_the_field(change, message):
    with pytest.raises(ParamError, match=re.escape(message)):
        from_mapping(flenqa.FLenQAConfig, change, "generation")


def test_too_short_a_length_is_refused_before_any_record(counter):
    cfg = from_mapping(flenqa.FLenQAConfig, dict(tasks=["PIR"], samples_per_task=2, lengths=[60],
                                                 paddings=["duplicate"], tokenizer=TOKENIZER))
    with pytest.raises(ParamError, match=r"lengths: 60 tokens is too short for pir-s0-p00\d: its two key"):
        flenqa.generate_flenqa(cfg, count_tokens=counter.count)


# ---------------------------------------------------------------- the official format


def _official(records: list[flenqa.FLenQARecord]) -> list[dict]:
    return [flenqa.to_official_record(r, global_sample_id=100 + i // 9, sample_id=i // 9)
            for i, r in enumerate(r for r in records if r.padding != "duplicate")]


def _same(loaded: flenqa.FLenQARecord, original: flenqa.FLenQARecord) -> bool:
    fields = ("task", "label", "question", "rule", "mixin", "ctx_size", "padding", "dispersion", "key_paragraphs",
              "key_positions")
    # the release's PIR/MonoRel facts are the key paragraphs; RuleTaker's statements the fact sentences
    facts = original.facts if original.task == "Simplified RuleTaker" else original.key_paragraphs
    return loaded.facts == facts and all(getattr(loaded, f) == getattr(original, f) for f in fields)


def test_official_jsonl_round_trip(records, tmp_path):
    rows = _official(records)
    path = tmp_path / "FLenQA.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(row) + "\n" for row in rows)
    loaded = flenqa.load_flenqa(path)
    originals = [r for r in records if r.padding != "duplicate"]
    assert len(loaded) == len(originals) and all(_same(a, b) for a, b in zip(loaded, originals))
    assert {r.source for r in loaded} == {"official"}  # key paragraphs found again: whole lines, or holding a statement
    assert loaded[0].id == f"official-100-{rows[0]['ctx_size']}-{rows[0]['padding_type']}-{rows[0]['dispersion']}"


def test_official_json_array_zip_and_authors_spelling(records, tmp_path):
    rows = _official(records)[:5]
    rows[0]["label"] = True  # a bool label, as in the parquet
    (tmp_path / "a.json").write_text(json.dumps(rows))
    with zipfile.ZipFile(tmp_path / "FLenQA.zip", "w") as archive:  # the authors' repository ships a zip
        archive.writestr("FLenQA.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    loaded = flenqa.load_flenqa(tmp_path / "a.json")
    assert loaded == flenqa.load_flenqa(tmp_path / "FLenQA.zip") and len(loaded) == 5 and loaded[0].label is True
    ruletaker = next(r for r in _official(records) if r["dataset"] == "Simplified RuleTaker")
    ruletaker["rule"] = [ruletaker["rule"]]  # the authors' notebook documents rule as a list of strings
    (tmp_path / "b.jsonl").write_text(json.dumps(ruletaker) + "\n")
    (loaded,) = flenqa.load_flenqa(tmp_path / "b.jsonl")
    assert loaded.rule == ruletaker["rule"][0] and loaded.padding in ("similar", "different")


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.update(label="maybe"), "label: must be True or False"),
    (lambda r: r.pop("assertion/question"), "assertion/question: required"),
    (lambda r: r.update(dataset="RuleTaker"), "dataset: must be one of"),
    (lambda r: r.update(padding_type="lorem"), "padding_type: must be one of"),
    (lambda r: r.update(ctx_size="250"), "ctx_size: expected an integer"),
    (lambda r: r.update(facts=None), "facts: required"),
    (lambda r: r.update(dispersion="everywhere"), "dispersion: must be one of"),
])
def test_official_record_errors_name_file_line_and_field(records, tmp_path, mutate, message):
    rows = [r for r in _official(records) if r["dataset"] == "PIR"][:3]
    mutate(rows[1])
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(flenqa.FLenQAFormatError, match=re.escape(f"{path}:2: {message}")):
        flenqa.load_flenqa(path)


def test_malformed_official_line_is_named(records, tmp_path):
    rows = _official(records)[:3]
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n{not json\n" + json.dumps(rows[2]) + "\n")
    with pytest.raises(flenqa.FLenQAFormatError, match=re.escape(f"{path}:2: malformed JSON line")):
        flenqa.load_flenqa(path)
    with pytest.raises(FileNotFoundError, match="alonj/FLenQA"):
        flenqa.load_flenqa(tmp_path / "missing.jsonl")


def test_official_parquet(records, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = _official(records)[:6]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "eval.parquet")
    assert [r.id for r in flenqa.load_flenqa(tmp_path / "eval.parquet")] == [
        f"official-{r['global_sample_id']}-{r['ctx_size']}-{r['padding_type']}-{r['dispersion']}" for r in rows]


def test_select_records_filters_and_subsamples(records, config):
    narrow = from_mapping(flenqa.FLenQAConfig, dict(tasks=["PIR"], lengths=[500], paddings=["similar"],
                                                    dispersions=["first", "last"]))
    picked = flenqa.select_records(records, narrow, problems_per_task=3)
    assert {(r.task, r.ctx_size, r.padding) for r in picked} == {("PIR", 500, "similar")}
    assert len({r.problem_id for r in picked}) == 3 and len(picked) == 6


# ---------------------------------------------------------------- prompts (the authors' notebook, verbatim)

AUTHORS = {
    ("PIR", "normal"): "{mixin}\nTrue/False Question: {question}\nAnswer only True or False.\n",
    ("PIR", "cot"): "Show your steps then answer with \u2019true\u2019 or \u2019false\u2019.\n{mixin}\nTrue/False Question: "
                    "{question}\nLet\u2019s work this out in a step by step way to\nbe sure we have the right answer.\n",
    ("MonoRel", "normal"): "Here are some facts. Answer the exact following question based on the text: {question} "
                           "Answer the question as it appears exactly.\n{mixin}\n{question}\nAnswer only True or False.\n",
    ("MonoRel", "cot"): "Here are some facts. Answer the exact following question based on the text: {question} Answer "
                        "the question as it appears exactly.\nShow your steps then answer with \u2019true\u2019 or "
                        "\u2019false\u2019.\n{mixin}\n{question}\nLet\u2019s work this out in a step by step way to be "
                        "sure we have the right answer. Show your work and finally answer with \u2019true\u2019 or "
                        "\u2019false\u2019. The final step should include the exact text of the question and the answer.\n",
    ("Simplified RuleTaker", "normal"): "Answer whether the statement {question} can be derived from the rule and the "
                                        "facts. Answer with either \"True\" or \"False\".\nRule: {rule}\nFacts: {mixin}\n"
                                        "Answer with either \"True or \"False\".\n",
    ("Simplified RuleTaker", "cot"): "Answer whether the statement {question} can be derived from the rule and the "
                                     "facts.\nShow your steps then answer with either \"True\" or \"False\".\nRule: "
                                     "{rule}\nFacts: {mixin}\nAnswer with either \"True or \"False\". Let's work this "
                                     "out in a step by step way to be sure we have the right answer.\n",
}


@pytest.mark.parametrize("task, style", list(AUTHORS))
def test_prompts_are_the_authors(records, task, style):
    record = next(r for r in records if r.task == task)
    expected = AUTHORS[(task, style)].format(question=record.question, mixin=record.mixin, rule=record.rule)
    assert flenqa.build_prompt(record, style) == expected
    (request,) = flenqa.build_requests([record], style)
    assert request == [{"role": "user", "content": expected}]
    with pytest.raises(ValueError, match="style must be one of"):
        flenqa.build_prompt(record, "fewshot")


# ---------------------------------------------------------------- verdicts


@pytest.mark.parametrize("text, expected", [
    ("True", True), ("False.", False), ("  **False**", False), ("'true'", True), ("TRUE", True), ("\u2019false\u2019", False),
    ("", None), ("I cannot tell from the text.", None),
    ("Yes", None), ("No.", None),  # not verdicts, as in the authors' scoring
    ("The statement is not true.", False), ("That isn't true.", False), ("It is untrue.", False),
    ("It is not false.", True),
    ("Falsehood and trueness", None),  # whole words only
    # chain of thought: the final answer after the reasoning
    ("Step 1: Dave is big, so the first condition is true. Step 2: Dave is not kind. Therefore, the answer is False.",
     False),
    ("A is younger than B and B is younger than C, so A is younger than C: true.", True),
    ("The answer is: **True**", True), ("Final answer: false", False), ("The answer is not true", False),
    # an opening verdict wins over words of the explanation
    ("False. The statement 'Erin is round' would be true only if Erin were big.", False),
    # option lists echoed from the prompt are ignored
    ("True/False Question: Is Ann in a room painted red? Answer: True", True),
    ('Answer with either "True or "False". False', False),
    ("Show your steps then answer with \u2019true\u2019 or \u2019false\u2019. Nadia is taller, so it is false", False),
    ("It could be true or false.", None),
])
def test_parse_true_false(text, expected):
    assert parse_true_false(text) is expected


def test_parse_true_false_rejects_non_text():
    with pytest.raises(TypeError, match="must be a str"):
        parse_true_false(None)


def test_unparseable_and_over_length_answers_are_counted_not_dropped(records):
    sample = [r for r in records if r.ctx_size == 250][:4]
    answers = ["True" if sample[0].label else "False", "Maybe.", None, "false" if sample[3].label else "true"]
    rows = flenqa.result_rows(sample, answers, "normal", "m", {"backend": "hf"})
    assert [r["correct"] for r in rows] == [True, False, None, False]  # unparseable: wrong; over length: unscored
    assert [r["unparseable"] for r in rows] == [False, True, False, False]
    assert [r["over_length"] for r in rows] == [False, False, True, False] and rows[0]["backend"] == "hf"
    (table,) = flenqa.accuracy_table(rows, ["model", "style"])
    assert (table["n"], table["n_over_length"], table["n_unparseable"]) == (4, 1, 1)
    assert table["accuracy"] == pytest.approx(1 / 3)  # over the three answered prompts
    assert table["accuracy_ci_low"] <= table["accuracy"] <= table["accuracy_ci_high"]
    (shares,) = flenqa.verdict_shares(rows, ["model", "style"])  # over the three answered prompts
    assert shares["n"] == 3 and shares["unparseable"] == pytest.approx(1 / 3)
    said_true = (sample[0].label is True) + (sample[3].label is False)
    assert shares["said_true"] == pytest.approx(said_true / 3)
    assert shares["said_true"] + shares["said_false"] + shares["unparseable"] == pytest.approx(1)
    assert shares["label_true"] == pytest.approx(sum(r.label is True for r in (sample[0], sample[1], sample[3])) / 3)


def test_a_model_always_saying_true_scores_half_on_balanced_labels(records):
    rows = flenqa.result_rows(records, ["True"] * len(records), "normal", "m")
    (table,) = flenqa.accuracy_table(rows, ["model"])
    (shares,) = flenqa.verdict_shares(rows, ["model"])
    assert shares["said_true"] == 1 and shares["label_true"] == pytest.approx(0.5)
    assert table["accuracy"] == pytest.approx(0.5)


# ---------------------------------------------------------------- notebook params


def test_notebook_params_validate_before_any_work(tmp_path):
    params = from_mapping(notebooks.FLenQANotebookParams, {"generation": {"samples_per_task": 2}})
    assert params.new_tokens("cot") == params.cot_max_new_tokens and params.out_data_dir.parts[-2:] == ("quick", "flenqa")
    with pytest.raises(ParamError, match=r"styles\[0\]: must be one of"):
        from_mapping(notebooks.FLenQANotebookParams, {"styles": ["fewshot"]})
    with pytest.raises(ParamError, match="official_path: file not found"):
        from_mapping(notebooks.FLenQANotebookParams, {"official_path": str(tmp_path / "nope.parquet")})
    with pytest.raises(ParamError, match="generation.samples_per_task: must be even"):
        from_mapping(notebooks.FLenQANotebookParams, {"generation": {"samples_per_task": 5}})


def test_balanced_accuracy_table_puts_a_constant_answer_at_chance():
    """A model that always says "True" scores 50% balanced accuracy (kvlib.tasks.flenqa.FLENQA_CHANCE) even on unbalanced
    labels; over-length prompts are left out, unparseable replies count wrong for both classes."""
    rows = [{"model": "m", "style": "normal", "label": i < 6, "parsed": True, "over_length": False} for i in range(8)]
    rows += [{"model": "m", "style": "normal", "label": False, "parsed": None, "over_length": True}]
    rows += [{"model": "m", "style": "cot", "label": lab, "parsed": p, "over_length": False}
             for lab, p in ((True, True), (True, None), (False, False), (False, False))]
    table = {r["style"]: r for r in flenqa.balanced_accuracy_table(rows, ["style"])}
    assert table["normal"]["n"] == 8 and table["normal"]["balanced_accuracy"] == flenqa.FLENQA_CHANCE == 0.5
    assert table["normal"]["balanced_accuracy_ci_low"] < 0.5 < table["normal"]["balanced_accuracy_ci_high"]
    assert table["cot"]["balanced_accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    (only_true,) = flenqa.balanced_accuracy_table(rows[:6], ["style"])  # one class only: not defined
    assert only_true["balanced_accuracy"] != only_true["balanced_accuracy"]  # NaN
