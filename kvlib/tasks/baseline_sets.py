"""Baseline finetuning sets (paper Fig. 5 and §4: finetuning on MDQA itself, MultidocQA, IN2 and
needle-in-a-haystack data), token-matched to the synthetic sets and checked for contamination.

None of the original baseline datasets can be downloaded here, so each is REGENERATED from its published
recipe on real text (every sample's meta says `"source": "regenerated"`). Differences from the originals:

- ``mdqa`` (the paper's "finetuned on MDQA"): LitM's QA prompt (kvlib.tasks.mdqa.format_qa_prompt) with
  `num_documents` documents in the random-distractor setting (kvlib.tasks.mdqa.build_random_distractor_set) and
  the gold at a uniformly random position, on NQ questions of the LitM oracle file that no MDQA evaluation
  asks (the 441-question pool of both settings and every set in the reference are excluded, as is any
  question whose gold passage is an evaluation gold passage; evaluation gold passages are also removed
  from the distractor pool). The paper had GPT-3.5 turn the answer into a complete sentence; here a fixed
  template (kvlib/tasks/templates/baseline_mdqa.answer.txt) does, unless a `rewrite(question, answer) -> str`
  callable is given (e.g. a cached OpenAI-compatible backend). The answer used is the first NQ answer that
  occurs in the gold passage. These questions are NQ-Open dev questions: the NQ-Open benchmark must drop
  them (kvlib.tasks.contamination.training_question_ids, kvlib.tasks.general.drop_questions).
- ``multidocqa`` (Yu 2024, "paraphrasing the original text"): the original is CommonCrawl documents with
  LLM-written questions and answers that first restate the relevant original text. Here: HotpotQA
  (distractor setting) and 2WikiMultihopQA records (their 10 titled paragraphs; MuSiQue is left out because
  it composes questions from Natural Questions), lengthened to the sample's token target with paragraphs of
  other records (never one with a title of the record or, unless the answer is yes/no, one that mentions
  the answer), in random order. The target quotes every supporting-fact sentence verbatim ("Document [i]:
  "..."", kvlib/tasks/templates/baseline_multidocqa.*.txt), then answers with the dataset's short answer. Questions
  are multi-hop (2-4 documents), not about one document as in most of the original. The original release
  format (the authors' JSON/JSONL with `context`/`questions`/`answers` or `messages`) reads with
  `load_multidocqa_release`.
- ``in2`` (An et al. 2024, IN2 training): the original splits a realnewslike corpus into 128-token segments
  and has GPT-4 write question-answer pairs on one segment or on several. Here segments are whole real
  paragraphs of about `segment_tokens` tokens (between half and twice that; SQuAD and HotpotQA paragraphs,
  whitespace-normalised, one per line); a question is a SQuAD question with its paragraph
  (one segment, answer = the SQuAD span) or, with probability `in2_two_segment_fraction`, a HotpotQA question
  with exactly two supporting paragraphs placed at least half the context apart (two segments). No LLM: the
  answers are the datasets' short answers.
- ``niah`` (needle in a haystack, as the paper's baseline): the original test's haystack (the Paul Graham
  essays of <data>/niah, concatenated in sorted file-name order, starting at a random sentence, cut at a
  sentence end to the sample's token target) and insertion rule (a depth drawn uniformly in [0, 1], moved
  back to the end of the sentence before it). The paper's needle set is unpublished; needles here are real
  factual sentences with their question: the SQuAD sentence that holds the answer span, or the supporting
  sentences of a HotpotQA question that contain its answer. Haystacks never mention the answer. The
  target states the answer (kvlib/tasks/templates/baseline_niah.answer.txt); the prompt is the original test's.

Token matching (`BaselineConfig.token_total`, `sample_tokens`; `matched_config` reads both from a synthetic
set): samples are drawn until their prompt + answer tokens (the target model's tokenizer, no chat template)
reach the total, each with a length target drawn uniformly from `sample_tokens` (the last one aimed at the
remainder; ``mdqa`` samples have the length their documents give); every sample must lie in
`sample_tokens` and the total within `token_tolerance` of `token_total`, else ParamError. `token_report`
gives the totals for manifests.

Every build runs the contamination guard (kvlib.tasks.contamination.check_contamination) against every evaluation
set and fails on any overlap. Files: kvlib.tasks.synthetic.write_split (`train.jsonl` in the chat format
`kvlib train` reads, `train.openai.jsonl`, `train.meta.jsonl`), plus `config.json` and `stats.json`.

Determinism: sample i draws every random number from `random.Random(f"kvlib/baselines/{seed}/{kind}/{i}")`
and the record order from `.../{kind}/order`, so a seed gives byte-identical files.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Literal, Sequence

from kvlib.engine.config import ParamError, check_fraction, check_positive, check_range, fail, to_mapping
from kvlib.engine.data import mdqa_paths, read_jsonl, resolve_data_dir
from kvlib.engine.models import MemoTokenCounter, load_token_counter
from kvlib.engine.scoring import normalize_answer
from kvlib.tasks.contamination import check_contamination, load_eval_reference, passage_key
from kvlib.tasks.mdqa import (
    DistractorPool,
    build_distractor_pool,
    build_random_distractor_set,
    format_qa_prompt,
    load_mdqa,
    passage_has_answer,
    place_gold,
)
from kvlib.tasks.synthetic import Sample, load_dataset, load_template, write_split

Kind = Literal["mdqa", "multidocqa", "in2", "niah"]
KINDS = ("mdqa", "multidocqa", "in2", "niah")
SOURCE = "regenerated"
MULTIHOP_DATASETS = ("hotpotqa", "2wikimultihopqa")
Rewrite = Callable[[str, str], str]

# the real-text files each generator reads, relative to the data directory (see each folder's SOURCE.md)
_MULTIHOP_FILES = {
    "hotpotqa": ("hotpotqa/HippoRAG_train100/hotpotqa_train.json", "hotpotqa/benchfortir_dev500/test.jsonl",
                 "hotpotqa/MIGRES_dev200/hotpot.json"),
    "2wikimultihopqa": ("2wikimultihopqa/MIGRES_train500/wikihop_train_preprocess.json",
                        "2wikimultihopqa/MIGRES_dev200/wikihop.json"),
}
_SQUAD_FILE = "squad/mrc_odqa_tutorial_20articles/dev.json"
_ESSAYS_DIR = "niah/PaulGrahamEssays"


@dataclass
class BaselineConfig:
    """One baseline training set. `kind` picks the generator; fields of other kinds are ignored."""

    kind: Kind = "mdqa"
    n_samples: int = 350  # used when token_total is 0
    token_total: int = 0  # > 0: draw samples until their prompt + answer tokens reach this total
    token_tolerance: float = 0.05  # |total - token_total| <= tolerance x token_total
    sample_tokens: tuple[int, int] = (256, 4096)  # per-sample prompt + answer tokens (inclusive)
    tokenizer: str = "smollm2-135m-instruct"  # the target model's
    seed: int = 0
    max_resample: int = 50  # redraws of one sample before giving up
    data_dir: str | None = None  # None: $KVLIB_DATA_DIR or ../shared/data
    num_documents: int = 20  # mdqa: documents per prompt (the paper's 20)
    multidocqa_datasets: list[str] = field(default_factory=lambda: list(MULTIHOP_DATASETS))
    segment_tokens: int = 128  # in2: target segment length
    in2_two_segment_fraction: float = 0.5  # in2: share of questions that need two segments

    def validate(self) -> None:
        if self.kind not in KINDS:
            fail("kind", f"must be one of {list(KINDS)}, got {self.kind!r}")
        check_positive("n_samples", self.n_samples)
        check_positive("token_total", self.token_total, 0)
        if not 0 < self.token_tolerance < 1:
            fail("token_tolerance", f"must be in (0, 1), got {self.token_tolerance}")
        check_range("sample_tokens", self.sample_tokens, minimum=16)
        if self.token_total and self.token_total < self.sample_tokens[0]:
            fail("token_total", f"must be 0 or at least sample_tokens[0]={self.sample_tokens[0]}, got {self.token_total}")
        if not self.tokenizer.strip():
            fail("tokenizer", "must name the target model's tokenizer")
        check_positive("max_resample", self.max_resample)
        if self.kind == "mdqa" and not 2 <= self.num_documents <= 100:
            fail("num_documents", f"must be in [2, 100], got {self.num_documents}")
        if self.kind == "multidocqa":
            bad = [d for d in self.multidocqa_datasets if d not in MULTIHOP_DATASETS]
            if bad or not self.multidocqa_datasets:
                fail("multidocqa_datasets", f"expected a non-empty list of {list(MULTIHOP_DATASETS)} (MuSiQue is "
                                            f"left out: it composes questions from Natural Questions), got "
                                            f"{self.multidocqa_datasets!r}")
        if self.kind == "in2":
            check_positive("segment_tokens", self.segment_tokens, 16)
            check_fraction("in2_two_segment_fraction", self.in2_two_segment_fraction)
            if self.sample_tokens[0] < 4 * self.segment_tokens:
                fail("sample_tokens", f"in2 needs room for several segments: sample_tokens[0] must be >= 4 x "
                                      f"segment_tokens = {4 * self.segment_tokens}, got {self.sample_tokens[0]}")


# ---------------------------------------------------------------- real-text sources


@dataclass(frozen=True)
class Paragraph:
    """A titled paragraph; `text` joins the stripped sentences with single spaces, so every sentence
    occurs verbatim in it."""

    title: str
    sentences: tuple[str, ...]

    @property
    def text(self) -> str:
        return " ".join(s.strip() for s in self.sentences if s.strip())


@dataclass(frozen=True)
class MultihopRecord:
    """A HotpotQA / 2WikiMultihopQA question with its paragraphs; `supporting` lists (paragraph index,
    sentence index) of the supporting facts."""

    id: str
    dataset: str
    question: str
    answer: str
    paragraphs: tuple[Paragraph, ...]
    supporting: tuple[tuple[int, int], ...]

    @property
    def supporting_paragraphs(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys(p for p, _ in self.supporting))


@dataclass(frozen=True)
class SquadQA:
    """A SQuAD question with its paragraph (whitespace-normalised) and the answer's character offset in it."""

    id: str
    title: str
    question: str
    answer: str
    answer_start: int
    paragraph: str


