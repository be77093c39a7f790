"""Multi-document QA (MDQA) from "Lost in the Middle" (LitM; Liu et al. 2023), as the paper evaluates it
(arXiv 2406.19292, Figs. 5, 9, 10): NQ-Open questions, one gold Wikipedia passage among K-1 distractors.

- Records: `Document`, `MDQAExample` (validated on construction; `qid` is a stable question id).
- Loading/writing the official LitM files (`load_mdqa`, `write_mdqa`), with explicit handling of a
  truncated final line (the partial 20-document copy in the data directory has one).
- Prompts: `format_qa_prompt` / `format_closedbook_prompt`, LitM's template text kept verbatim in
  kvlib/tasks/templates/mdqa_*.prompt.txt.
- Settings: LitM's retrieved distractors (`k_document_variant`, `place_gold`) and the paper's random
  Wikipedia distractors, which we rebuild offline (`build_distractor_pool`,
  `build_random_distractor_set`) when LitM's random-documents file is not in the data directory.
- `question_ids` / `write_question_ids`: which questions an evaluation used (contamination checks).

File layouts (LitM README and scripts/make_qa_data_from_retrieval_results.py):
- "qa": `{question, answers, ctxs, nq_annotated_gold}` where every ctx has `isgold` and exactly one is
  the gold (the oracle file and every `nq-open-{K}_total_documents_gold_at_{i}` file).
- "retrieval": the same keys, but ctxs are ranked passages without `isgold` and the gold passage is
  `nq_annotated_gold` (title, chunked_long_answer). This is the Contriever results file the LitM builder
  reads; LitM's `nq-open-random-documents.jsonl.gz` (issue #11: "queries and randomly-sampled
  contexts", fed to the same builder) is ASSUMED to have this layout too: we could not inspect it. Such
  a record loads as gold at 0 plus every `hasanswer == false` ctx in file order, which is exactly what
  the builder chooses from; `k_document_variant` then takes the top K-1.
"""
from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import random
import re
import statistics
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping, Sequence

import numpy as np

from kvlib.engine import evaluate
from kvlib.engine.backends import StopRule
from kvlib.engine.config import ParamError, from_mapping
from kvlib.engine.data import MDQA_QUESTIONS, JsonlReport, OnTruncated, mdqa_paths, read_jsonl_records, resolve_data_dir
from kvlib.engine.evaluate import answer_requests, paired_deltas, result_fields, seed_group_deltas, with_seed_groups
from kvlib.engine.scoring import normalize_answer, score_mdqa_answer
from kvlib.engine.stats import contrast_test, seed_contrast_test
from kvlib.tasks.synthetic import load_template

SETTING_RANDOM = "derived (random distractors)"
SETTING_RETRIEVED = "retrieved distractors (LitM)"
# the Fig. 10 contrast (mdqa_contrast_deltas): a model's gain with random minus its gain with retrieved
SETTING_CONTRAST = "gain with random minus gain with retrieved distractors"
# MDQA's chance rate: an open-domain answer is not guessed from a list, so a model that knows nothing scores 0 (its
# floor); a claim is testable only where the original clears it (kvlib.report.paper.original_level)
MDQA_CHANCE = 0.0
QID_SCHEME = "sha1 hex of kvlib.engine.scoring.normalize_answer(question)"
# Where an MDQA answer ends for its scorer: generation stops there (kvlib.engine.backends.StopRule; part of the
# response-cache key). LitM's metric (kvlib.engine.scoring.score_mdqa_answer) reads the reply's first line only.
MDQA_ANSWER_END = StopRule(first_line=True)

Layout = Literal["auto", "qa", "retrieval"]


class MDQAFormatError(ValueError):
    """A record of an MDQA file is malformed. The message starts with `file:line:`."""


# ---------------------------------------------------------------- records


