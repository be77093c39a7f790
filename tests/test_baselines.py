"""Baseline finetuning sets (kvlib.tasks.baseline_sets) and the contamination guard (kvlib.tasks.contamination): determinism,
labels (the answer is where the meta says; quoted sentences are verbatim), token matching against a
synthetic set, the guard on a planted overlap and on the real sets. Reads the real data directory and uses
the embedded model's tokenizer (no weights)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from kvlib.tasks import baseline_sets as bl
from kvlib.engine.config import ParamError, from_mapping
from kvlib.tasks.general import drop_questions
from kvlib.tasks.contamination import (
    ContaminationError, check_contamination, load_eval_reference, training_question_ids,
)
from kvlib.tasks.synthetic import GenerationConfig, Sample, load_dataset, write_dataset
from kvlib.engine.scoring import normalize_answer

SMALL = {
    "mdqa": bl.BaselineConfig(kind="mdqa", n_samples=3, num_documents=5, sample_tokens=(300, 1500)),
    "multidocqa": bl.BaselineConfig(kind="multidocqa", n_samples=3, sample_tokens=(600, 1500)),
    "in2": bl.BaselineConfig(kind="in2", n_samples=6, sample_tokens=(600, 1500), in2_two_segment_fraction=0.5),
    "niah": bl.BaselineConfig(kind="niah", n_samples=3, sample_tokens=(300, 1200)),
}


@pytest.fixture(scope="module")
def count():
    from kvlib.engine.models import load_token_counter

    return load_token_counter("smollm2-135m-instruct").count


@pytest.fixture(scope="module")
def reference():
    return load_eval_reference()


@pytest.fixture(scope="module")
def built(count, reference, tmp_path_factory):
    """Each kind written twice with seed 0 and once with seed 1: {kind: (dir0, dir0_again, dir1)}."""
    out = {}
    for kind, cfg in SMALL.items():
        root = tmp_path_factory.mktemp(kind)
        dirs = []
        for name, seed in (("a", 0), ("b", 0), ("c", 1)):
            bl.write_baseline(dataclasses.replace(cfg, seed=seed), root / name, count_tokens=count, reference=reference)
            dirs.append(root / name)
        out[kind] = tuple(dirs)
    return out


def _bytes(d: Path) -> dict:
    return {f.name: f.read_bytes() for f in sorted(d.iterdir())}


@pytest.mark.parametrize("kind", bl.KINDS)
def test_deterministic_per_seed(built, kind):
    a, b, c = built[kind]
    assert _bytes(a) == _bytes(b)
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()


@pytest.mark.parametrize("kind", bl.KINDS)
def test_files_are_chat_datasets_labelled_regenerated(built, kind):
    from kvlib.engine.train import read_chat_file

    d = built[kind][0]
    chats = read_chat_file(d / "train.jsonl")  # what `kvlib train` reads
    samples = load_dataset(d, "train")
    assert len(chats) == len(samples) == SMALL[kind].n_samples
    for chat, s in zip(chats, samples):
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert s.meta["source"] == "regenerated" and s.meta["kind"] == kind
        assert s.meta["record_id"] and s.meta["question"] and s.meta["gold_passages"]
        lo, hi = SMALL[kind].sample_tokens
        assert lo <= s.meta["n_train_tokens"] <= hi
    stats = json.loads((d / "stats.json").read_text())
    assert stats["source"] == "regenerated" and "no overlap" in stats["tokens"]["contamination"]


def _documents(prompt: str) -> dict[int, str]:
    return {int(n): text for n, text in re.findall(r"^Document \[(\d+)\](.*)$", prompt, re.MULTILINE)}


def test_mdqa_labels(built):
    for s in load_dataset(built["mdqa"][0], "train"):
        docs = _documents(s.prompt)
        assert len(docs) == s.meta["num_documents"] == 5
        gold = docs[s.meta["gold_document"]]
        assert gold.endswith(s.meta["gold_passages"][0])
        assert normalize_answer(s.meta["answer"]) in normalize_answer(gold)
        assert s.meta["answer"].rstrip(".") in s.answer and s.meta["target_style"] == "template"
        others = [t for n, t in docs.items() if n != s.meta["gold_document"]]
        assert not any(f" {normalize_answer(s.meta['answer'])} " in f" {normalize_answer(t)} " for t in others)


def test_mdqa_rewrite_hook(count, reference):
    cfg = dataclasses.replace(SMALL["mdqa"], n_samples=2)
    calls = []

    def rewrite(question, answer):
        calls.append((question, answer))
        return f"It is {answer}."

    samples, _ = bl.build_baseline(cfg, count, reference, rewrite=rewrite)
    assert [s.answer for s in samples] == [f"It is {a}." for _, a in calls]
    assert all(s.meta["target_style"] == "rewrite" for s in samples)
    with pytest.raises(ParamError, match="rewrite applies to the mdqa baseline only"):
        bl.build_baseline(SMALL["niah"], count, reference, rewrite=rewrite)


def test_multidocqa_restates_verbatim(built):
    for s in load_dataset(built["multidocqa"][0], "train"):
        docs = _documents(s.prompt)
        assert len(docs) == s.meta["num_documents"] > len(s.meta["gold_documents"])
        for quote in s.meta["quoted"]:
            assert quote["sentence"] in docs[quote["document"]]  # verbatim from that document
            assert f'Document [{quote["document"]}]: "{quote["sentence"]}"' in s.answer
        assert s.answer.index("original text") < s.answer.index(f"So the answer is: {s.meta['answer']}")
        for n, passage in zip(s.meta["gold_documents"], s.meta["gold_passages"]):
            assert docs[n].endswith(passage)


def test_in2_answer_in_recorded_segments(built):
    kinds = set()
    for s in load_dataset(built["in2"][0], "train"):
        context = s.prompt.split("\n\nAnswer the question based on the context above.")[0]
        segments = context.split("\n")
        assert len(segments) == s.meta["num_segments"]
        assert [segments[k] for k in s.meta["gold_segments"]] == s.meta["gold_passages"]
        kinds.add(s.meta["dataset"])
        if s.meta["dataset"] == "squad":
            assert s.meta["answer"] in segments[s.meta["gold_segments"][0]]
        else:  # two segments, at least half the context apart
            i, j = s.meta["gold_segments"]
            assert j - i >= max(1, len(segments) // 2)
    assert kinds == {"squad", "hotpotqa"}


def test_niah_needle_at_recorded_place(built):
    for s in load_dataset(built["niah"][0], "train"):
        start, needle = s.meta["needle_start"], s.meta["needle"]
        assert s.prompt[start:start + len(needle)] == needle
        assert s.meta["answer"] in needle and s.meta["answer"].rstrip(".") in s.answer
        before = s.prompt[:start].rstrip(" ")
        assert before == "" or before.endswith(".")  # moved back to a sentence end
        haystack = s.prompt[:start] + s.prompt[start + len(needle):]
        assert f" {normalize_answer(s.meta['answer'])} " not in f" {normalize_answer(haystack)} "
        assert 0.0 <= s.meta["depth"] <= 1.0


@pytest.fixture(scope="module")
def synthetic(count, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_dataset(GenerationConfig(num_dicts=25, n_train=12, n_eval=1, max_tokens=1600), out)
    return out


@pytest.mark.parametrize("kind", ["multidocqa", "in2", "niah"])
def test_token_matched_to_synthetic_set(synthetic, count, reference, kind):
    cfg = bl.matched_config(dataclasses.replace(SMALL[kind], sample_tokens=(16, 16)), synthetic, count)
    lengths = bl.sample_lengths(load_dataset(synthetic, "train"), count)
    assert cfg.token_total == sum(lengths) and cfg.sample_tokens == (min(lengths), max(lengths))
    samples, report = bl.build_baseline(dataclasses.replace(cfg, segment_tokens=100) if kind == "in2" else cfg,
                                        count, reference)
    assert report["within_tolerance"] and abs(report["total_tokens"] - sum(lengths)) <= 0.05 * sum(lengths)
    assert report["total_tokens"] == sum(bl.sample_lengths(samples, count))
    assert min(lengths) <= report["min"] and report["max"] <= max(lengths)


def test_token_total_for_fixed_length_mdqa(synthetic, count, reference):
    lengths = bl.sample_lengths(load_dataset(synthetic, "train"), count)
    cfg = bl.matched_config(dataclasses.replace(SMALL["mdqa"], num_documents=6), synthetic, count)
    assert cfg.sample_tokens == (300, max(lengths))  # only the per-sample max: its length is num_documents'
    samples, report = bl.build_baseline(cfg, count, reference)
    assert report["within_tolerance"] and report["max"] <= max(lengths) and report["n"] == len(samples)


def test_config_errors_name_the_field():
    with pytest.raises(ParamError, match="^kind: "):
        from_mapping(bl.BaselineConfig, {"kind": "in3"})
    with pytest.raises(ParamError, match="^multidocqa_datasets: .*MuSiQue"):
        from_mapping(bl.BaselineConfig, {"kind": "multidocqa", "multidocqa_datasets": ["musique"]})
    with pytest.raises(ParamError, match="^sample_tokens: "):
        from_mapping(bl.BaselineConfig, {"kind": "in2", "sample_tokens": [100, 4000]})
    with pytest.raises(ParamError, match="^token_total: "):
        from_mapping(bl.BaselineConfig, {"token_total": 10, "sample_tokens": [300, 400]})


def test_sample_range_that_cannot_be_met(count, reference):
    cfg = dataclasses.replace(SMALL["mdqa"], num_documents=20, sample_tokens=(300, 400), max_resample=3)
    with pytest.raises(ParamError, match="^sample_tokens: .*num_documents"):
        bl.build_baseline(cfg, count, reference)


# ---------------------------------------------------------------- the contamination guard


def test_guard_passes_real_sets_and_catches_planted_overlap(built, reference):
    for kind in bl.KINDS:
        check_contamination(built[kind][0], reference)
    samples = load_dataset(built["multidocqa"][0], "train")
    from kvlib.engine.data import mdqa_paths
    from kvlib.tasks.mdqa import load_mdqa

    pool, _ = load_mdqa(mdqa_paths()["subset_20docs"][0])
    leaked_q = Sample("p", "a", {**samples[0].meta, "id": "planted-q", "question": pool[3].question.upper() + "?"})
    leaked_p = Sample("p", "a", {**samples[1].meta, "id": "planted-p", "gold_passages": [pool[7].gold.text]})
    with pytest.raises(ContaminationError) as err:
        check_contamination([*samples, leaked_q, leaked_p], reference)
    message = str(err.value)
    assert "2 overlap(s)" in message and "planted-q" in message and "planted-p" in message and "mdqa" in message


def test_guard_covers_every_evaluation_set(reference):
    from kvlib.tasks.flenqa import FLenQAConfig, draw_problem
    from kvlib.tasks.general import load_gsm8k, load_mmlu, load_triviaqa
    from kvlib.engine.data import resolve_data_dir

    assert set(reference.sizes) >= {"nq_open", "triviaqa", "mmlu", "gsm8k", "flenqa"}
    root = resolve_data_dir()
    questions = [load_triviaqa(root / "triviaqa/test.jsonl")[0][5].question,
                 load_mmlu(root / "mmlu")[0][100].question, load_gsm8k(root / "gsm8k/test.jsonl")[0][9].question,
                 draw_problem("PIR", 3, FLenQAConfig().seed).question]
    planted = [Sample("p", "a", {"id": f"x{k}", "question": q}) for k, q in enumerate(questions)]
    with pytest.raises(ContaminationError, match="4 overlap"):
        check_contamination(planted, reference)


def test_nq_open_questions_are_excluded_not_rejected(built, reference):
    from kvlib.tasks.general import load_nq_open
    from kvlib.engine.data import resolve_data_dir

    report = check_contamination(built["mdqa"][0], reference)
    assert len(report.nq_open_overlap) == SMALL["mdqa"].n_samples  # MDQA training questions are NQ-Open dev ones
    with pytest.raises(ContaminationError, match="nq_open:"):
        check_contamination(built["mdqa"][0], reference, nq_open="error")
    used = training_question_ids([built["mdqa"][0], built["niah"][0]])
    items, _ = load_nq_open(resolve_data_dir() / "nq_open/NQ-open.dev.jsonl")
    kept, dropped = drop_questions(items, used)
    assert dropped == SMALL["mdqa"].n_samples and len(kept) == len(items) - dropped


def test_multidocqa_release_loader(tmp_path):
    path = tmp_path / "release.jsonl"
    rows = [{"context": "Doc one. Doc two.", "questions": ["Q1?", "Q2?"], "answers": ["A1", "A2"]},
            {"messages": [{"role": "user", "content": "ctx Q?"}, {"role": "assistant", "content": "A"}]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = bl.load_multidocqa_release(path)
    assert [(s.prompt, s.answer) for s in samples] == [("Doc one. Doc two.\nQ1?", "A1"),
                                                        ("Doc one. Doc two.\nQ2?", "A2"), ("ctx Q?", "A")]
    assert all(s.meta["source"] == "official" for s in samples)
    path.write_text(json.dumps({"text": "x"}) + "\n")
    with pytest.raises(ValueError, match="release.jsonl:1: expected context/questions/answers or messages"):
        bl.load_multidocqa_release(path)