def _read_json_or_jsonl(path: Path) -> list:

    with path.open(encoding="utf-8") as fh:
        head = fh.read(64).lstrip()
    if head.startswith("["):
        return json.loads(path.read_text(encoding="utf-8"))
    return read_jsonl(path)


def _multihop_record(raw: dict, dataset: str) -> MultihopRecord | None:
    """A record of HotpotQA's original format, or None when it has no context or a supporting fact that
    does not resolve (a title missing from the context, a sentence index out of range)."""
    if not raw.get("context") or not isinstance(raw.get("answer"), str) or not raw["answer"].strip():
        return None
    paragraphs = tuple(Paragraph(t, tuple(s)) for t, s in raw["context"])
    index = {}
    for k, p in enumerate(paragraphs):
        index.setdefault(p.title, k)
    supporting = []
    for title, sent in raw.get("supporting_facts", []):
        k = index.get(title)
        if k is None or not 0 <= sent < len(paragraphs[k].sentences) or not paragraphs[k].sentences[sent].strip():
            return None
        supporting.append((k, sent))
    if not supporting:
        return None
    return MultihopRecord(str(raw["_id"]), dataset, raw["question"].strip(), raw["answer"].strip(), paragraphs,
                          tuple(dict.fromkeys(supporting)))


@lru_cache(maxsize=4)
def load_multihop(data_dir: str, datasets: tuple[str, ...] = MULTIHOP_DATASETS) -> tuple[MultihopRecord, ...]:
    """Every usable record of the HotpotQA and 2WikiMultihopQA files of the data directory, deduplicated by
    id (the first file wins), sorted by (dataset, id)."""
    root = Path(data_dir)
    seen: dict[str, MultihopRecord] = {}
    for dataset in datasets:
        for rel in _MULTIHOP_FILES[dataset]:
            for raw in _read_json_or_jsonl(root / rel):
                record = _multihop_record(raw, dataset)
                if record is not None and record.id not in seen:
                    seen[record.id] = record
    return tuple(sorted(seen.values(), key=lambda r: (r.dataset, r.id)))