def _check_str(name: str, value, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{name} must be a str, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must be a non-empty string")


def _check_optional(name: str, value, kind: type) -> None:
    # bool is an int subclass: an index given as True/False is a bug, not an index
    if value is not None and (not isinstance(value, kind) or (kind is not bool and isinstance(value, bool))):
        raise TypeError(f"{name} must be {kind.__name__} or None, got {value!r}")


@dataclass(frozen=True)
class Document:
    """One passage. `score`, `has_answer` and `original_retrieval_index` are LitM's retrieval metadata
    (None where the file has none, e.g. the gold chunk); they are kept so files round-trip."""

    title: str
    text: str
    id: str | None
    is_gold: bool
    score: float | None = None
    has_answer: bool | None = None
    original_retrieval_index: int | None = None

    def __post_init__(self) -> None:
        # titles/texts may be empty strings in principle (LitM does not forbid it); they must be str
        _check_str("Document.title", self.title, allow_empty=True)
        _check_str("Document.text", self.text, allow_empty=True)
        _check_optional("Document.id", self.id, str)
        if not isinstance(self.is_gold, bool):
            raise TypeError(f"Document.is_gold must be a bool, got {self.is_gold!r}")
        if self.score is not None and (isinstance(self.score, bool) or not isinstance(self.score, float)):
            raise TypeError(f"Document.score must be a float or None, got {self.score!r}")
        _check_optional("Document.has_answer", self.has_answer, bool)
        _check_optional("Document.original_retrieval_index", self.original_retrieval_index, int)


def question_id(question: str) -> str:
    """Stable id of a question: sha1 of its metric-normalised text, so the same NQ question found in
    another file (NQ-Open dev, a finetuning set) gets the same id despite case/punctuation changes."""
    _check_str("question", question)
    return hashlib.sha1(normalize_answer(question).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class MDQAExample:
    """A question with its documents; `documents[gold_index]` is the one gold passage."""

    question: str
    answers: list[str]
    documents: list[Document]
    gold_index: int
    qid: str
    nq_annotated_gold: dict | None = None

    def __post_init__(self) -> None:
        _check_str("question", self.question)
        if not isinstance(self.answers, list) or not self.answers:
            raise ValueError(f"answers must be a non-empty list, got {self.answers!r}")
        for answer in self.answers:
            _check_str("answers[]", answer)
        if not isinstance(self.documents, list) or not self.documents:
            raise ValueError("documents must be a non-empty list")
        if not all(isinstance(d, Document) for d in self.documents):
            raise TypeError("documents must all be kvlib.tasks.mdqa.Document")
        if isinstance(self.gold_index, bool) or not isinstance(self.gold_index, int):
            raise TypeError(f"gold_index must be an int, got {self.gold_index!r}")
        if not 0 <= self.gold_index < len(self.documents):
            raise ValueError(f"gold_index {self.gold_index} outside [0, {len(self.documents)})")
        golds = [i for i, d in enumerate(self.documents) if d.is_gold]
        if golds != [self.gold_index]:
            raise ValueError(f"exactly documents[{self.gold_index}] must be gold, found gold at {golds}")
        _check_str("qid", self.qid)

    @property
    def gold(self) -> Document:
        return self.documents[self.gold_index]

    @property
    def distractors(self) -> list[Document]:
        """Non-gold documents, in their order."""
        return [d for i, d in enumerate(self.documents) if i != self.gold_index]


# ---------------------------------------------------------------- file records <-> examples

# The raw schema, checked by kvlib.engine.config.from_mapping: wrong types and unknown ctx keys fail with the
# field's path (`ctxs[3].title: expected a string, got 5`).


@dataclass
class _RawCtx:
    title: str
    text: str
    id: str | None = None
    score: str | float | None = None  # LitM writes a string ("1.0510446"); LitM's Document parses a float
    hasanswer: bool | None = None
    original_retrieval_index: int | None = None
    isgold: bool | None = None


@dataclass
class _RawNQGold:
    title: str
    long_answer: str
    chunked_long_answer: str
    short_answers: list[str]


@dataclass
class _RawRecord:
    question: str
    answers: list[str]
    ctxs: list[_RawCtx]
    nq_annotated_gold: _RawNQGold | None = None


_RECORD_KEYS = tuple(f.name for f in dataclasses.fields(_RawRecord))
_NAME_LAYOUT = re.compile(r"nq-open-(\d+)_total_documents_gold_at_(\d+)")


def expected_shape(path: str | Path) -> tuple[int, int] | None:
    """(documents per example, gold index) that a LitM file name promises, else None."""
    name = Path(path).name
    if name.startswith("nq-open-oracle"):
        return 1, 0
    match = _NAME_LAYOUT.search(name)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _score(value) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"score is not a number: {value!r}") from None


def _record_layout(raw: _RawRecord) -> str:
    flags = [c.isgold is not None for c in raw.ctxs]
    if flags and all(flags):
        return "qa"
    if not any(flags):
        return "retrieval"
    raise ValueError("some ctxs have `isgold` and some do not")


def example_from_record(record: dict, layout: Layout = "auto") -> tuple[MDQAExample, str, tuple[str, ...]]:
    """(example, layout used, ignored top-level keys) of one file record; ValueError if malformed.

    Unknown top-level keys (e.g. the `model_*` fields of a LitM predictions file) are ignored but
    returned, so the caller can report them."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    ignored = tuple(sorted(k for k in record if k not in _RECORD_KEYS))
    try:
        raw = from_mapping(_RawRecord, {k: v for k, v in record.items() if k in _RECORD_KEYS})
    except ParamError as exc:
        raise ValueError(str(exc)) from None
    if not raw.ctxs:
        raise ValueError("ctxs: must not be empty")
    found = _record_layout(raw)
    if layout != "auto" and layout != found:
        raise ValueError(f"expected the {layout!r} layout, found a {found!r} record")
    nq_gold = dict(record["nq_annotated_gold"]) if raw.nq_annotated_gold is not None else None
    if found == "qa":
        documents = [
            Document(c.title, c.text, c.id, c.isgold, _score(c.score), c.hasanswer, c.original_retrieval_index)
            for c in raw.ctxs
        ]
        golds = [i for i, d in enumerate(documents) if d.is_gold]
        if len(golds) != 1:
            raise ValueError(f"ctxs: exactly one must have isgold=true, found {len(golds)}")
        for i, d in enumerate(documents):
            if not d.is_gold and d.has_answer is True:  # LitM: distractors never contain an answer
                raise ValueError(f"ctxs[{i}]: a distractor (isgold=false) has hasanswer=true")
        gold_index = golds[0]
    else:
        # mirror LitM's builder: gold = the NQ-annotated chunk; distractors = ctxs with hasanswer false,
        # in retrieval order, remembering their retrieval rank
        if raw.nq_annotated_gold is None:
            raise ValueError("nq_annotated_gold: required for a retrieval-layout record (it is the gold)")
        if any(c.hasanswer is None for c in raw.ctxs):
            raise ValueError("ctxs: every retrieved ctx needs `hasanswer` to pick distractors")
        gold = Document(raw.nq_annotated_gold.title, raw.nq_annotated_gold.chunked_long_answer, None, True,
                        has_answer=True)
        documents = [gold] + [
            Document(c.title, c.text, c.id, False, _score(c.score), False, rank)
            for rank, c in enumerate(raw.ctxs) if c.hasanswer is False
        ]
        gold_index = 0
    example = MDQAExample(raw.question, list(raw.answers), documents, gold_index, question_id(raw.question), nq_gold)
    return example, found, ignored


def example_to_record(example: MDQAExample) -> dict:
    """The LitM "qa"-layout record of an example (keys in LitM's order; absent metadata left out)."""
    ctxs = []
    for d in example.documents:
        ctx = {}
        if d.id is not None:
            ctx["id"] = d.id
        ctx["title"], ctx["text"] = d.title, d.text
        if d.score is not None:
            ctx["score"] = repr(d.score)  # LitM stores the relevance score as a string
        if d.has_answer is not None:
            ctx["hasanswer"] = d.has_answer
        if d.original_retrieval_index is not None:
            ctx["original_retrieval_index"] = d.original_retrieval_index
        ctx["isgold"] = d.is_gold
        ctxs.append(ctx)
    record = {"question": example.question, "answers": list(example.answers), "ctxs": ctxs}
    if example.nq_annotated_gold is not None:
        record["nq_annotated_gold"] = example.nq_annotated_gold
    return record


# ---------------------------------------------------------------- files


@dataclass(frozen=True)
class MDQALoadReport(JsonlReport):
    """What `load_mdqa` read: the JSONL report plus the record layout and the top-level keys it ignored."""

    layout: str = ""
    ignored_keys: tuple[str, ...] = ()

    def summary(self) -> str:
        text = super().summary().replace(" records read", f" records read ({self.layout} layout)", 1)
        if self.ignored_keys:
            text += f"; ignored keys: {', '.join(self.ignored_keys)}"
        return text


def load_mdqa(
    path: str | Path, on_truncated: OnTruncated = "raise", layout: Layout = "auto"
) -> tuple[list[MDQAExample], MDQALoadReport]:
    """Every example of a LitM MDQA file (gzip or plain) and a report of what was read.

    Each record is validated; an error names `file:line`. A broken final line raises by default; with
    on_truncated="stop" the complete records before it are returned, the report names the dropped line
    and a warning is emitted. A file name of LitM's form (`nq-open-20_total_documents_gold_at_4...`,
    `nq-open-oracle...`) fixes the number of documents and the gold index, and every "qa" record must
    match it. All records of a file must share one layout."""
    if layout not in ("auto", "qa", "retrieval"):
        raise ValueError(f"layout must be 'auto', 'qa' or 'retrieval', got {layout!r}")
    rows, jsonl = read_jsonl_records(path, on_truncated=on_truncated)
    shape = expected_shape(path)
    examples, ignored, file_layout = [], set(), None
    for lineno, record in rows:
        try:
            example, found, extra = example_from_record(record, layout if file_layout is None else file_layout)
            if found == "qa" and shape is not None and (len(example.documents), example.gold_index) != shape:
                raise ValueError(
                    f"the file name promises {shape[0]} documents with gold at {shape[1]}, the record has "
                    f"{len(example.documents)} with gold at {example.gold_index}"
                )
        except (ValueError, TypeError) as exc:
            raise MDQAFormatError(f"{path}:{lineno}: {exc}") from None
        file_layout = found
        ignored.update(extra)
        examples.append(example)
    if not examples:
        raise MDQAFormatError(f"{path}: no records")
    report = MDQALoadReport(str(path), len(examples), truncated_line=jsonl.truncated_line,
                            blank_lines=jsonl.blank_lines, layout=file_layout, ignored_keys=tuple(sorted(ignored)))
    if report.truncated:
        warnings.warn(report.summary(), stacklevel=2)
    return examples, report


def write_mdqa(examples: Sequence[MDQAExample], path: str | Path) -> Path:
    """Write examples in LitM's "qa" layout, one JSON object a line (gzip if the name ends in .gz).
    Byte-deterministic: the gzip header carries no time stamp or file name."""
    examples = list(examples)
    if not examples or not all(isinstance(e, MDQAExample) for e in examples):
        raise ValueError("write_mdqa needs a non-empty list of MDQAExample")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = "".join(json.dumps(example_to_record(e)) + "\n" for e in examples).encode("utf-8")
    with path.open("wb") as raw:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as fh:
                fh.write(payload)
        else:
            raw.write(payload)
    return path


# ---------------------------------------------------------------- prompts


def _template(name: str) -> str:
    # LitM strips trailing newlines of its prompt files before formatting
    return load_template(name).rstrip("\n")


def format_qa_prompt(question: str, documents: Sequence[Document]) -> str:
    """LitM's QA prompt: the template with one `Document [i](Title: <title>) <text>` line per document,
    numbered from 1, joined by single newlines."""
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    if not documents:
        raise ValueError(f"documents must be a non-empty list, got {documents!r}")
    if not all(isinstance(d, Document) for d in documents):
        raise TypeError("documents must all be kvlib.tasks.mdqa.Document")
    search_results = "\n".join(f"Document [{i}](Title: {d.title}) {d.text}" for i, d in enumerate(documents, 1))
    return _template("mdqa_qa.prompt").format(question=question, search_results=search_results)


def format_closedbook_prompt(question: str) -> str:
    """LitM's closed-book prompt (no documents)."""
    if not isinstance(question, str) or not question:
        raise ValueError(f"question must be a non-empty str, got {question!r}")
    return _template("mdqa_closedbook.prompt").format(question=question)


# ---------------------------------------------------------------- LitM settings: gold position, K documents


def _check_index(name: str, value, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")


def place_gold(example: MDQAExample, position: int) -> MDQAExample:
    """The example with its gold passage at 0-based `position`; the distractors keep their order (LitM's
    builder makes every gold_at_i file from the same distractors in the same order)."""
    if not isinstance(example, MDQAExample):
        raise TypeError(f"place_gold needs an MDQAExample, got {type(example).__name__}")
    _check_index("position", position, 0, len(example.documents) - 1)
    documents = example.distractors
    documents.insert(position, example.gold)
    return dataclasses.replace(example, documents=documents, gold_index=position)


def k_document_variant(example: MDQAExample, k: int, gold_position: int | None = None) -> MDQAExample:
    """The gold plus the top k-1 distractors, as LitM's builder picks them (the first k-1 non-answer
    passages in retrieval order); the gold stays where it is unless `gold_position` is given.

    Retrieval order is the documents' order; if they carry original_retrieval_index it must increase
    (a shuffled example has no "top" distractors)."""
    if not isinstance(example, MDQAExample):
        raise TypeError(f"k_document_variant needs an MDQAExample, got {type(example).__name__}")
    _check_index("k", k, 2, len(example.documents))  # LitM: at least 2 documents; the oracle is its own file
    distractors = example.distractors
    ranks = [d.original_retrieval_index for d in distractors]
    if all(r is not None for r in ranks) and any(a >= b for a, b in zip(ranks, ranks[1:])):
        raise ValueError(f"distractors of {example.qid} are not in retrieval order: {ranks}")
    position = example.gold_index if gold_position is None else gold_position
    if gold_position is None and position >= k:
        raise ValueError(f"the gold is at {position}, outside {k} documents: pass gold_position")
    _check_index("gold_position", position, 0, k - 1)
    documents = distractors[: k - 1]
    documents.insert(position, example.gold)
    return dataclasses.replace(example, documents=documents, gold_index=position)


# ---------------------------------------------------------------- random-distractor setting

# The paper's main MDQA figure uses random Wikipedia passages as distractors (LitM appendix; file from
# LitM issue #11, not available offline). We rebuild that setting from real DPR passages we do have.


@dataclass(frozen=True)
class DistractorPool:
    """Deduplicated passages to draw random distractors from. `searchable[i]` is the metric-normalised
    "title text" of `documents[i]`, padded with a space at each end (the prompt shows title and text,
    so an answer in the title counts too)."""

    documents: tuple[Document, ...]
    searchable: tuple[str, ...]
    from_retrieved: int  # distractor passages taken from retrieved-distractor examples
    from_oracle_gold: int  # gold passages taken from oracle examples
    duplicates_dropped: int

    def __len__(self) -> int:
        return len(self.documents)


def _searchable(document: Document) -> str:
    # padded with spaces so a whole-token needle " s " also matches at either end
    return f" {normalize_answer(f'{document.title} {document.text}')} "


# An answer normalising to one character ("S", "2" from "2%") occurs as a substring of nearly every
# passage: "s" of all 10,903 pool passages, so no distractor could be drawn at all. Such answers are
# matched as whole tokens instead, like the DPR/Contriever token matcher behind LitM's `hasanswer`
# (which does so for every answer). Longer answers use the metric's substring rule, stricter than LitM's.
_MIN_SUBSTRING_CHARS = 2


def _answer_needles(answers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(needles to find in a padded normalised passage, raw lower-cased needles to find verbatim).
    An answer like "*" normalises to "" and would "occur" everywhere: it is searched for verbatim."""
    if isinstance(answers, str) or not answers:
        raise ValueError(f"answers must be a non-empty list of str, got {answers!r}")
    needles, raw = [], []
    for answer in answers:
        n = normalize_answer(answer)
        if len(n) >= _MIN_SUBSTRING_CHARS:
            needles.append(n)
        elif n:
            needles.append(f" {n} ")
        elif answer.strip():
            raw.append(answer.strip().lower())
    if not needles and not raw:
        raise ValueError(f"no searchable answer among {answers!r}")
    return tuple(needles), tuple(raw)


def _mentions(searchable: str, document: Document, needles: tuple[tuple[str, ...], tuple[str, ...]]) -> bool:
    normalised, raw = needles
    if any(n in searchable for n in normalised):
        return True
    return bool(raw) and any(r in f"{document.title} {document.text}".lower() for r in raw)


def passage_has_answer(document: Document, answers: Sequence[str]) -> bool:
    """Whether a passage contains any answer under the metric's normalisation (normalised answer is a
    substring of the normalised title + text; a one-character answer must be a whole token; an answer
    that normalises to nothing, like "*", is searched for verbatim): such a passage is no distractor."""
    if not isinstance(document, Document):
        raise TypeError(f"passage_has_answer needs a Document, got {type(document).__name__}")
    return _mentions(_searchable(document), document, _answer_needles(answers))


def build_distractor_pool(
    retrieved_examples: Iterable[MDQAExample], oracle_examples: Iterable[MDQAExample]
) -> DistractorPool:
    """Pool = the distractors of `retrieved_examples` (e.g. the 441-question 20-document copy) + the
    gold passage of every `oracle_examples` question; duplicates (same id, else same title and text)
    dropped. Retrieval metadata is stripped: a score or rank for another question means nothing here.
    Sorted by content, so the pool does not depend on the order of its inputs."""
    candidates: list[tuple[str, Document]] = []
    for example in retrieved_examples:
        if not isinstance(example, MDQAExample):
            raise TypeError("retrieved_examples must all be MDQAExample")
        candidates += [("retrieved", d) for d in example.distractors]
    for example in oracle_examples:
        if not isinstance(example, MDQAExample):
            raise TypeError("oracle_examples must all be MDQAExample")
        candidates.append(("oracle", example.gold))
    seen_ids, seen_texts, kept, counts = set(), set(), [], {"retrieved": 0, "oracle": 0}
    for source, d in candidates:
        if (d.id is not None and d.id in seen_ids) or (d.title, d.text) in seen_texts:
            continue
        seen_texts.add((d.title, d.text))
        if d.id is not None:
            seen_ids.add(d.id)
        kept.append(Document(d.title, d.text, d.id, is_gold=False))
        counts[source] += 1
    if not kept:
        raise ValueError("the distractor pool is empty")
    kept.sort(key=lambda d: (d.title, d.text, d.id or ""))
    return DistractorPool(tuple(kept), tuple(_searchable(d) for d in kept), counts["retrieved"],
                          counts["oracle"], len(candidates) - len(kept))


def _excluded(pool: DistractorPool, i: int, example: MDQAExample, needles) -> bool:
    candidate = pool.documents[i]
    own_gold = (candidate.title, candidate.text) == (example.gold.title, example.gold.text)
    return own_gold or _mentions(pool.searchable[i], candidate, needles)


def excluded_passages(example: MDQAExample, pool: DistractorPool) -> list[int]:
    """Indices of pool passages that may not be distractors for `example` (they contain an answer, or
    are its own gold). A full scan: for audits and statistics; the builder checks lazily."""
    needles = _answer_needles(example.answers)
    return [i for i in range(len(pool)) if _excluded(pool, i, example, needles)]


def _question_rng(seed: int, qid: str) -> random.Random:
    # one stream per question: a question's distractors do not depend on which other questions are built
    return random.Random(f"kvlib/mdqa-random/{seed}/{qid}")


def _draw_distractors(example: MDQAExample, pool: DistractorPool, count: int, seed: int) -> list[Document]:
    """`count` distinct pool passages, uniformly at random among the allowed ones: visit pool indices
    in a seeded random order (distinct indices) and keep allowed passages until `count` are kept. A
    longer draw with the same seed extends a shorter one, so K=10 is a prefix of K=30."""
    rng, needles = _question_rng(seed, example.qid), _answer_needles(example.answers)
    chosen, visited = [], set()
    while len(chosen) < count:
        if len(visited) == len(pool):
            raise ValueError(f"the pool has only {len(chosen)} passages without an answer of {example.qid} "
                             f"({example.question!r}); {count} needed")
        i = rng.randrange(len(pool))
        if i in visited:
            continue
        visited.add(i)
        if not _excluded(pool, i, example, needles):
            d = pool.documents[i]
            chosen.append(dataclasses.replace(d, has_answer=False))  # checked just above
    return chosen


def build_random_distractor_set(
    oracle_examples: Sequence[MDQAExample], pool: DistractorPool, num_documents: int, seed: int
) -> list[MDQAExample]:
    """For each question, its gold passage at position 0 followed by num_documents - 1 random pool
    passages that contain none of its answers (see `passage_has_answer`) and are not its own gold.
    Use `place_gold` to move the gold; the distractors and their order stay fixed. Deterministic per
    (seed, qid), independent of the order and number of questions given."""
    if not isinstance(pool, DistractorPool):
        raise TypeError(f"pool must be a DistractorPool, got {type(pool).__name__}")
    _check_index("num_documents", num_documents, 2, len(pool) + 1)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    examples = list(oracle_examples)
    if not examples or not all(isinstance(e, MDQAExample) for e in examples):
        raise ValueError("oracle_examples must be a non-empty list of MDQAExample")
    built = []
    for example in examples:
        distractors = _draw_distractors(example, pool, num_documents - 1, seed)
        built.append(dataclasses.replace(example, documents=[example.gold] + distractors, gold_index=0))
    return built


# ---------------------------------------------------------------- which questions were used


def question_ids(examples: Iterable[MDQAExample]) -> set[str]:
    """The qids of the examples."""
    ids = set()
    for example in examples:
        if not isinstance(example, MDQAExample):
            raise TypeError(f"expected MDQAExample, got {type(example).__name__}")
        ids.add(example.qid)
    return ids


def write_question_ids(path: str | Path, examples: Sequence[MDQAExample], setting: str, source: str) -> Path:
    """JSON record of the questions an evaluation used (sorted qids, the id scheme, setting, source
    file), for later contamination checks against finetuning data."""
    _check_str("setting", setting)
    _check_str("source", source)
    examples = list(examples)
    ids = question_ids(examples)
    if not ids:
        raise ValueError("write_question_ids needs at least one example")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"id_scheme": QID_SCHEME, "setting": setting, "source": source,
              "num_examples": len(examples), "num_questions": len(ids), "qids": sorted(ids)}
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def read_question_ids(path: str | Path) -> set[str]:
    """The qids written by `write_question_ids` (checks the id scheme matches this version)."""
    record = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("id_scheme") != QID_SCHEME or not isinstance(
        record.get("qids"), list
    ):
        raise ValueError(f"{path}: not a kvlib question-id file with id_scheme {QID_SCHEME!r}")
    return set(record["qids"])


# ---------------------------------------------------------------- evaluation sets (notebook 03)

SETTINGS = {"random": SETTING_RANDOM, "retrieved": SETTING_RETRIEVED}
RETRIEVED_DOCUMENTS = 20  # LitM's retrieved-distractor files hold 20 documents per question
MAX_RANDOM_DOCUMENTS = 200  # random distractors: any K (the paper's longer-context test uses 120)


@dataclass(frozen=True)
class MDQAEvalSet:
    """One distractor setting's questions, each with its K documents in a fixed order and the gold first;
    `place_gold` moves the gold to each evaluated position (the distractors stay in the same order)."""

    setting: str  # "random" | "retrieved"
    label: str  # how reports name it (SETTINGS)
    examples: list[MDQAExample]
    source: str  # where the questions and documents came from, with the question counts
    files: tuple[Path, ...] = ()  # the data files read to build it (recorded with their hashes in the manifest)
    # which file the questions were drawn from ("official": LitM's complete 20-document file, "subset": the
    # 441-question subset, "oracle": the oracle file) and how many questions it holds
    questions_from: str = ""
    pool_questions: int = 0


def sample_questions(examples: Sequence[MDQAExample], n: int | None, seed: int) -> list[MDQAExample]:
    """`n` examples drawn without replacement with `seed` (all when n is None), in file order."""
    examples = list(examples)
    if n is None or n >= len(examples):
        return examples
    chosen = sorted(random.Random(f"kvlib/mdqa-questions/{seed}").sample(range(len(examples)), n))
    return [examples[i] for i in chosen]


def build_eval_sets(settings: Sequence[str], num_documents: int, num_questions: int | None, question_seed: int,
                    distractor_seed: int, data_dir: str | Path | None = None,
                    random_documents_file: str | Path | None = None) -> dict[str, MDQAEvalSet]:
    """The MDQA evaluation sets of the paper's two settings, on the SAME questions.

    Questions: drawn with `question_seed` from the questions whose real retrieved distractors the data
    directory holds (so both panels ask the same questions): all 2655 with LitM's official 20-document file,
    the first 441 with the offline subset (kvlib.engine.data.mdqa_paths says which); "random" alone draws from all
    2655 of the oracle file. Each set's `source` names the file and its question count, `questions_from`
    and `pool_questions` say the same as data.
    - retrieved: LitM's K-document variant (gold + the top K-1 retrieved distractors).
    - random: with LitM's random-documents file (`random_documents_file`, else <data>/mdqa/
      nq-open-random-documents.jsonl.gz when present and holding every drawn question with at least K
      documents) its top K-1 passages; otherwise K-1 random DPR passages without any answer (see
      build_random_distractor_set), drawn with `distractor_seed` from the pool of every retrieved distractor +
      the other questions' gold passages.
    """

    unknown = [s for s in settings if s not in SETTINGS]
    if unknown or not settings:
        raise ParamError(f"settings: expected a non-empty list of {list(SETTINGS)}, got {list(settings)!r}")
    paths = mdqa_paths(data_dir)
    oracle, _ = load_mdqa(paths["oracle"])
    retrieved_file = Path(paths["retrieved_20docs"][0])  # gold at 0 + the 19 retrieved distractors in order
    retrieved, _ = load_mdqa(retrieved_file)
    kind = paths["retrieved_20docs_source"]
    retrieved_text = (f"{_data_relative(retrieved_file, data_dir)} ({'LitM official' if kind == 'official' else kind}: "
                      f"{len(retrieved)} of {MDQA_QUESTIONS} questions)")
    if "retrieved" in settings:
        pool_questions, questions_from, pool_text = retrieved, kind, retrieved_text
    else:
        pool_questions, questions_from = oracle, "oracle"
        pool_text = f"{_data_relative(paths['oracle'], data_dir)} ({len(oracle)} questions)"
    questions = sample_questions(pool_questions, num_questions, question_seed)
    drawn = f"{len(questions)} questions drawn with seed {question_seed} from {pool_text}"
    sets = {}
    if "retrieved" in settings:
        examples = [k_document_variant(e, num_documents, gold_position=0) for e in questions]
        sets["retrieved"] = MDQAEvalSet("retrieved", SETTING_RETRIEVED, examples, f"{drawn}; retrieved distractors",
                                        (retrieved_file,), questions_from, len(pool_questions))
    if "random" in settings:
        by_qid = {e.qid: e for e in oracle}
        golds = [by_qid[e.qid] for e in questions]
        official_file, official, skipped = random_documents_file, None, ""
        if official_file is None and paths["random_documents"] is not None:
            official_file = paths["random_documents"]
            official, skipped = _read_random_file(official_file, golds, num_documents)
            if skipped:
                skipped = f"; LitM's random-distractor file {_data_relative(official_file, data_dir)} not used: {skipped}"
                official_file = None
        if official_file is not None:
            official = official if official is not None else load_mdqa(official_file)[0]
            official_by_qid = {e.qid: e for e in official}
            missing = [e.question for e in golds if e.qid not in official_by_qid]
            if missing:
                raise ParamError(f"random_documents_file: {len(missing)} questions missing, e.g. {missing[0]!r}")
            examples = [k_document_variant(official_by_qid[e.qid], num_documents, gold_position=0) for e in golds]
            source = f"{drawn}; distractors: LitM's random-distractor file {_data_relative(official_file, data_dir)}"
            files = (Path(paths["oracle"]), Path(official_file))
        else:
            pool = build_distractor_pool(retrieved, oracle)
            examples = build_random_distractor_set(golds, pool, num_documents, distractor_seed)
            source = (f"{drawn}; distractors derived: {len(pool)} DPR passages ({pool.from_retrieved} retrieved "
                      f"distractors of {retrieved_text}, {pool.from_oracle_gold} gold passages of "
                      f"{_data_relative(paths['oracle'], data_dir)}), seed {distractor_seed}{skipped}")
            files = (retrieved_file, Path(paths["oracle"]))
        sets["random"] = MDQAEvalSet("random", SETTING_RANDOM, examples, source, files, questions_from,
                                     len(pool_questions))
    return {s: sets[s] for s in settings}


def _read_random_file(path: Path, golds: Sequence[MDQAExample], num_documents: int) -> tuple[list | None, str]:
    """(its examples, "") when LitM's random-documents file found in the data directory can serve these
    questions, else (None, why not): it is read only when it holds every question with enough passages (its
    layout was never inspected offline, see the module docstring)."""
    try:
        examples, _ = load_mdqa(path)
    except (ValueError, OSError) as exc:
        return None, f"unreadable ({' '.join(str(exc).split())[:160]})"
    by_qid = {e.qid: e for e in examples}
    missing = [e for e in golds if e.qid not in by_qid]
    if missing:
        return None, f"{len(missing)} of the {len(golds)} questions are not in it"
    short = [e for e in golds if len(by_qid[e.qid].documents) < num_documents]
    if short:
        return None, f"{len(short)} questions have fewer than {num_documents} documents there"
    return examples, ""


def _data_relative(path: str | Path, data_dir: str | Path | None) -> str:
    # results name data files relative to the data directory, so they do not depend on where it lives

    try:
        return str(Path(path).resolve().relative_to(resolve_data_dir(data_dir).resolve()))
    except ValueError:
        return str(path)


def position_prompts(example: MDQAExample, positions: Sequence[int]) -> list[tuple[int, str]]:
    """(1-based gold position, LitM QA prompt) for each position: the same documents, only the gold moves."""
    out = []
    for position in positions:
        placed = place_gold(example, position - 1)
        out.append((position, format_qa_prompt(placed.question, placed.documents)))
    return out


def accuracy_table(rows: list[dict], keys: Sequence[str]):
    """Accuracy with 95% CIs (Wilson) per `keys` group (e.g. setting, model, position), with the over-length
    prompts of each group counted beside (not scored): the table notebooks 03 and 08 save and plot."""
    import pandas as pd


    keys = list(keys)
    table = pd.DataFrame(evaluate.summarize(rows, keys, ["correct"])).merge(
        pd.DataFrame(evaluate.count_over_length(rows, keys)).drop(columns="n_items"), on=keys)
    return table.rename(columns={"correct": "accuracy", "correct_ci_low": "accuracy_ci_low",
                                 "correct_ci_high": "accuracy_ci_high"})


POSITION_CAPTION = ("Top: accuracy by position of the gold document, one line per model (a seed group: the mean over its "
                    "seeds), shaded: 95% interval over questions. Bottom: each model's difference from the original at "
                    "each position, paired by question, with its 95% interval (a seed group: seeds and questions "
                    "resampled).")


def position_curves(rows: list[dict], base: str, seed_groups: Mapping[str, Sequence[str]], seed: int = 0,
                    margin: float | None = None):
    """What the by-position figure shows (notebooks 03 and 08; kvlib.report.plots.accuracy_curves), as (levels,
    deltas) DataFrames. `levels`: accuracy per setting, model and gold position (`accuracy_table`), each seed
    group in place of its members (per question the mean over the group's seeds,
    kvlib.engine.evaluate.seed_group_means, so its interval is across questions). `deltas`: each model's or
    group's difference from `base` per setting and position (paired_deltas; groups: seed_group_deltas, the
    seeds-and-items interval claims are judged with), `delta_correct` with ci_low/ci_high."""
    import pandas as pd

    members = {m for ms in seed_groups.values() for m in ms}
    level_rows = [r for r in rows if r["model"] not in members]
    if seed_groups:
        level_rows += evaluate.seed_group_means(rows, seed_groups, ["setting", "position", "qid"], ["correct"])
    deltas = paired_deltas(rows, base, ["setting", "position"], "correct", "qid", margin=margin)
    if seed_groups:
        deltas = with_seed_groups(deltas, seed_group_deltas(rows, base, seed_groups, ["setting", "position"],
                                                            "correct", "qid", seed=seed, margin=margin), seed_groups)
    return accuracy_table(level_rows, ["setting", "model", "position"]), pd.DataFrame(deltas)


def evaluate_mdqa(backend: Any, eval_set: Any, positions: Sequence[int], max_new_tokens: int,
                  label: str, final_answer: Callable[[str], str] | None = None) -> list[dict]:
    """Every question of a kvlib.tasks.mdqa.MDQAEvalSet with its gold at each 1-based position, answered through the
    chat template (LitM's prompt as the user turn) and scored with LitM's metric. One row per (question,
    position); a prompt over the model's context gets `over_length=True`, `correct=None` (counted, not scored).
    `final_answer`: what of a reply is scored, for a model trained to write something before its answer (its
    result goes in the row's `final_answer`); default the whole reply."""

    keys, requests = [], []
    for example in eval_set.examples:
        for position, prompt in position_prompts(example, positions):
            keys.append((example, position))
            requests.append([{"role": "user", "content": prompt}])
    # a reply whose final answer comes after other text (final_answer) is read past its first line
    stop = MDQA_ANSWER_END if final_answer is None else None
    answers = answer_requests(backend, requests, max_new_tokens, stop)
    fields = result_fields(backend, max_new_tokens, stop)
    rows = []
    for (example, position), answer in zip(keys, answers):
        scored = answer if answer is None or final_answer is None else final_answer(answer)
        rows.append({"model": label, "setting": eval_set.label, "position": position,
                     "num_documents": len(example.documents), "qid": example.qid, "question": example.question,
                     "answers": " | ".join(example.answers), "response": answer, "over_length": answer is None,
                     "correct": None if answer is None else score_mdqa_answer(scored, example.answers), **fields,
                     **({} if final_answer is None else {"final_answer": scored})})
    return rows


def mdqa_question_means(rows: Sequence[dict]) -> list[dict]:
    """MDQA rows pooled over gold positions: per (model, setting, question) the mean correctness over the
    positions it was scored at (None when none was), so paired CIs resample questions, not prompts."""

    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["model"], r["setting"], r["qid"]), []).append(r["correct"])
    return [{"model": m, "setting": s, "qid": q,
             "correct": (statistics.fmean(float(v) for v in vals if v is not None)
                         if any(v is not None for v in vals) else None)}
            for (m, s, q), vals in groups.items()]


def mdqa_pooled_deltas(rows: list[dict], base: str, seed_groups: Mapping[str, Sequence[str]],
                       margin: float | None = None) -> tuple[list[dict], list[dict]]:
    """MDQA differences from `base` pooled over gold positions (per question, its mean over positions, so the
    intervals treat questions as the items), per setting; with seed groups, each group's seed-averaged row
    replaces its members (`with_seed_groups`). When both of the paper's settings were run, the pooled rows also
    hold each model's gain contrast between them (`mdqa_contrast_deltas`, setting SETTING_CONTRAST).
    Returns (pooled rows, seed-group rows)."""

    means = mdqa_question_means(rows)
    pooled = paired_deltas(means, base, ["setting"], "correct", "qid", margin=margin)
    seed_rows = (seed_group_deltas(means, base, seed_groups, ["setting"], "correct", "qid", margin=margin)
                 if seed_groups else [])
    if seed_groups:
        pooled = with_seed_groups(pooled, seed_rows, seed_groups)
    if {SETTING_RANDOM, SETTING_RETRIEVED} <= {r["setting"] for r in rows}:
        pooled += mdqa_contrast_deltas(rows, base, seed_groups, SETTING_RANDOM, SETTING_RETRIEVED, margin=margin)
    return pooled, seed_rows


def pooled_keys(settings: Sequence[str]) -> list[dict]:
    """What `mdqa_pooled_deltas`' rows are keyed by, for the settings (labels) evaluated: each setting, and the
    contrast when both of the paper's are there (the rows a model left out of the evaluation has none of, so its
    claims get placeholders: kvlib.pipeline.runs.LearnedGate)."""
    keys = [{"setting": s} for s in settings]
    return keys + ([{"setting": SETTING_CONTRAST}] if {SETTING_RANDOM, SETTING_RETRIEVED} <= set(settings) else [])


def mdqa_contrast_deltas(rows: Sequence[dict], base: str, seed_groups: Mapping[str, Sequence[str]], first: str,
                         second: str, seed: int = 0, n_boot: int = 2000, margin: float | None = None) -> list[dict]:
    """Per model (seed groups in place of their members): its gain over `base` in setting `first` minus its gain
    in setting `second`, paired by question (each question's mean over gold positions, on the questions every
    model involved scored in both settings): the paper's Fig. 10 contrast, finetuning helps with random
    distractors and not with retrieved ones. Interval and p-values: kvlib.engine.stats.contrast_test (paired t floored
    by MOVER of the two Newcombe intervals), seed groups kvlib.engine.stats.seed_contrast_test (two-stage bootstrap,
    same floor). One row per model: setting = SETTING_CONTRAST, n_pairs, delta_correct, ci_low,
    ci_high, ci_method and the p-values of `paired_deltas`."""

    score: dict[tuple[str, str], dict] = {}
    for r in mdqa_question_means(rows):
        if r["correct"] is not None:
            score.setdefault((r["model"], r["setting"]), {})[r["qid"]] = float(r["correct"])
    members = {m for ms in seed_groups.values() for m in ms}
    labels = [m for m in dict.fromkeys(r["model"] for r in rows) if m != base and m not in members]
    arms = {label: [label] for label in labels} | {g: list(ms) for g, ms in seed_groups.items()}
    out = []
    for label, models in arms.items():
        involved = [base, *models]
        qids = sorted(set.intersection(*(set(score.get((m, s), {})) for m in involved for s in (first, second))),
                      key=str)
        row = {"setting": SETTING_CONTRAST, "model": label, "base": base, "n_pairs": len(qids), "n_unpaired": None}
        if qids:
            x1 = np.array([[score[(m, first)][q] for q in qids] for m in models])
            x2 = np.array([[score[(m, second)][q] for q in qids] for m in models])
            y1 = np.array([score[(base, first)][q] for q in qids])
            y2 = np.array([score[(base, second)][q] for q in qids])
            test = (contrast_test(x1[0], y1, x2[0], y2) if len(models) == 1
                    else seed_contrast_test(x1, y1, x2, y2, n_boot=n_boot, seed=seed))
            row.update({"delta_correct": test.estimate, **test.row(margin)})
        out.append(row)
    return out
