"""Contamination guard: no finetuning set may contain an evaluation question or an evaluation gold passage.

One check (`check_contamination`) compares a training set with every evaluation set of the project
(`load_eval_reference`):
- MDQA, both distractor settings: question ids (kvlib.tasks.mdqa.question_id, i.e. sha1 of the metric-normalised
  question) and gold passage texts. By default the 441-question pool that the two settings draw their
  questions from (the derived 20-document files); `mdqa_sets` (kvlib.tasks.mdqa.build_eval_sets) and
  `mdqa_question_files` (kvlib.tasks.mdqa.write_question_ids) add the sets a profile actually evaluated, e.g. a
  random-only evaluation over all 2655 oracle questions.
- NQ-Open, TriviaQA, MMLU (test), GSM8K (test): question texts, through the kvlib.tasks.general loaders.
- FLenQA: questions and key paragraphs (the gold) of the regenerated benchmark, recomputed from its config
  with kvlib.tasks.flenqa.draw_problem (no tokenizer needed), or taken from given records.

Keys: question texts are compared after kvlib.engine.scoring.normalize_answer (as a question_id); passages after
the same normalisation. Any overlap raises ContaminationError naming the training sample and the
evaluation item. One exception by design: the MDQA-finetuning baseline trains on NQ questions, and every
MDQA question is an NQ-Open dev question, so overlaps whose only evaluation counterpart is NQ-Open are
collected instead (nq_open="exclude", the default): the NQ-Open benchmark then drops exactly those
questions (`training_question_ids`, then kvlib.tasks.general.drop_questions) and reports how many. nq_open="error" raises for
them too.

Training samples are kvlib.tasks.synthetic.Sample objects (or a dataset directory written with
kvlib.tasks.synthetic.write_split) whose meta holds `question` and `gold_passages`; samples without them
(the synthetic key-value sets) have nothing to compare and pass.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal, Mapping, Sequence

from kvlib.engine.data import mdqa_paths, resolve_data_dir
from kvlib.engine.scoring import normalize_answer
from kvlib.tasks.flenqa import FLenQAConfig, FLenQARecord, draw_problem
from kvlib.tasks.general import task_path, task_spec
from kvlib.tasks.mdqa import load_mdqa, question_id, read_question_ids
from kvlib.tasks.synthetic import Sample, load_dataset

GENERAL_TASKS = ("nq_open", "triviaqa", "mmlu", "gsm8k")
NQ_OPEN = "nq_open"
NQOpenPolicy = Literal["exclude", "error"]


class ContaminationError(ValueError):
    """A training set shares a question or a gold passage with an evaluation set; the message names both."""


def passage_key(text: str) -> str:
    """sha1 of a passage's metric-normalised text (whitespace, case, punctuation and articles ignored)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"a passage must be a non-empty string, got {text!r}")
    return hashlib.sha1(normalize_answer(text).encode("utf-8")).hexdigest()


def question_key(question: str) -> str:
    """The question id kvlib.tasks.mdqa uses (sha1 of the metric-normalised text), for every evaluation set."""

    return question_id(question)