def _clean(text: str) -> str:
    return " ".join(text.split())


@lru_cache(maxsize=4)
def load_squad(data_dir: str) -> tuple[SquadQA, ...]:
    """The SQuAD questions of the data directory whose (first) answer span is intact after whitespace
    normalisation, in file order."""
    data = json.loads((Path(data_dir) / _SQUAD_FILE).read_text(encoding="utf-8"))
    out = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                ans = qa["answers"][0]
                start = ans["answer_start"]
                if context[start:start + len(ans["text"])] != ans["text"] or not ans["text"].strip():
                    continue
                before = _clean(context[:start])
                answer = _clean(ans["text"])
                clean = _clean(context)
                offset = len(before) + (1 if before else 0)
                if clean[offset:offset + len(answer)] != answer:
                    continue
                out.append(SquadQA(qa["id"], article["title"], qa["question"].strip(), answer, offset, clean))
    return tuple(out)


_SENTENCE_END = re.compile(r"(?<=\.)(?=\s)")


@lru_cache(maxsize=4)
def load_essays(data_dir: str) -> tuple[str, ...]:
    """The haystack as sentence pieces: the essays in sorted file-name order, each split after every '.'
    that whitespace follows (the pieces join back to the exact text). Stubs (< 1000 characters) skipped."""
    pieces = []
    for path in sorted((Path(data_dir) / _ESSAYS_DIR).glob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if len(text) >= 1000:
            pieces += [p for p in _SENTENCE_END.split(text) if p]
    return tuple(pieces)


# ---------------------------------------------------------------- MultidocQA release format


def load_multidocqa_release(path: str | Path) -> list[Sample]:
    """Samples of the original MultidocQA / Long-Instruction-with-Paraphrasing release (HF
    yuyijiong/...; JSON list or JSONL), in the two layouts its training script reads: `{"context",
    "questions": [...], "answers": [...]}` (one sample per question, user turn = context + newline +
    question; the script joins them with a literal "/n", a typo) or `{"messages": [...]}` (first user turn
    and the assistant turn after it). Meta says `"source": "official"`."""
    path = Path(path)
    rows = _read_json_or_jsonl(path)
    samples = []
    for k, row in enumerate(rows):
        where = f"{path}:{k + 1}"
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected an object, got {type(row).__name__}")
        if {"context", "questions", "answers"} <= set(row):
            qs, ans = row["questions"], row["answers"]
            if not isinstance(qs, list) or not isinstance(ans, list) or len(qs) != len(ans) or not qs:
                raise ValueError(f"{where}: questions and answers must be lists of the same non-zero length")
            for j, (q, a) in enumerate(zip(qs, ans)):
                samples.append(Sample(f"{row['context']}\n{q}", a, {"id": f"multidocqa-release-{k}-{j}",
                                                                    "question": q, "source": "official"}))
        elif isinstance(row.get("messages"), list):
            msgs = row["messages"]
            users = [i for i, m in enumerate(msgs) if m.get("role") == "user"]
            if not users or users[0] + 1 >= len(msgs) or msgs[users[0] + 1].get("role") != "assistant":
                raise ValueError(f"{where}: messages need a user turn followed by an assistant turn")
            u = users[0]
            samples.append(Sample(msgs[u]["content"], msgs[u + 1]["content"],
                                  {"id": f"multidocqa-release-{k}", "source": "official"}))
        else:
            raise ValueError(f"{where}: expected context/questions/answers or messages, got keys {sorted(row)}")
    return samples


# ---------------------------------------------------------------- shared drawing helpers


def _stream(cfg: BaselineConfig, what: str | int) -> random.Random:
    return random.Random(f"kvlib/baselines/{cfg.seed}/{cfg.kind}/{what}")


def _mentions(text: str, answer: str) -> bool:
    """Whether `text` mentions `answer` under the metric's normalisation (whole tokens for short answers)."""
    a = normalize_answer(answer)
    if not a:
        return answer.strip().lower() in text.lower()
    return f" {a} " in f" {normalize_answer(text)} "


def _yes_no(answer: str) -> bool:
    return normalize_answer(answer) in ("yes", "no")


def _no_period(answer: str) -> str:
    return answer[:-1] if answer.endswith(".") else answer


def _fill(candidates, budget: int, counter: MemoTokenCounter, sep: int = 1, batch: int = 16, patience: int = 64) -> list:
    """Items from the iterator `candidates` (item, text), in order, whose tokens (+ `sep` each) fit `budget`.
    A candidate that does not fit the room left is skipped (best fit: the last items are the short ones
    that still fit); the fill stops after `patience` misfits in a row, or when under 8 tokens are left."""
    chosen, used, buffer, misses = [], 0, [], 0
    while misses < patience and budget - used >= 8:
        if not buffer:
            buffer = [c for _, c in zip(range(batch), candidates)]
            if not buffer:
                break
            counter.prime([text for _, text in buffer])
        item, text = buffer.pop(0)
        cost = counter[text] + sep
        if used + cost > budget:
            misses += 1
            continue
        chosen.append(item)
        used, misses = used + cost, 0
    return chosen


def _random_indices(rng: random.Random, n: int):
    """Distinct indices of range(n) in random order, drawn lazily."""
    seen = set()
    while len(seen) < n:
        i = rng.randrange(n)
        if i not in seen:
            seen.add(i)
            yield i


def _pick(order: list[int], i: int, attempt: int, rng: random.Random) -> int:
    """The record of sample i: its place in the seeded order first, a random one on redraws."""
    return order[i % len(order)] if attempt == 1 else rng.randrange(len(order))


# ---------------------------------------------------------------- generators


class _Generator:
    """Draws one sample at a time: `draw(i, rng, target, attempt)` -> (prompt, answer, meta) or None."""

    def __init__(self, cfg: BaselineConfig, data_dir: str, counter: MemoTokenCounter, reference, rewrite):
        self.cfg, self.data_dir, self.counter, self.reference, self.rewrite = cfg, data_dir, counter, reference, rewrite


class _MDQA(_Generator):
    def __init__(self, *args):
        super().__init__(*args)

        paths = mdqa_paths(self.data_dir)
        oracle, _ = load_mdqa(paths["oracle"])
        pool_questions, _ = load_mdqa(paths["subset_20docs"][0])
        # every evaluation question is banned up front (the guard would reject it later anyway), except those
        # only NQ-Open asks: the NQ-Open benchmark excludes them instead (kvlib.tasks.contamination)
        ref = self.reference
        banned_q = {k for k, labels in ref.questions.items() if not all(lab.startswith("nq_open:") for lab in labels)}
        banned_p = set(ref.passages)
        # both MDQA settings draw their questions from the 441-question subset: ban all of it. LitM's complete
        # file holds every question; then the reference (the evaluated questions) is what is banned.
        if paths["retrieved_20docs_source"] == "subset":
            banned_q |= {e.qid for e in pool_questions}
            banned_p |= {passage_key(e.gold.text) for e in pool_questions}
        self.candidates = []
        for e in oracle:
            if e.qid in banned_q or passage_key(e.gold.text) in banned_p:
                continue
            answer = next((a for a in e.answers if passage_has_answer(e.gold, [a])), None)
            if answer is not None:
                self.candidates.append((e, answer))
        if not self.candidates:
            raise ParamError("kind: no MDQA training question is left once the evaluation questions are excluded")
        full = build_distractor_pool(pool_questions, [e for e, _ in self.candidates])
        keep = [k for k, d in enumerate(full.documents) if passage_key(d.text) not in banned_p]
        self.pool = DistractorPool(tuple(full.documents[k] for k in keep), tuple(full.searchable[k] for k in keep),
                                   full.from_retrieved, full.from_oracle_gold, full.duplicates_dropped)
        self.order = list(range(len(self.candidates)))
        _stream(self.cfg, "order").shuffle(self.order)

    def draw(self, i, rng, target, attempt):

        example, answer = self.candidates[_pick(self.order, i, attempt, rng)]
        (built,) = build_random_distractor_set([example], self.pool, self.cfg.num_documents, self.cfg.seed)
        position = rng.randrange(self.cfg.num_documents)
        placed = place_gold(built, position)
        prompt = format_qa_prompt(placed.question, placed.documents)
        question = example.question if example.question.endswith("?") else f"{example.question}?"
        if self.rewrite is None:
            target_text = load_template("baseline_mdqa.answer").format(question=question, answer=_no_period(answer))
        else:
            target_text = self.rewrite(example.question, answer)
            if not isinstance(target_text, str) or not target_text.strip():
                raise ValueError(f"rewrite returned {target_text!r} for {example.question!r}; expected a sentence")
        return prompt, target_text, {
            "record_id": example.qid, "dataset": "nq_open (LitM oracle)", "question": example.question,
            "answer": answer, "gold_document": position + 1, "num_documents": self.cfg.num_documents,
            "depth": round(position / (self.cfg.num_documents - 1), 4), "gold_passages": [example.gold.text],
            "target_style": "template" if self.rewrite is None else "rewrite",
        }


def _documents_text(titles_texts: Sequence[tuple[str, str]]) -> str:
    # the line format of kvlib.tasks.mdqa.format_qa_prompt: `Document [i](Title: <title>) <text>`, from 1
    return "\n".join(f"Document [{i}](Title: {t}) {x}" for i, (t, x) in enumerate(titles_texts, 1))


class _MultidocQA(_Generator):
    def __init__(self, *args):
        super().__init__(*args)
        self.records = load_multihop(self.data_dir, tuple(self.cfg.multidocqa_datasets))
        self.paragraphs = [(k, p) for k, r in enumerate(self.records) for p in r.paragraphs if p.text]
        self.order = list(range(len(self.records)))
        _stream(self.cfg, "order").shuffle(self.order)

    def draw(self, i, rng, target, attempt):
        k = _pick(self.order, i, attempt, rng)
        r = self.records[k]
        support = r.supporting_paragraphs
        own = [p for j, p in enumerate(r.paragraphs) if j not in support and p.text]
        rng.shuffle(own)
        titles = {p.title for p in r.paragraphs}
        gold = [r.paragraphs[j] for j in support]
        quotes_of = lambda order: "\n".join(  # noqa: E731
            load_template("baseline_multidocqa.quote").format(index=order.index(j) + 1,
                                                              sentence=r.paragraphs[j].sentences[s].strip())
            for j, s in r.supporting)
        # fixed part: the prompt with the gold documents only, and the answer (its document numbers are
        # at most two digits either way)
        base_prompt = load_template("baseline_multidocqa.prompt").format(
            documents=_documents_text([(p.title, p.text) for p in gold]), question=r.question)
        base_answer = load_template("baseline_multidocqa.answer").format(quotes=quotes_of(list(support)),
                                                                          answer=r.answer)
        fixed = sum(self.counter.count([base_prompt, base_answer]))
        check_answer = not _yes_no(r.answer)

        def candidates():
            for p in own:
                if not (check_answer and _mentions(p.text, r.answer)):
                    yield p, f"Document [10](Title: {p.title}) {p.text}"
            for j in _random_indices(rng, len(self.paragraphs)):
                owner, p = self.paragraphs[j]
                if owner != k and p.title not in titles and not (check_answer and _mentions(p.text, r.answer)):
                    titles.add(p.title)
                    yield p, f"Document [10](Title: {p.title}) {p.text}"

        extra = _fill(candidates(), target - fixed, self.counter)
        docs = [("gold", j) for j in support] + [("extra", n) for n in range(len(extra))]
        rng.shuffle(docs)
        shown = [r.paragraphs[x] if kind == "gold" else extra[x] for kind, x in docs]
        order = [x if kind == "gold" else None for kind, x in docs]
        prompt = load_template("baseline_multidocqa.prompt").format(
            documents=_documents_text([(p.title, p.text) for p in shown]), question=r.question)
        answer = load_template("baseline_multidocqa.answer").format(quotes=quotes_of(order), answer=r.answer)
        return prompt, answer, {
            "record_id": r.id, "dataset": r.dataset, "question": r.question, "answer": r.answer,
            "gold_documents": [order.index(j) + 1 for j in support], "num_documents": len(shown),
            "quoted": [{"document": order.index(j) + 1, "sentence": r.paragraphs[j].sentences[s].strip()}
                       for j, s in r.supporting],
            "depth": [round(order.index(j) / max(1, len(shown) - 1), 4) for j in support],
            "gold_passages": [p.text for p in gold],
        }


class _IN2(_Generator):
    def __init__(self, *args):
        super().__init__(*args)
        self.squad = load_squad(self.data_dir)
        # two-segment questions: exactly two supporting paragraphs, neither empty
        self.pairs = [r for r in load_multihop(self.data_dir, ("hotpotqa",)) if len(r.supporting_paragraphs) == 2]
        self.segments = list(dict.fromkeys(q.paragraph for q in self.squad))
        self.segments += list(dict.fromkeys(_clean(p.text) for r in self.pairs for p in r.paragraphs if p.text))
        self.segment_owner = {}
        for q in self.squad:
            self.segment_owner.setdefault(q.paragraph, q.title)
        self.order_one = list(range(len(self.squad)))
        self.order_two = list(range(len(self.pairs)))
        _stream(self.cfg, "order").shuffle(self.order_one)
        _stream(self.cfg, "order-two").shuffle(self.order_two)

    def draw(self, i, rng, target, attempt):
        lo, hi = self.cfg.segment_tokens // 2, self.cfg.segment_tokens * 2
        two = rng.random() < self.cfg.in2_two_segment_fraction
        if two:
            r = self.pairs[_pick(self.order_two, i, attempt, rng)]
            gold = [_clean(r.paragraphs[j].text) for j in r.supporting_paragraphs]
            question, answer, record_id, dataset = r.question, r.answer, r.id, "hotpotqa"
            banned = set(gold)
            title = None
        else:
            q = self.squad[_pick(self.order_one, i, attempt, rng)]
            gold = [q.paragraph]
            question, answer, record_id, dataset = q.question, q.answer, q.id, "squad"
            banned, title = {q.paragraph}, q.title
        check_answer = not _yes_no(answer)
        base_prompt = load_template("baseline_in2.prompt").format(context="\n".join(gold), question=question)
        target_text = load_template("baseline_in2.answer").format(answer=_no_period(answer))
        fixed = sum(self.counter.count([base_prompt, target_text]))

        def candidates():
            for j in _random_indices(rng, len(self.segments)):
                s = self.segments[j]
                if s in banned or (title is not None and self.segment_owner.get(s) == title):
                    continue  # another paragraph of the gold's SQuAD article could answer it too
                if check_answer and _mentions(s, answer):
                    continue
                self.counter.prime([s])
                if lo <= self.counter[s] <= hi:
                    yield s, s

        filler = _fill(candidates(), target - fixed, self.counter)
        m = len(filler) + len(gold)
        if two:
            gap = max(1, m // 2)  # "placed far apart": at least half the context between them
            a = rng.randint(0, m - 1 - gap)
            positions = [a, rng.randint(a + gap, m - 1)]
        else:
            positions = [rng.randrange(m)]
        context, it, golds = [], iter(filler), iter(gold)
        for n in range(m):
            context.append(next(golds) if n in positions else next(it))
        prompt = load_template("baseline_in2.prompt").format(context="\n".join(context), question=question)
        return prompt, target_text, {
            "record_id": record_id, "dataset": dataset, "question": question, "answer": answer,
            "gold_segments": positions, "num_segments": m,
            "depth": [round(p / max(1, m - 1), 4) for p in positions], "gold_passages": gold,
        }


_SQUAD_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


class _NIAH(_Generator):
    def __init__(self, *args):
        super().__init__(*args)
        self.pieces = load_essays(self.data_dir)
        self.counter.prime(list(self.pieces))
        self.needles = []  # (record id, dataset, question, answer, needle)
        for q in load_squad(self.data_dir):
            start = 0
            for sentence in _SQUAD_SENTENCE.split(q.paragraph):
                end = start + len(sentence)
                if start <= q.answer_start and q.answer_start + len(q.answer) <= end:
                    self.needles.append((q.id, "squad", q.question, q.answer, sentence))
                start = end + 1
        for r in load_multihop(self.data_dir, ("hotpotqa",)):
            needle = " ".join(r.paragraphs[j].sentences[s].strip() for j, s in r.supporting)
            if r.answer in needle and not _yes_no(r.answer):
                self.needles.append((r.id, "hotpotqa", r.question, r.answer, needle))
        self.order = list(range(len(self.needles)))
        _stream(self.cfg, "order").shuffle(self.order)

    def draw(self, i, rng, target, attempt):
        record_id, dataset, question, answer, needle = self.needles[_pick(self.order, i, attempt, rng)]
        template = load_template("baseline_niah.prompt")
        answer_text = load_template("baseline_niah.answer").format(answer=_no_period(answer))
        base = template.format(context=needle, question=question)
        budget = target - sum(self.counter.count([base, answer_text]))
        start = rng.randrange(len(self.pieces))
        chosen, used = [], 0
        while used < budget and len(chosen) < len(self.pieces):
            piece = self.pieces[(start + len(chosen)) % len(self.pieces)]
            if used + self.counter[piece] > budget and chosen:
                break
            chosen.append(piece)
            used += self.counter[piece]
        if chosen:  # the haystack ends at a sentence end: drop a leading fragment's whitespace only
            chosen[0] = chosen[0].lstrip()
        haystack = "".join(chosen)
        if _mentions(haystack, answer):
            return None  # the answer must come from the needle alone
        depth = rng.random()
        # insertion: at depth x haystack tokens, moved back to the sentence end before it
        k, before = 0, 0
        cumulative = [self.counter[p] for p in chosen]
        while k < len(chosen) and before + cumulative[k] <= depth * used:
            before += cumulative[k]
            k += 1
        head, tail = "".join(chosen[:k]), "".join(chosen[k:])
        context = f"{head} {needle}{tail}" if head else f"{needle} {tail.lstrip()}"
        offset = template.index("{context}") + (len(head) + 1 if head else 0)
        prompt = template.format(context=context, question=question)
        return prompt, answer_text, {
            "record_id": record_id, "dataset": dataset, "question": question, "answer": answer,
            "needle": needle, "needle_start": offset, "depth": round(before / used, 4) if used else 0.0,
            "depth_drawn": round(depth, 4), "gold_passages": [needle],
        }


_GENERATORS = {"mdqa": _MDQA, "multidocqa": _MultidocQA, "in2": _IN2, "niah": _NIAH}


# ---------------------------------------------------------------- building to a token budget


def sample_lengths(samples: Sequence[Sample], count_tokens: Callable[[list[str]], list[int]]) -> list[int]:
    """Prompt + answer tokens of each sample (texts only, no chat template): what matching compares."""
    texts = [t for s in samples for t in (s.prompt, s.answer)]
    counts = count_tokens(texts) if texts else []
    return [counts[2 * k] + counts[2 * k + 1] for k in range(len(samples))]


def matched_config(cfg: BaselineConfig, synthetic_dir: str | Path,
                   count_tokens: Callable[[list[str]], list[int]] | None = None) -> BaselineConfig:
    """`cfg` with token_total and sample_tokens read from the train split of a synthetic set written by
    kvlib.tasks.synthetic (its total prompt + answer tokens, and its shortest and longest sample). An ``mdqa``
    sample's length is fixed by num_documents, so there only the longest is matched (the per-sample max)
    and cfg's lower bound is kept."""
    count_tokens = count_tokens or token_counter_for(cfg)
    lengths = sample_lengths(load_dataset(Path(synthetic_dir), "train"), count_tokens)
    if not lengths:
        raise ValueError(f"{synthetic_dir}: the train split is empty")
    low = min(cfg.sample_tokens[0], max(lengths)) if cfg.kind == "mdqa" else min(lengths)
    out = dataclasses.replace(cfg, token_total=sum(lengths), sample_tokens=(low, max(lengths)))
    out.validate()
    return out


def token_report(samples: Sequence[Sample], cfg: BaselineConfig) -> dict:
    """Token totals of a built set against its config, for printing and manifests."""
    lengths = [s.meta["n_train_tokens"] for s in samples]
    total = sum(lengths)
    report = {"kind": cfg.kind, "source": SOURCE, "tokenizer": cfg.tokenizer, "n": len(samples),
              "total_tokens": total, "min": min(lengths, default=0), "max": max(lengths, default=0),
              "mean": round(statistics.fmean(lengths), 1) if lengths else 0.0,
              "sample_tokens": list(cfg.sample_tokens), "token_total": cfg.token_total or None}
    if cfg.token_total:
        report["ratio"] = round(total / cfg.token_total, 4)
        report["within_tolerance"] = abs(total - cfg.token_total) <= cfg.token_tolerance * cfg.token_total
    return report


def token_counter_for(cfg: BaselineConfig) -> Callable[[list[str]], list[int]]:
    """The token counter of a baseline's target tokenizer (what its token matching counts)."""
    return load_token_counter(cfg.tokenizer).count


def build_baseline(cfg: BaselineConfig, count_tokens: Callable[[list[str]], list[int]] | None = None,
                   reference=None, rewrite: Rewrite | None = None) -> tuple[list[Sample], dict]:
    """(samples, report) of one baseline set: drawn to cfg's token budget, then checked against every
    evaluation set (kvlib.tasks.contamination; `reference` defaults to load_eval_reference(cfg.data_dir)).
    `rewrite(question, answer) -> str` (mdqa only) replaces the answer template."""

    cfg.validate()
    if rewrite is not None and cfg.kind != "mdqa":
        raise ParamError(f"kind: rewrite applies to the mdqa baseline only, got kind {cfg.kind!r}")
    if rewrite is not None and not callable(rewrite):
        raise TypeError(f"rewrite must be a callable (question, answer) -> str, got {rewrite!r}")
    data_dir = str(resolve_data_dir(cfg.data_dir))
    if reference is None:
        reference = load_eval_reference(data_dir)
    count_tokens = count_tokens or token_counter_for(cfg)
    counter = MemoTokenCounter(count_tokens)
    gen = _GENERATORS[cfg.kind](cfg, data_dir, counter, reference, rewrite)
    lo, hi = cfg.sample_tokens
    goal = cfg.token_total
    samples: list[Sample] = []
    total = 0
    while (total < goal) if goal else (len(samples) < cfg.n_samples):
        i = len(samples)
        rng = _stream(cfg, i)
        target = rng.randint(lo, hi)
        if goal:
            target = min(target, max(lo, goal - total))  # the last sample aims at what is left
        drawn, size, aim = None, None, target
        for attempt in range(1, cfg.max_resample + 1):
            drawn = gen.draw(i, rng, aim, attempt)
            if drawn is None:
                continue
            n_prompt, n_answer = count_tokens([drawn[0], drawn[1]])
            size = n_prompt + n_answer
            if lo <= size <= hi:
                break
            # a fill lands a little under its aim (whole paragraphs) or, at the joins, a few tokens over it:
            # the redraw aims a step further into the range
            aim = min(hi, aim + 32) if size < lo else max(lo, aim - 32)
            drawn = None
        if drawn is None:
            raise ParamError(f"sample_tokens: {cfg.kind} sample {i} did not fit {list(cfg.sample_tokens)} tokens in "
                             f"{cfg.max_resample} draws (last: {size}); widen sample_tokens"
                             + (" or change num_documents" if cfg.kind == "mdqa" else ""))
        if goal and total + size > goal and total + size - goal > goal - total:
            break  # the set is closer to the goal without this sample
        prompt, answer, extra = drawn
        meta = {"id": f"baseline-{cfg.kind}-s{cfg.seed}-{i:05d}", "kind": cfg.kind, "source": SOURCE,
                "split": "train", "seed": cfg.seed, **extra, "n_tokens": n_prompt, "n_answer_tokens": n_answer,
                "n_train_tokens": size, "target_tokens": aim, "draws": attempt, "tokenizer": cfg.tokenizer}
        samples.append(Sample(prompt, answer, meta))
        total += size
    report = token_report(samples, cfg)
    if goal and not report["within_tolerance"]:
        raise ParamError(f"token_total: built {total} tokens, outside {cfg.token_tolerance:.0%} of {goal}; "
                         f"sample_tokens {list(cfg.sample_tokens)} are too coarse for this total")
    report["contamination"] = check_contamination(samples, reference, name=f"baseline {cfg.kind}").summary()
    return samples, report


def write_baseline(cfg: BaselineConfig, out_dir: str | Path, count_tokens: Callable[[list[str]], list[int]] | None = None,
                   reference=None, rewrite: Rewrite | None = None) -> dict:
    """Build and write a baseline set: `train.jsonl` (chat format for `kvlib train`), `train.openai.jsonl`,
    `train.meta.jsonl` (kvlib.tasks.synthetic.write_split), `config.json` and `stats.json` (token report and the
    contamination check). Returns the stats."""
    samples, report = build_baseline(cfg, count_tokens, reference, rewrite)
    out_dir = Path(out_dir)
    split_stats = write_split(out_dir, "train", samples)
    stats = {"config": to_mapping(cfg), "source": SOURCE, "tokens": report, "splits": {"train": split_stats},
             "rewrite": None if rewrite is None else getattr(rewrite, "__qualname__", repr(rewrite))}
    (out_dir / "config.json").write_text(json.dumps(to_mapping(cfg), indent=2, sort_keys=True) + "\n")
    (out_dir / "stats.json").write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n")
    return {"out_dir": str(out_dir), **stats}


def ensure_baseline(cfg: BaselineConfig, out_dir: str | Path, count_tokens: Callable[[list[str]], list[int]] | None = None,
                    reference=None) -> dict:
    """write_baseline unless out_dir already holds the set of this exact config (as kvlib.tasks.synthetic.ensure_dataset
    does for the synthetic sets: generation is deterministic, so reuse and rebuilding give the same bytes)."""
    out_dir = Path(out_dir)
    stats_file = out_dir / "stats.json"
    if stats_file.is_file() and (out_dir / "train.jsonl").is_file():
        stats = json.loads(stats_file.read_text())
        if stats.get("config") == json.loads(json.dumps(to_mapping(cfg))):
            return {"out_dir": str(out_dir), **stats}
    return write_baseline(cfg, out_dir, count_tokens, reference)


# ---------------------------------------------------------------- notebook 06


# ---------------------------------------------------------------- building, matching, training


# ---------------------------------------------------------------- evaluation and verdicts


