"""MDQA ("Lost in the Middle") data, prompt, metric and distractor settings (kvlib.tasks.mdqa).

Light: no model. The data tests read the real files of the data directory (kvlib.engine.data.resolve_data_dir)
and skip, saying why, when it is absent.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from importlib import resources

import pytest

from kvlib.engine import data
from kvlib.tasks import mdqa
from kvlib.tasks.mdqa import Document, MDQAExample
from kvlib.engine.scoring import best_subspan_em, normalize_answer
from kvlib.pipeline import notebooks

# LitM src/lost_in_the_middle/prompts/qa.prompt @ 29b8a6d0: the protocol, verbatim (no final newline)
LITM_QA_TEMPLATE = (
    "Write a high-quality answer for the given question using only the provided search results "
    "(some of which might be irrelevant).\n\n{search_results}\n\nQuestion: {question}\nAnswer:"
)
LITM_QA_BLOB = "9a2dae3460719cacb9f94b05374c8efaf41c2295"  # git blob id of that file
LITM_CLOSEDBOOK_BLOB = "1058d398f84828a85e639359a7fc44765a425bae"
POSITIONS = (0, 4, 9, 14, 19)


# ---------------------------------------------------------------- metric


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Beatles!", "beatles"),
        ("  An   apple a day ", "apple day"),
        ("Wilhelm Conrad Röntgen", "wilhelm conrad röntgen"),  # non-ASCII letters stay
        ("the symbol ×", "symbol ×"),  # only ASCII punctuation is dropped
        ("*", ""),
        ("theatre", "theatre"),  # articles only as whole words
        ("the-end", "theend"),  # punctuation goes first, so the article is glued on
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("Wilhelm Conrad Röntgen", ["Wilhelm Conrad Röntgen"], 1.0),
        ("It was WILHELM CONRAD RÖNTGEN, in 1901.", ["Wilhelm Conrad Röntgen"], 1.0),  # case, substring
        ("The Eiffel Tower", ["eiffel tower"], 1.0),  # articles
        ("U.S.A", ["USA"], 1.0),  # punctuation
        ("Röntgen", ["Wilhelm Conrad Röntgen"], 0.0),  # gold must be inside the prediction, not vice versa
        ("Paris", ["London", "paris"], 1.0),  # any of several answers
        ("Berlin", ["London", "Paris"], 0.0),
        ("", ["Paris"], 0.0),  # empty prediction
        ("", ["*"], 1.0),  # LitM quirk: an answer normalising to "" matches everything
        ("1923", ["2"], 1.0),  # substring, not token, semantics
    ],
)
def test_best_subspan_em(prediction, answers, expected):
    assert best_subspan_em(prediction, answers) == expected


@pytest.mark.parametrize("answers", [[], "Paris", None, ("Paris", 3)])
def test_best_subspan_em_rejects_bad_answers(answers):
    with pytest.raises((TypeError, ValueError)):
        best_subspan_em("Paris", answers)
    with pytest.raises(TypeError):
        best_subspan_em(None, ["Paris"])


# ---------------------------------------------------------------- prompt


def _doc(title, text, gold=False, id=None):
    return Document(title, text, id, gold)


def test_templates_are_litm_files_verbatim():
    for name, blob in (("mdqa_qa.prompt.txt", LITM_QA_BLOB), ("mdqa_closedbook.prompt.txt", LITM_CLOSEDBOOK_BLOB)):
        raw = resources.files("kvlib.tasks").joinpath("templates", name).read_bytes()
        assert hashlib.sha1(b"blob %d\0" % len(raw) + raw).hexdigest() == blob, name
    text = resources.files("kvlib.tasks").joinpath("templates", "mdqa_qa.prompt.txt").read_text(encoding="utf-8")
    assert text == LITM_QA_TEMPLATE


def test_format_qa_prompt_matches_litm_layout():
    docs = [_doc("Paris", "Paris is the capital of France."), _doc("Lyon {x}", "A city.", gold=True)]
    expected = LITM_QA_TEMPLATE.replace(
        "{search_results}",
        "Document [1](Title: Paris) Paris is the capital of France.\nDocument [2](Title: Lyon {x}) A city.",
    ).replace("{question}", "what is the capital of france")
    assert mdqa.format_qa_prompt("what is the capital of france", docs) == expected
    assert mdqa.format_closedbook_prompt("who won") == "Question: who won\nAnswer:"
    for question, documents in (("", docs), ("q", []), ("q", [{"title": "t", "text": "x"}])):
        with pytest.raises((TypeError, ValueError)):
            mdqa.format_qa_prompt(question, documents)


# ---------------------------------------------------------------- records and synthetic files


def _example(n=3, gold=0, question="who won"):
    docs = [_doc(f"T{i}", f"text {i}", gold=(i == gold), id=str(i)) for i in range(n)]
    return MDQAExample(question, ["Alice"], docs, gold, mdqa.question_id(question))


def test_example_validation_and_qid():
    with pytest.raises(ValueError, match="must be gold"):
        MDQAExample("q", ["a"], [_doc("t", "x"), _doc("u", "y", gold=True)], 0, "id")
    with pytest.raises(ValueError, match="answers"):
        MDQAExample("q", [], [_doc("t", "x", gold=True)], 0, "id")
    # the id survives case and punctuation changes of the same question
    assert mdqa.question_id("Who won the 1990 World Cup?") == mdqa.question_id("who won the 1990 world cup")


def _write_lines(path, lines, compress=True):
    payload = "".join(lines).encode()
    path.write_bytes(gzip.compress(payload, mtime=0) if compress else payload)
    return path


def test_truncated_and_malformed_synthetic(tmp_path):
    good = json.dumps(mdqa.example_to_record(_example())) + "\n"
    cut = good[: len(good) // 2]
    path = _write_lines(tmp_path / "x.jsonl.gz", [good, good, cut])
    with pytest.raises(ValueError, match=r"x\.jsonl\.gz:3: truncated final line"):
        mdqa.load_mdqa(path)
    with pytest.warns(UserWarning, match="line 3 was truncated"):
        examples, report = mdqa.load_mdqa(path, on_truncated="stop")
    assert (len(examples), report.records, report.truncated_line) == (2, 2, 3)
    # a broken line in the middle is corruption: it raises even in stop mode
    path = _write_lines(tmp_path / "y.jsonl", [good, cut + "\n", good], compress=False)
    with pytest.raises(ValueError, match=r"y\.jsonl:2: malformed JSON"):
        mdqa.load_mdqa(path, on_truncated="stop")
    # a gzip stream cut short is truncation too
    whole = gzip.compress((good * 3).encode(), mtime=0)
    (tmp_path / "z.jsonl.gz").write_bytes(whole[: len(whole) - 12])
    with pytest.warns(UserWarning):
        examples, report = mdqa.load_mdqa(tmp_path / "z.jsonl.gz", on_truncated="stop")
    assert report.truncated and len(examples) < 3
    with pytest.raises(ValueError, match="on_truncated"):
        mdqa.load_mdqa(path, on_truncated="skip")


def test_invalid_records_name_file_and_line(tmp_path):
    good = mdqa.example_to_record(_example())
    no_gold = json.loads(json.dumps(good))
    no_gold["ctxs"][0]["isgold"] = False
    bad_type = json.loads(json.dumps(good))
    bad_type["ctxs"][1]["title"] = 5
    for record, message in ((no_gold, "exactly one"), (bad_type, r"ctxs\[1\]\.title")):
        path = _write_lines(tmp_path / "r.jsonl", [json.dumps(good) + "\n", json.dumps(record) + "\n"], False)
        with pytest.raises(mdqa.MDQAFormatError, match=rf"r\.jsonl:2: .*{message}"):
            mdqa.load_mdqa(path)
    # the file name promises 20 documents with the gold at 4
    path = _write_lines(tmp_path / "nq-open-20_total_documents_gold_at_4.jsonl", [json.dumps(good) + "\n"], False)
    with pytest.raises(mdqa.MDQAFormatError, match="promises 20 documents with gold at 4"):
        mdqa.load_mdqa(path)


def test_retrieval_layout_follows_litm_builder(tmp_path):
    """A retrieval-results record (the assumed layout of LitM's random-documents file) -> gold + top
    K-1 non-answer passages, gold inserted at the index: LitM's make_qa_data_from_retrieval_results."""
    ctxs = [{"id": str(i), "title": f"T{i}", "text": f"x{i}", "score": "1.5", "hasanswer": i in (1, 3)}
            for i in range(6)]
    gold = {"title": "G", "long_answer": "g", "chunked_long_answer": "gold text", "short_answers": ["a"]}
    record = {"question": "q?", "answers": ["a"], "ctxs": ctxs, "nq_annotated_gold": gold}
    path = _write_lines(tmp_path / "random.jsonl", [json.dumps(record) + "\n"], False)
    (example,), report = mdqa.load_mdqa(path)
    assert report.layout == "retrieval"
    variant = mdqa.k_document_variant(example, 3, gold_position=1)
    assert [d.id for d in variant.documents] == ["0", None, "2"]
    assert [d.original_retrieval_index for d in variant.documents] == [0, None, 2]
    assert variant.gold.text == "gold text" and variant.gold_index == 1


# ---------------------------------------------------------------- the real files


@pytest.fixture(scope="module")
def paths():
    try:
        return data.mdqa_paths()
    except FileNotFoundError as exc:
        pytest.skip(f"MDQA data not available: {exc}")


@pytest.fixture(scope="module")
def oracle(paths):
    examples, report = mdqa.load_mdqa(paths["oracle"])
    assert report.records == 2655 and not report.truncated
    return examples


@pytest.fixture(scope="module")
def subset(paths):
    if paths["retrieved_20docs_source"] != "subset":
        pytest.skip("the data directory holds LitM's complete 20-document files, not the 441-question subset")
    loaded = {pos: mdqa.load_mdqa(path) for pos, path in paths["retrieved_20docs"].items()}
    assert all(report.records == 441 and not report.truncated for _, report in loaded.values())
    return {pos: examples for pos, (examples, _) in loaded.items()}


@pytest.fixture(scope="module")
def pool(subset, oracle):
    return mdqa.build_distractor_pool(subset[0], oracle)


def test_missing_files_name_the_source(tmp_path):
    (tmp_path / "mdqa").mkdir()
    with pytest.raises(FileNotFoundError, match=r"nq-open-oracle\.jsonl\.gz.*lost-in-the-middle"):
        data.mdqa_paths(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"30_total_documents_gold_at_29.*nelson-liu/lost-in-the-middle"):
        data.mdqa_official_path(30, 29, tmp_path)
    with pytest.raises(ValueError, match="gold_index"):
        data.mdqa_official_path(20, 20, tmp_path)


def test_oracle_and_subset_files(oracle, subset):
    assert all(len(e.documents) == 1 and e.gold_index == 0 for e in oracle)
    assert len(mdqa.question_ids(oracle)) == 2655
    for pos, examples in subset.items():
        assert all(len(e.documents) == 20 and e.gold_index == pos for e in examples)
        # the 441 are the first 441 oracle questions, with the oracle's gold passage
        assert [e.qid for e in examples] == [e.qid for e in oracle[:441]]
        assert all(e.gold == o.gold for e, o in zip(examples, oracle))
        # LitM's builder: same distractors, same order, only the gold moves
        assert all(mdqa.place_gold(e0, pos) == e for e0, e in zip(subset[0], examples))


@pytest.mark.parametrize("which", ["oracle", 19])
def test_round_trip(which, paths, oracle, subset, tmp_path):
    if which == "oracle":
        source, examples = paths["oracle"], oracle
    else:
        source, examples = paths["subset_20docs"][which], subset[which]
    out = mdqa.write_mdqa(examples, tmp_path / "out.jsonl.gz")
    again, report = mdqa.load_mdqa(out)
    assert again == examples and report.records == len(examples)
    # the writer reproduces LitM's file format exactly (the decompressed text is identical)
    assert gzip.decompress(out.read_bytes()) == gzip.decompress(source.read_bytes())
    assert mdqa.write_mdqa(examples, tmp_path / "again.jsonl.gz").read_bytes() == out.read_bytes()


def test_partial_copy_truncated_line(paths, subset):
    if paths["partial_copy"] is None:
        pytest.skip("the truncated third-party file is not in the data directory")
    with pytest.raises(ValueError, match=r"scored\.jsonl\.gz:442: truncated final line.*441 complete records"):
        mdqa.load_mdqa(paths["partial_copy"])
    with pytest.warns(UserWarning, match="441 records read.*line 442 was truncated"):
        examples, report = mdqa.load_mdqa(paths["partial_copy"], on_truncated="stop")
    assert (report.records, report.truncated, report.truncated_line) == (441, True, 442)
    assert "model_answer" in report.ignored_keys  # the predictions file's extra fields are reported
    assert examples == subset[0]


def test_k_document_variant_sizes(subset):
    for k in (2, 5, 10, 20):
        for e in subset[0][:50]:
            v = mdqa.k_document_variant(e, k)
            assert len(v.documents) == k and v.gold_index == 0 and v.distractors == e.distractors[: k - 1]
    e9 = subset[9][0]
    v = mdqa.k_document_variant(e9, 10)
    assert v.gold_index == 9 and v.distractors == e9.distractors[:9]
    with pytest.raises(ValueError, match="gold_position"):
        mdqa.k_document_variant(subset[14][0], 10)
    assert mdqa.k_document_variant(subset[14][0], 10, gold_position=4) == mdqa.k_document_variant(subset[4][0], 10)
    for bad in (1, 21):
        with pytest.raises(ValueError):
            mdqa.k_document_variant(e9, bad)


# ---------------------------------------------------------------- random distractors


def test_pool_counts(pool):
    # 441 x 19 retrieved distractors + 2655 oracle golds, minus duplicates (by id, else by title+text)
    assert (pool.from_retrieved, pool.from_oracle_gold, pool.duplicates_dropped) == (8303, 2600, 131)
    assert len(pool) == 10903 and len({(d.title, d.text) for d in pool.documents}) == len(pool)


def _strictly_answer_free(example):
    """Independent of kvlib.tasks.mdqa: no answer (normalised, >= 2 chars) is a substring of a distractor's
    normalised title + text, and a 1-char answer is no whole token of it."""
    for d in example.distractors:
        haystack = f" {normalize_answer(d.title + ' ' + d.text)} "
        for answer in example.answers:
            n = normalize_answer(answer)
            if (len(n) >= 2 and n in haystack) or (len(n) == 1 and f" {n} " in haystack):
                return False
    return True


def test_random_distractors_contain_no_answer(oracle, pool):
    built = mdqa.build_random_distractor_set(oracle, pool, 20, seed=0)
    assert len(built) == 2655
    sample = built[::5]  # 531 questions, every document checked
    assert len(sample) >= 300
    for original, example in zip(oracle[::5], sample):
        assert example.qid == original.qid and example.gold == original.gold and example.gold_index == 0
        assert len(example.documents) == 20
        assert len({(d.title, d.text) for d in example.documents}) == 20  # no duplicates, gold not repeated
        assert not any(mdqa.passage_has_answer(d, example.answers) for d in example.distractors)
        assert _strictly_answer_free(example), example.question
    # the question whose "S" answer would rule out every passage as a substring still gets distractors
    (s_question,) = [e for e in built if e.answers == ["S"]]
    assert len(s_question.distractors) == 19


def test_random_distractors_deterministic(oracle, pool):
    some = oracle[:400]
    first = mdqa.build_random_distractor_set(some, pool, 20, seed=0)
    assert mdqa.build_random_distractor_set(some, pool, 20, seed=0) == first
    # a question's draw depends on (seed, qid) only, not on which other questions are built or their order
    assert mdqa.build_random_distractor_set(some[::-1], pool, 20, seed=0)[::-1] == first
    other = mdqa.build_random_distractor_set(some, pool, 20, seed=1)
    assert sum(a.distractors != b.distractors for a, b in zip(first, other)) > 390
    # a longer draw extends a shorter one: 20 documents are a prefix of 30
    longer = mdqa.build_random_distractor_set(some, pool, 30, seed=0)
    assert [mdqa.k_document_variant(e, 20) for e in longer] == first


def test_place_gold_keeps_distractor_order(oracle, pool):
    base = mdqa.build_random_distractor_set(oracle[:300], pool, 20, seed=0)
    for pos in POSITIONS:
        for e in base:
            moved = mdqa.place_gold(e, pos)
            assert moved.gold_index == pos and moved.documents[pos] == e.gold and moved.documents[pos].is_gold
            assert moved.distractors == e.distractors
    with pytest.raises(ValueError):
        mdqa.place_gold(base[0], 20)


def test_question_ids_file(subset, tmp_path):
    path = mdqa.write_question_ids(tmp_path / "qids.json", subset[0], setting=mdqa.SETTING_RETRIEVED,
                                   source="derived_20docs_first441/gold_at_0")
    assert mdqa.read_question_ids(path) == mdqa.question_ids(subset[0])
    record = json.loads(path.read_text())
    assert (record["num_questions"], record["setting"]) == (441, "retrieved distractors (LitM)")


def test_longer_context_params_allow_many_random_documents_only():
    """Notebook 08 (Fig. 9): more than 20 documents with random distractors; retrieved ones stop at 20 in both
    notebooks, and positions must lie within the documents."""
    from kvlib.tasks import mdqa
    from kvlib.engine.config import ParamError, from_mapping

    base = {"profile": "quick", "models": {"original": {}}}
    P = from_mapping(notebooks.LongerContextNotebookParams, {**base, "num_documents": 120, "positions": [1, 60, 120]})
    assert P.settings == ["random"] and P.num_documents == 120
    with pytest.raises(ParamError, match="random distractors only"):
        from_mapping(notebooks.LongerContextNotebookParams, {**base, "settings": ["random", "retrieved"]})
    with pytest.raises(ParamError, match=r"num_documents: must be in \[2, 20\]"):
        from_mapping(notebooks.MDQANotebookParams, {**base, "num_documents": 30})
    with pytest.raises(ParamError, match=r"num_documents: must be in \[2, 200\]"):
        from_mapping(notebooks.LongerContextNotebookParams, {**base, "num_documents": 201})
    with pytest.raises(ParamError, match="positions"):
        from_mapping(notebooks.LongerContextNotebookParams, {**base, "num_documents": 30, "positions": [31]})
    assert from_mapping(notebooks.MDQANotebookParams, {**base, "settings": ["random"], "num_documents": 30,
                                                  "positions": [1, 30]}).num_documents == 30