@dataclass
class EvalReference:
    """What every evaluation set asks and reads: question key -> labels of the items that ask it, passage
    key -> labels of the items whose gold it is. A label is `<set>:<item id> <question, shortened>`."""

    questions: dict[str, list[str]] = field(default_factory=dict)
    passages: dict[str, list[str]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # items per evaluation set, for reports

    def add_question(self, key: str, label: str) -> None:
        self.questions.setdefault(key, []).append(label)

    def add_passage(self, text: str, label: str) -> None:
        self.passages.setdefault(passage_key(text), []).append(label)

    def add_set(self, name: str, count: int) -> None:
        self.sizes[name] = self.sizes.get(name, 0) + count

    def question_ids(self, prefix: str) -> set[str]:
        """Keys of the questions some item of the sets named `prefix...` asks (e.g. "mdqa")."""
        return {k for k, labels in self.questions.items() if any(lab.startswith(prefix) for lab in labels)}


def _short(text: str, n: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 3] + "..."


def _add_mdqa_examples(ref: EvalReference, name: str, examples) -> None:
    for e in examples:
        label = f"{name}:{e.qid[:10]} {_short(e.question)!r}"
        ref.add_question(e.qid, label)
        ref.add_passage(e.gold.text, label)
    ref.add_set(name, len(examples))


def load_eval_reference(data_dir: str | Path | None = None, mdqa_sets: Mapping | None = None,
                        mdqa_question_files: Sequence[str | Path] = (), flenqa=None,
                        general: Sequence[str] = GENERAL_TASKS) -> EvalReference:
    """The reference of every evaluation set (see the module docstring).

    `mdqa_sets`: {setting: kvlib.tasks.mdqa.MDQAEvalSet} actually evaluated (added to the default 441-question
    pool); `mdqa_question_files`: qid files from kvlib.tasks.mdqa.write_question_ids; `flenqa`: a
    kvlib.tasks.flenqa.FLenQAConfig (default: the default config, the release's shape) or a list of
    FLenQARecord; `general`: which of NQ-Open, TriviaQA, MMLU, GSM8K to load."""

    ref = EvalReference()
    root = resolve_data_dir(data_dir)
    # MDQA: with the 441-question subset, both settings ask questions of that pool, each with its oracle gold
    # passage, so the whole pool is reference. LitM's complete file holds every oracle question: then the
    # reference is what is evaluated (`mdqa_sets`, `mdqa_question_files`), or nothing would be left to train on.
    paths = mdqa_paths(root)
    if paths["retrieved_20docs_source"] == "subset":
        pool, _ = load_mdqa(paths["retrieved_20docs"][0])
        _add_mdqa_examples(ref, "mdqa(random+retrieved pool)", pool)
    for setting, eval_set in (mdqa_sets or {}).items():
        _add_mdqa_examples(ref, f"mdqa/{setting}", eval_set.examples)
    for path in mdqa_question_files:
        qids = read_question_ids(path)
        for qid in qids:
            ref.add_question(qid, f"mdqa/{Path(path).name}:{qid[:10]}")
        ref.add_set(f"mdqa/{Path(path).name}", len(qids))
    for name in general:
        spec = task_spec(name, "general")
        items, _ = spec.loader(task_path(spec, root))
        for item in items:
            ref.add_question(question_key(item.question), f"{name}:{item.id} {_short(item.question)!r}")
        ref.add_set(name, len(items))
    if flenqa is None:
        flenqa = FLenQAConfig()
    if isinstance(flenqa, FLenQAConfig):
        flenqa.validate()
        count = 0
        for task in flenqa.tasks:
            for i in range(flenqa.samples_per_task):
                p = draw_problem(task, i, flenqa.seed, flenqa.elaborations)
                label = f"flenqa:{task}/{i} {_short(p.question)!r}"
                ref.add_question(question_key(p.question), label)
                for paragraph in p.paragraphs:
                    ref.add_passage(paragraph, label)
                count += 1
        ref.add_set("flenqa", count)
    else:
        records = list(flenqa)
        if not all(isinstance(r, FLenQARecord) for r in records):
            raise TypeError("flenqa must be a FLenQAConfig or a list of kvlib.tasks.flenqa.FLenQARecord")
        for r in records:
            label = f"flenqa:{r.id} {_short(r.question)!r}"
            ref.add_question(question_key(r.question), label)
            for paragraph in r.key_paragraphs or r.facts:
                ref.add_passage(paragraph, label)
        ref.add_set("flenqa", len(records))
    return ref


# ---------------------------------------------------------------- the check


@dataclass(frozen=True)
class ContaminationReport:
    """What a passed check compared, and the NQ-Open dev questions the set trains on (to exclude there)."""

    name: str
    samples: int
    questions_checked: int
    passages_checked: int
    reference_sizes: dict
    nq_open_overlap: tuple[str, ...] = ()  # question keys asked by NQ-Open only

    def summary(self) -> str:
        sets = ", ".join(f"{k} ({v})" for k, v in self.reference_sizes.items())
        text = (f"{self.name}: {self.samples} samples, {self.questions_checked} questions and "
                f"{self.passages_checked} gold passages checked against {sets}: no overlap")
        if self.nq_open_overlap:
            text += f"; {len(self.nq_open_overlap)} NQ-Open questions to exclude from the NQ-Open benchmark"
        return text


def _training_samples(source) -> tuple[str, list]:

    if isinstance(source, (str, Path)):
        return str(source), load_dataset(Path(source), "train")
    samples = list(source)
    if not all(isinstance(s, Sample) for s in samples):
        raise TypeError("training samples must be kvlib.tasks.synthetic.Sample objects or a dataset directory")
    return "training set", samples


def check_contamination(source, reference: EvalReference, name: str | None = None,
                        nq_open: NQOpenPolicy = "exclude", max_listed: int = 20) -> ContaminationReport:
    """Compare a training set (samples, or a dataset directory) with every evaluation set; raise
    ContaminationError naming every overlapping pair (up to `max_listed`, then a count)."""
    if nq_open not in ("exclude", "error"):
        raise ValueError(f"nq_open must be 'exclude' or 'error', got {nq_open!r}")
    if not isinstance(reference, EvalReference):
        raise TypeError(f"reference must be an EvalReference (load_eval_reference), got {type(reference).__name__}")
    where, samples = _training_samples(source)
    name = name or where
    overlaps: list[str] = []
    nq_used: dict[str, None] = {}
    n_questions = n_passages = 0
    for k, s in enumerate(samples):
        sid = s.meta.get("id", f"#{k}")
        question = s.meta.get("question")
        if question:
            n_questions += 1
            key = question_key(question)
            labels = reference.questions.get(key, [])
            hard = [lab for lab in labels if not (nq_open == "exclude" and lab.startswith(f"{NQ_OPEN}:"))]
            if hard:
                overlaps.append(f"{sid} question {_short(question)!r} = {'; '.join(hard[:3])}")
            elif labels:
                nq_used[key] = None
        for passage in s.meta.get("gold_passages", ()):
            n_passages += 1
            labels = reference.passages.get(passage_key(passage), [])
            if labels:
                overlaps.append(f"{sid} gold passage {_short(passage)!r} = {'; '.join(labels[:3])}")
    if overlaps:
        listed = "\n  ".join(overlaps[:max_listed])
        more = f"\n  ... and {len(overlaps) - max_listed} more" if len(overlaps) > max_listed else ""
        raise ContaminationError(f"{name}: {len(overlaps)} overlap(s) with evaluation sets:\n  {listed}{more}")
    return ContaminationReport(name, len(samples), n_questions, n_passages, dict(reference.sizes),
                               tuple(sorted(nq_used)))


# ---------------------------------------------------------------- NQ-Open exclusion


def training_question_ids(sources: Iterable) -> set[str]:
    """Question keys of every sample of the given training sets (sample lists or dataset directories)."""
    if isinstance(sources, (str, Path)):
        sources = [sources]
    keys = set()
    for source in sources:
        for s in _training_samples(source)[1]:
            if s.meta.get("question"):
                keys.add(question_key(s.meta["question"]))
    return keys


