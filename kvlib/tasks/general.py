"""General-ability benchmarks (paper Tables 1-2, the "nothing is lost" table): MMLU, HellaSwag, GSM8K,
TriviaQA and NQ-Open for any set of models, original vs finetuned, with paired CIs.

Tasks are declared as data (`TASKS`: one `TaskSpec` each, following lm-evaluation-harness's task
definition: prompt, few-shot count and source, log-likelihood or generation, stop strings, metric) and go
through one path: load + validate (`load_task`), subsample (`subsample`), build requests
(`build_prompt`, `loglikelihood_requests`), score one item (`score_item`, metrics in kvlib.engine.scoring),
aggregate (`summarize_benchmarks`: 95% CIs, Wilson for 0/1 scores; MMLU micro and macro over subjects) and compare two
models on the same items (`benchmark_deltas`: paired CI and p-values of the difference,
kvlib.engine.stats.paired_difference_test). Each task declares its chance rate (`TaskSpec.chance`: a guess among 4
choices, or 0 for free answers): claims are only judged where the original's score clears it
(kvlib.report.paper.original_level).

Variants. A backend with `loglikelihood` (local HF models) scores MMLU and HellaSwag by log-likelihood
like the harness. Chat-only APIs (OpenAI) expose no log-likelihoods: MMLU then runs generatively (the
answer letter parsed from the reply, `kvlib.engine.scoring.parse_choice_letter`), HellaSwag has no generative
variant here and is reported as not run; every result row says which variant produced it.

Prompt format of generation (`prompt_format`, per task in the params; every result row records the one used).
- "raw" (the default wherever the backend can take it: local models in transformers or vLLM): the harness's
  own default path, lm-eval without --apply_chat_template: the raw few-shot text (`fewshot_text`) is sent
  WITHOUT the chat template (a kvlib.engine.backends.RawPrompt, tokenized as the tokenizer encodes text) and
  the model continues it. This is how the harness runs TriviaQA, NQ-Open, GSM8K (and MMLU's generative variant)
  by default, and what `TaskSpec.prompt_format` declares for every task.
- "chat": through the model's chat template, few-shot examples as user/assistant turns ("multiturn", lm-eval's
  --apply_chat_template --fewshot_as_multiturn) or one user message holding the raw few-shot text
  ("single_turn", the notebook's `fewshot_format`). A profile asks for it per task (`tasks.<name>.prompt_format:
  chat`); chat-only APIs (OpenAI), which cannot send text without their server's chat template, always run it
  ("auto" resolves to it there; an explicit "raw" for such a model fails when the params are read).
The harness stops generation at its `until` strings; our backends stop at the end of the turn (raw text: the
end of sequence) or at the generation budget, so the reply is cut at the first stop string afterwards
(`truncate_at_stop`), which gives the same text. One difference remains on the raw path: backends strip the
reply's surrounding whitespace before the cut, so a reply that STARTS with a stop string ("\nParis" on
TriviaQA) is the harness's empty answer but kvlib's "Paris" (the harness cross-check counts such items).
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import difflib
import gzip
import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Literal, Mapping, Sequence

from kvlib.engine.backends import ContextLengthError, RawPrompt, StopRule, accepts_raw_text
from kvlib.engine.config import check_positive, fail, from_mapping
from kvlib.engine.data import read_jsonl_records, resolve_data_dir
from kvlib.engine.evaluate import answer_requests, paired_with_base, result_fields
from kvlib.engine.evaluate import seed_group_deltas as by_seed
from kvlib.engine.scoring import (
    GSM8K_INVALID,
    best_subspan_em,
    exact_match_any,
    extract_gsm8k_flexible,
    extract_gsm8k_strict,
    gsm8k_exact_match,
    multiple_choice_scores,
    normalize_answer,
    parse_choice_letter,
)
from kvlib.engine.stats import macro_bootstrap_ci, macro_mean, mean_ci, paired_difference_test
from kvlib.tasks.mdqa import question_id
from kvlib.tasks.synthetic import load_template

Variant = Literal["loglikelihood", "generate"]
FewshotFormat = Literal["multiturn", "single_turn"]
PromptFormat = Literal["raw", "chat"]
LETTERS = "ABCDEFGHIJ"
HARNESS_REPO = "github.com/EleutherAI/lm-evaluation-harness"


class GeneralDataError(ValueError):
    """A benchmark file is malformed. The message starts with `file:line:`."""


# ------------------------------------------------------------------------------------------ records


@dataclass(frozen=True)
class Item:
    """One benchmark question, whatever the task. `choices` and `gold` (index) for multiple choice;
    `answers` for generation (GSM8K: the final number; QA: every alias; a GSM8K few-shot exemplar: its
    worked solution); `group` is the MMLU subject ("" elsewhere); `source` is `file:line`."""

    task: str
    id: str
    question: str
    choices: tuple[str, ...] = ()
    gold: int | None = None
    answers: tuple[str, ...] = ()
    group: str = ""
    source: str = ""


@dataclass(frozen=True)
class LoadReport:
    """What loading one benchmark read: records, files, groups (MMLU subjects), and counted notes (e.g.
    `csv_quotes_undone`: TriviaQA questions whose CSV-style doubled quotes were undone)."""

    task: str
    files: tuple[str, ...]
    records: int
    groups: int = 0
    notes: tuple[tuple[str, int], ...] = ()

    def summary(self) -> str:
        where = self.files[0] if len(self.files) == 1 else f"{len(self.files)} files under {Path(self.files[0]).parent}"
        text = f"{self.task}: {self.records} records read from {where}"
        if self.groups:
            text += f" ({self.groups} subjects)"
        for name, count in self.notes:
            text += f"; {name}: {count}"
        return text


def _where(path: Path, line: int | None) -> str:
    return f"{path}:{line}" if line is not None else str(path)


def _need_str(value: Any, what: str, path: Path, line: int | None, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise GeneralDataError(f"{_where(path, line)}: {what} must be a non-empty string, got {value!r}")
    return value


def _need_str_list(value: Any, what: str, path: Path, line: int | None) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise GeneralDataError(f"{_where(path, line)}: {what} must be a non-empty list of strings, got {value!r}")
    for v in value:
        _need_str(v, f"every entry of {what}", path, line)
    return tuple(value)


def _open_text(path: Path):
    """Text lines of a plain, gzip or bz2 file (recognised by content, not by suffix)."""
    with path.open("rb") as fh:
        magic = fh.read(3)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rt", encoding="utf-8")
    if magic == b"BZh":
        return bz2.open(path, "rt", encoding="utf-8")
    return path.open(encoding="utf-8")


def _require_file(path: Path, task: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{task}: file not found: {path} (README.md, section 'Data', says where to get it)")
    return path


def _jsonl_objects(path: Path) -> list[tuple[int, dict]]:
    """(line, object) of a JSONL file; a line that is not a JSON object raises naming file and line."""

    rows, _ = read_jsonl_records(path)
    for line, value in rows:
        if not isinstance(value, dict):
            raise GeneralDataError(f"{path}:{line}: expected a JSON object, got {type(value).__name__}")
    return rows


# -------------------------------------------------------------------------------------------- MMLU


def load_mmlu(root: str | Path, split: str = "test") -> tuple[list[Item], LoadReport]:
    """MMLU in the original hendrycks layout: `root/<split>/<subject>_<split>.csv`, no header, 6 columns
    (question, A, B, C, D, answer letter). Items are ordered by subject, then by row; ids `subject/row`."""
    root = Path(root)
    folder = root / split
    files = sorted(folder.glob(f"*_{split}.csv")) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"mmlu: no {folder}/<subject>_{split}.csv files (the hendrycks data.tar layout; "
                                f"README.md, section 'Data')")
    items: list[Item] = []
    for path in files:
        subject = path.name[: -len(f"_{split}.csv")]
        with path.open(newline="", encoding="utf-8") as fh:
            reader = csv.reader(fh)
            start = 1
            for row_index, row in enumerate(reader):
                line, start = start, reader.line_num + 1  # a quoted field may span lines: report where it began
                if len(row) != 6:
                    raise GeneralDataError(f"{path}:{line}: expected 6 columns (question, A, B, C, D, answer), "
                                           f"got {len(row)}")
                question, *choices, answer = row
                _need_str(question, "the question", path, line)
                if answer.strip() not in LETTERS[:4]:
                    raise GeneralDataError(f"{path}:{line}: the answer must be one of A, B, C, D, got {answer!r}")
                items.append(Item("mmlu", f"{subject}/{row_index}", question, tuple(choices),
                                  LETTERS.index(answer.strip()), group=subject, source=f"{path}:{line}"))
    report = LoadReport("mmlu", tuple(str(p) for p in files), len(items), groups=len(files))
    return items, report


def mmlu_shots(root: str | Path, subjects: Iterable[str], n_shot: int) -> dict[str, list[Item]]:
    """The first `n_shot` dev questions of each subject (harness: fewshot_split dev, sampler first_n).
    The dev split is disjoint from test, so a few-shot example is never a test item."""
    if n_shot == 0:
        return {s: [] for s in subjects}
    dev, _ = load_mmlu(root, "dev")
    by_subject: dict[str, list[Item]] = {}
    for item in dev:
        by_subject.setdefault(item.group, []).append(item)
    shots = {}
    for subject in subjects:
        have = by_subject.get(subject, [])
        if len(have) < n_shot:
            raise GeneralDataError(f"{Path(root) / 'dev' / f'{subject}_dev.csv'}: {n_shot}-shot MMLU needs "
                                   f"{n_shot} dev questions for subject {subject!r}, found {len(have)}")
        shots[subject] = have[:n_shot]
    return shots


# ---------------------------------------------------------------------------------------- HellaSwag


def hellaswag_preprocess(text: str) -> str:
    """lm-evaluation-harness's HellaSwag cleanup (lm_eval/tasks/hellaswag/utils.py): strip, " [title]" ->
    ". ", drop other [bracketed] WikiHow markers, replace double spaces (one pass, as there)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


_SENTENCE_END = re.compile(r"[.!?] ")


def _capitalize_last_fragment(query: str) -> tuple[str, bool]:
    """The text re-encoding keeps ctx_b (the start of the context's last sentence) lower-case, where the
    harness writes ctx_b.capitalize(). Without the ctx_a/ctx_b split we upper-case the first letter after
    the context's last sentence end when it is lower-case. Returns (text, changed)."""
    label, sep, body = query.partition(": ")
    if not sep:
        label, body = "", query
    ends = list(_SENTENCE_END.finditer(body))
    start = ends[-1].end() if ends else 0
    if start < len(body) and body[start].islower():
        body = body[:start] + body[start].upper() + body[start + 1:]
        return (f"{label}{sep}{body}" if sep else body), True
    return query, False


def load_hellaswag(path: str | Path) -> tuple[list[Item], LoadReport]:
    """HellaSwag validation items from the official JSONL (rowanz/hellaswag `hellaswag_val.jsonl`, or HF
    `Rowan/hellaswag` rows; plain or gzip) or from the 6-lines-per-item text re-encoding
    (klosax/hellaswag_text_data, plain or bz2). Ids are positions in the file (both list the split in the
    same order). The JSONL gets the harness's preprocessing exactly; the text file is already cleaned and
    only ctx_b's capitalisation is restored, approximately (`_capitalize_last_fragment`)."""
    path = _require_file(Path(path), "hellaswag")
    with _open_text(path) as fh:
        first = next((line for line in fh if line.strip()), "")
    if first.lstrip().startswith("{"):
        return _load_hellaswag_jsonl(path)
    return _load_hellaswag_text(path)


def _load_hellaswag_jsonl(path: Path) -> tuple[list[Item], LoadReport]:
    if path.suffix == ".bz2":
        raise GeneralDataError(f"{path}: a bz2-compressed JSONL is not supported; decompress it or gzip it")
    items = []
    for position, (line, rec) in enumerate(_jsonl_objects(path)):
        for key in ("activity_label", "ctx_a", "ctx_b"):
            _need_str(rec.get(key), key, path, line, allow_empty=key == "ctx_b")
        endings = _need_str_list(rec.get("endings"), "endings", path, line)
        label = rec.get("label")
        if isinstance(label, str) and label.strip().isdigit():  # HF stores the label as a string
            label = int(label)
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
            raise GeneralDataError(f"{path}:{line}: label must be an ending index in [0, {len(endings)}), got "
                                   f"{rec.get('label')!r} (the test split has no labels: use validation)")
        ctx = rec["ctx_a"] + " " + rec["ctx_b"].capitalize()
        items.append(Item("hellaswag", str(position), hellaswag_preprocess(rec["activity_label"] + ": " + ctx),
                          tuple(hellaswag_preprocess(e) for e in endings), label, source=f"{path}:{line}"))
    return items, LoadReport("hellaswag", (str(path),), len(items), notes=(("format: official JSONL", len(items)),))


def _load_hellaswag_text(path: Path) -> tuple[list[Item], LoadReport]:
    with _open_text(path) as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    if len(lines) % 6:
        start = len(lines) - len(lines) % 6 + 1
        raise GeneralDataError(f"{path}:{start}: incomplete item: {len(lines) % 6} of its 6 lines (context, label, "
                               f"4 endings) before the end of the file")
    items, capitalised = [], 0
    for position in range(len(lines) // 6):
        line = position * 6 + 1
        context, label, *endings = lines[position * 6: position * 6 + 6]
        _need_str(context, "the context line", path, line)
        if label.strip() not in ("0", "1", "2", "3"):
            raise GeneralDataError(f"{path}:{line + 1}: expected the gold ending index 0-3, got {label!r}")
        for k, ending in enumerate(endings):
            _need_str(ending, f"ending {k}", path, line + 2 + k)
        query, changed = _capitalize_last_fragment(context.strip())
        capitalised += changed
        items.append(Item("hellaswag", str(position), query, tuple(e.strip() for e in endings), int(label),
                          source=f"{path}:{line}"))
    notes = (("format: text re-encoding", len(items)), ("ctx_b capitalised (approximation)", capitalised))
    return items, LoadReport("hellaswag", (str(path),), len(items), notes=notes)


# -------------------------------------------------------------------------------------------- GSM8K


def load_gsm8k(path: str | Path) -> tuple[list[Item], LoadReport]:
    """GSM8K JSONL (openai/grade-school-math): {"question", "answer"}, the answer ending in "#### <number>".
    The reference is the text after the last "####" (harness gsm8k-cot doc_to_target)."""
    path = _require_file(Path(path), "gsm8k")
    items = []
    for position, (line, rec) in enumerate(_jsonl_objects(path)):
        question = _need_str(rec.get("question"), "question", path, line)
        answer = _need_str(rec.get("answer"), "answer", path, line)
        if "####" not in answer:
            raise GeneralDataError(f"{path}:{line}: the answer has no '#### <final number>' line")
        final = answer.split("####")[-1].strip()
        if not final:
            raise GeneralDataError(f"{path}:{line}: nothing after '####' in the answer")
        items.append(Item("gsm8k", str(position), question, answers=(final,), source=f"{path}:{line}"))
    return items, LoadReport("gsm8k", (str(path),), len(items))


def gsm8k_cot_exemplars() -> list[Item]:
    """The 8 chain-of-thought exemplars (kvlib/tasks/templates/gsm8k_cot_8shot.txt, the harness's gsm8k_cot
    few-shot samples, from Wei et al. 2022): `question`, and `answers[0]` = the worked solution."""

    text = "\n".join(line for line in load_template("gsm8k_cot_8shot").split("\n") if not line.startswith("# "))
    shots = []
    for k, block in enumerate(b for b in text.strip().split("\n\n") if b.strip()):
        match = re.fullmatch(r"Q: (.+)\nA: (.+)", block.strip(), re.S)
        if not match:
            raise ValueError(f"kvlib/tasks/templates/gsm8k_cot_8shot.txt: exemplar {k + 1} is not 'Q: ...\\nA: ...'")
        shots.append(Item("gsm8k", f"cot-exemplar-{k}", match.group(1), answers=(match.group(2),)))
    return shots


# ------------------------------------------------------------------------------------ TriviaQA, NQ-Open


def _undo_csv_quotes(question: str) -> tuple[str, bool]:
    """FlashRAG's TriviaQA kept CSV quoting in some questions ('"Who wrote ""X""?"'): undo it when the
    whole question is one quoted CSV field (outer quotes, inner quotes all doubled)."""
    inner = question[1:-1]
    if len(question) >= 2 and question[0] == question[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"'), True
    return question, False


def load_triviaqa(path: str | Path) -> tuple[list[Item], LoadReport]:
    """TriviaQA open-domain questions with every answer alias, from
    - FlashRAG JSONL `{id, question, golden_answers}` (the subset in the data directory),
    - HF `mandarjoshi/trivia_qa` rows (`{question, question_id, answer: {aliases, value}}`): the hub's parquet
      file (unfiltered.nocontext/validation-00000-of-00001.parquet, all 11313 questions) or JSONL,
    - the official JSON (`{"Data": [{Question, QuestionId, Answer: {Aliases, Value}}]}`, e.g.
      unfiltered-web-dev.json).
    The aliases are the harness's targets (answer.aliases), plus the canonical value if missing there."""
    path = _require_file(Path(path), "triviaqa")
    head = ""
    if path.suffix != ".parquet":
        with _open_text(path) as fh:
            head = fh.read(4096).lstrip()
    if path.suffix == ".parquet":  # the hub's own file, rows as above (kvlib/engine/datasets.yaml, entry triviaqa)
        records = _parquet_rows(path)
        fmt = "HF parquet"
    elif head.startswith("{") and re.match(r'\{\s*"Data"\s*:', head):
        with _open_text(path) as fh:
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise GeneralDataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from None
        records = [(None, r) for r in data.get("Data", [])]
        fmt = "official JSON"
    else:
        records = _jsonl_objects(path)
        fmt = "JSONL"
    items, undone = [], 0
    for position, (line, rec) in enumerate(records):
        where = f"{path}:{line}" if line is not None else f"{path} (Data[{position}])"
        if not isinstance(rec, dict):
            raise GeneralDataError(f"{where}: expected an object, got {type(rec).__name__}")
        if "golden_answers" in rec:  # FlashRAG
            question, answers, qid = rec.get("question"), rec.get("golden_answers"), rec.get("id")
        elif isinstance(rec.get("answer"), dict):  # HF trivia_qa
            answer = rec["answer"]
            question, qid = rec.get("question"), rec.get("question_id")
            answers = list(answer.get("aliases") or []) + [answer.get("value")]
        elif isinstance(rec.get("Answer"), dict):  # official
            answer = rec["Answer"]
            question, qid = rec.get("Question"), rec.get("QuestionId")
            answers = list(answer.get("Aliases") or []) + [answer.get("Value")]
        else:
            raise GeneralDataError(f"{where}: not a TriviaQA record: expected golden_answers (FlashRAG), "
                                   f"answer.aliases (HF) or Answer.Aliases (official), got keys {sorted(rec)}")
        answers = [a for a in answers if a is not None] if isinstance(answers, list) else answers
        answers = list(dict.fromkeys(_need_str_list(answers, "the answer aliases", path, line)))
        question = _need_str(question, "question", path, line)
        question, changed = _undo_csv_quotes(question)
        undone += changed
        items.append(Item("triviaqa", str(qid) if qid is not None else str(position), question,
                          answers=tuple(answers), source=where))
    _check_unique_ids(items, path)
    notes = ((f"format: {fmt}", len(items)), ("csv_quotes_undone", undone))
    return items, LoadReport("triviaqa", (str(path),), len(items), notes=notes)


def _parquet_rows(path: Path) -> list[tuple[int, Any]]:
    """(row number, record) of a parquet file (needs pyarrow)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise GeneralDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return list(enumerate(pq.read_table(path).to_pylist(), 1))


def load_nq_open(path: str | Path) -> tuple[list[Item], LoadReport]:
    """NQ-Open JSONL (google-research-datasets/natural-questions nq_open, or HF nq_open rows):
    {"question", "answer": [str, ...]}. Ids are positions in the file."""
    path = _require_file(Path(path), "nq_open")
    items = []
    for position, (line, rec) in enumerate(_jsonl_objects(path)):
        question = _need_str(rec.get("question"), "question", path, line)
        answers = _need_str_list(rec.get("answer"), "answer", path, line)
        items.append(Item("nq_open", str(position), question, answers=answers, source=f"{path}:{line}"))
    return items, LoadReport("nq_open", (str(path),), len(items))


def _check_unique_ids(items: list[Item], path: Path) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.id in seen:
            raise GeneralDataError(f"{item.source}: duplicate id {item.id!r} (first at {seen[item.id]})")
        seen[item.id] = item.source


# ---------------------------------------------------------------------------------- task declarations


def _mmlu_description(item: Item) -> str:
    return f"The following are multiple choice questions (with answers) about {item.group.replace('_', ' ')}.\n\n"


def _mmlu_text(item: Item) -> str:
    options = "".join(f"\n{LETTERS[k]}. {c}" for k, c in enumerate(item.choices))
    return f"{item.question.strip()}{options}\nAnswer:"


def _letter_target(item: Item) -> str:
    return LETTERS[item.gold]


def _first_answer(item: Item) -> str:
    return item.answers[0]


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark as data. `variants`: what it can run as, the first preferred when the backend scores
    log-likelihoods. Prompt = description(item) + shots (doc_to_text + target_delimiter + doc_to_target,
    each followed by fewshot_delimiter) + doc_to_text(item), as the harness assembles it. `choices`:
    the continuations scored by log-likelihood. `scorer` names the one scoring rule (`score_item`).
    `metrics[variant]`: per-item metric columns; `headline` the one the summary table shows; `macro`:
    also report the mean over item groups (MMLU subjects). `chance`: the score of guessing (1 / number of
    choices; 0 where answers are free text, the floor), which the original's score must clear by `chance_margin`
    (None: kvlib.report.paper.equivalence_margin) for a claim on the task to be testable
    (kvlib.report.paper.original_level). `prompt_format`: how the harness sends a generation prompt by default
    ("raw": its text without the chat template; lm-eval applies a chat template only when asked); `stop`: the
    harness's `until` strings, where a generated reply is cut (MMLU: those of its generative variant, applied
    to raw-text replies only; a chat reply is searched whole for the letter it names)."""

    name: str
    title: str
    harness: str
    variants: tuple[str, ...]
    n_shot: int
    max_shots: int
    shots_from: str
    description: Callable[[Item], str]
    doc_to_text: Callable[[Item], str]
    doc_to_target: Callable[[Item], str]
    scorer: str
    metrics: Mapping[str, tuple[str, ...]]
    headline: str
    data: str
    default_files: tuple[str, ...]
    loader: Callable[[Path], tuple[list[Item], LoadReport]]
    choices: Callable[[Item], list[str]] | None = None
    fewshot_delimiter: str = "\n\n"
    target_delimiter: str = " "
    max_new_tokens: int = 32
    stop: tuple[str, ...] = ()
    macro: bool = False
    # the metric a claim is also judged on when both models score 0 on `headline`: a small instruct model that
    # never replies in the harness's short form still shows whether the answer appears in its reply
    floor_metric: str | None = None
    prompt_format: PromptFormat = "raw"
    chance: float = 0.0
    chance_margin: float | None = None
    notes: str = ""
    # what a test item's fields are called in the conventions table (question text, choice texts)
    placeholder: tuple[str, tuple[str, ...]] = ("{question}", ("{A}", "{B}", "{C}", "{D}"))


TASKS: dict[str, TaskSpec] = {
    spec.name: spec for spec in (
        TaskSpec(
            name="mmlu", title="MMLU", harness="mmlu (default)", variants=("loglikelihood", "generate"),
            n_shot=5, max_shots=5, shots_from="dev split, first 5 of the subject",
            description=_mmlu_description, doc_to_text=_mmlu_text, doc_to_target=_letter_target,
            choices=lambda item: list(LETTERS[: len(item.choices)]),
            scorer="multiple_choice",
            metrics={"loglikelihood": ("acc",), "generate": ("acc", "parsed")}, headline="acc",
            data="hendrycks test split (14042 questions, 57 subjects)", default_files=("mmlu",),
            loader=load_mmlu, max_new_tokens=32, macro=True, chance=0.25, stop=("\n",),
            notes="acc = micro (the harness's group aggregate, weighted by size); acc_macro = mean over subjects. "
                  "Generative variant (chat APIs; the harness's mmlu_generative on raw text): the letter parsed "
                  "from the reply (raw text: its first line)."),
        TaskSpec(
            name="hellaswag", title="HellaSwag", harness="hellaswag", variants=("loglikelihood",),
            n_shot=0, max_shots=0, shots_from="none (harness default: 0-shot)",
            description=lambda item: "", doc_to_text=lambda item: item.question,
            doc_to_target=lambda item: item.choices[item.gold], choices=lambda item: list(item.choices),
            scorer="multiple_choice", metrics={"loglikelihood": ("acc", "acc_norm")}, headline="acc",
            data="validation split (10042 items)",
            default_files=("hellaswag/hellaswag_val.jsonl", "hellaswag/hellaswag_val.jsonl.gz",
                           "hellaswag/hellaswag_val_full.txt.bz2", "hellaswag/hellaswag_val_full.txt"),
            loader=load_hellaswag, placeholder=("{activity}: {context}", ("{ending}",) * 4), chance=0.25,
            notes="acc_norm divides each ending's log-likelihood by its length in characters. The paper's "
                  "56.31 for Mistral-7B-Instruct-v0.1 is on the scale of 0-shot acc."),
        TaskSpec(
            name="gsm8k", title="GSM8K", harness="gsm8k_cot", variants=("generate",),
            n_shot=8, max_shots=8, shots_from="the 8 fixed chain-of-thought exemplars (Wei et al. 2022)",
            description=lambda item: "", doc_to_text=lambda item: f"Q: {item.question}\nA:",
            doc_to_target=_first_answer, scorer="gsm8k",
            metrics={"generate": ("exact_strict", "exact_flexible")}, headline="exact_strict",
            data="test split (1319 problems)", default_files=("gsm8k/test.jsonl",), loader=load_gsm8k,
            max_new_tokens=256, stop=("Q:",), chance=0.0,
            notes="strict: the number after 'The answer is'; flexible: the last number in the reply. The harness's "
                  "plain gsm8k task (5-shot from the train split) needs the train file, which is not here."),
        TaskSpec(
            name="triviaqa", title="TriviaQA", harness="triviaqa", variants=("generate",),
            n_shot=0, max_shots=0, shots_from="none (harness default: 0-shot)",
            description=lambda item: "", doc_to_text=lambda item: f"Question: {item.question}?\nAnswer:",
            doc_to_target=_first_answer, scorer="short_answer", metrics={"generate": ("em", "contains")},
            headline="em", floor_metric="contains",
            data="open-domain unfiltered dev (11313 questions; or the 1000-question FlashRAG subset)",
            default_files=("triviaqa/unfiltered.nocontext/validation-00000-of-00001.parquet", "triviaqa/test.jsonl"),
            loader=load_triviaqa, max_new_tokens=32,
            stop=("\n", ".", ","), chance=0.0,
            notes="Prompt verbatim from the harness, which appends '?' even to questions ending in one. em: SQuAD "
                  "exact match of the reply cut at the first stop, any alias; contains: any alias inside the "
                  "reply's first line (LitM's best_subspan_em)."),
        TaskSpec(
            name="nq_open", title="NQ-Open", harness="nq_open", variants=("generate",),
            n_shot=0, max_shots=0, shots_from="none (harness default: 0-shot)",
            description=lambda item: "Answer these questions:\n\n",
            doc_to_text=lambda item: f"Q: {item.question}?\nA:", doc_to_target=_first_answer,
            scorer="short_answer", metrics={"generate": ("em", "contains")}, headline="em", floor_metric="contains",
            data="dev split (3610 questions)", default_files=("nq_open/NQ-open.dev.jsonl",),
            loader=load_nq_open, max_new_tokens=32, stop=("\n", ".", ","), fewshot_delimiter="\n", chance=0.0,
            notes="em: SQuAD exact match (lower-case, no punctuation or articles) against every answer."),
    )
}


# what the general-benchmark claims (kvlib.report.paper.general_claims) are judged on and called, per benchmark
HEADLINES: dict[str, str] = {name: spec.headline for name, spec in TASKS.items()}
TITLES: dict[str, str] = {name: spec.title for name, spec in TASKS.items()}


def headline_keys(tasks: Iterable[str]) -> list[dict]:
    """One claim key per benchmark in `tasks` (first occurrence order, once each): {"task", "metric": its headline
    metric}, what the general-benchmark claims are keyed by, from notebook 05, from its item files (rejudge) and in
    the baselines study alike."""
    return [{"task": t, "metric": HEADLINES[t]} for t in dict.fromkeys(tasks)]


def task_spec(name: str, where: str = "tasks") -> TaskSpec:
    if name not in TASKS:
        close = difflib.get_close_matches(name, list(TASKS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        fail(f"{where}.{name}", f"unknown benchmark{hint}; known: {', '.join(TASKS)}")
    return TASKS[name]


# ---------------------------------------------------------------------------------------------- params


@dataclass
class TaskParams:
    """How to run one benchmark (`tasks.<name>` in params). Subsampling: `max_examples` (a cap) or
    `fraction` (e.g. 0.2: the paper's 20% of MMLU for GPT-3.5), drawn with the notebook's seed, the same
    items for every model; MMLU is stratified by subject. `n_shot`/`max_new_tokens`: None keeps the task's
    convention. `variant`: auto = log-likelihood where the backend offers it, else generation. `path`: a
    file (directory for MMLU) instead of the data directory's default. `prompt_format` (generation only): auto =
    the harness's default, raw text without the chat template (`TaskSpec.prompt_format`), where the backend can
    send raw text (local models), else the chat template (chat APIs); "chat" asks for the chat template on every
    backend (with the notebook's `fewshot_format`); "raw" insists on raw text (refused for a chat API model)."""

    max_examples: int | None = None
    fraction: float | None = None
    n_shot: int | None = None
    variant: Literal["auto", "loglikelihood", "generate"] = "auto"
    max_new_tokens: int | None = None
    path: str | None = None
    prompt_format: Literal["auto", "raw", "chat"] = "auto"

    def validate(self) -> None:
        if self.max_examples is not None:
            check_positive("max_examples", self.max_examples)
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            fail("fraction", f"must be in (0, 1], got {self.fraction}")
        if self.max_examples is not None and self.fraction is not None:
            fail("fraction", "give max_examples or fraction, not both")
        if self.n_shot is not None:
            check_positive("n_shot", self.n_shot, 0)
        if self.max_new_tokens is not None:
            check_positive("max_new_tokens", self.max_new_tokens)

    def check_against(self, spec: TaskSpec, where: str) -> None:
        """Checks that need the task's declaration (called by the notebook params' validate)."""
        if self.n_shot is not None and self.n_shot > spec.max_shots:
            fail(f"{where}.n_shot", f"{spec.name} has {spec.max_shots} few-shot examples that are not test items "
                                    f"({spec.shots_from}); got {self.n_shot}")
        if self.variant != "auto" and self.variant not in spec.variants:
            fail(f"{where}.variant", f"{spec.name} runs as {list(spec.variants)}, got {self.variant!r}")
        if self.prompt_format != "auto" and "generate" not in spec.variants:
            fail(f"{where}.prompt_format", f"{spec.name} is scored by log-likelihood on raw text only; the prompt "
                                           f"format applies to generation")
        if self.prompt_format != "auto" and self.variant == "loglikelihood":
            fail(f"{where}.prompt_format", "applies to generation; variant loglikelihood scores raw text")


# ------------------------------------------------------------------------------------------- loading


def task_path(spec: TaskSpec, data_dir: str | Path | None = None, override: str | Path | None = None) -> Path:
    """The file (MMLU: directory) to read: `override`, else the first of the task's default files present
    in the data directory (kvlib.engine.data.resolve_data_dir)."""
    if override is not None:
        path = Path(override).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{spec.name}: {path} does not exist")
        return path

    root = resolve_data_dir(data_dir)
    for rel in spec.default_files:
        if (root / rel).exists():
            return root / rel
    wanted = ", ".join(str(root / rel) for rel in spec.default_files)
    raise FileNotFoundError(f"{spec.name}: none of {wanted} exists (README.md, section 'Data', says where to get "
                            f"the {spec.title} files)")


def subsample(items: Sequence[Item], max_examples: int | None = None, fraction: float | None = None,
              seed: int = 0, stratify: bool = False) -> list[Item]:
    """A deterministic subset, in the items' original order: `max_examples` items (or round(fraction x
    len)), drawn with `seed`; all items when neither is given or the cap exceeds the set. Stratified
    (MMLU): each group gets a share proportional to its size, and at least one item while the cap allows,
    so macro accuracy still covers every subject. The draw depends only on the items, cap and seed, so
    every model sees the same items."""
    items = list(items)
    if max_examples is not None and fraction is not None:
        raise ValueError("give max_examples or fraction, not both")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be an integer >= 1, got {max_examples!r}")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}")
    n = max_examples if max_examples is not None else (
        max(1, round(fraction * len(items))) if fraction is not None else len(items))
    if n >= len(items):
        return items
    if not stratify:
        chosen = random.Random(f"subsample:{seed}").sample(range(len(items)), n)
        return [items[i] for i in sorted(chosen)]
    groups: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(item.group, []).append(i)
    names = sorted(groups)
    quota = _allocate(n, [len(groups[g]) for g in names])
    chosen = []
    for name, k in zip(names, quota):
        chosen += random.Random(f"subsample:{seed}:{name}").sample(groups[name], k)
    return [items[i] for i in sorted(chosen)]


def _allocate(n: int, sizes: list[int]) -> list[int]:
    """Split n among groups of `sizes`: one each first, then the rest proportionally to what is left
    (largest remainder). With fewer than one per group, one each for the n largest groups."""
    if n < len(sizes):
        largest = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))[:n]
        return [int(i in largest) for i in range(len(sizes))]
    base = [1] * len(sizes)
    room = [s - b for s, b in zip(sizes, base)]
    rest = n - sum(base)
    exact = [rest * r / sum(room) if sum(room) else 0.0 for r in room]
    quota = [b + math.floor(e) for b, e in zip(base, exact)]
    # hand out what flooring left, largest fractional part first (ties: group order)
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    left = n - sum(quota)
    for i in order * 2:  # a second pass in case a group was already full
        if left == 0:
            break
        if quota[i] < sizes[i]:
            quota[i] += 1
            left -= 1
    return quota


@dataclass(frozen=True)
class PreparedTask:
    """A benchmark ready to run: its declaration, the (sub)sampled items, few-shot examples per item group
    ("" for all), the shots and generation budget in force, the requested variant and the load report."""

    spec: TaskSpec
    items: tuple[Item, ...]
    shots: Mapping[str, tuple[Item, ...]]
    n_shot: int
    max_new_tokens: int
    variant: str
    report: LoadReport
    path: Path
    prompt_format: str = "auto"  # requested (TaskParams.prompt_format); resolve_prompt_format gives the one used

    @property
    def n_total(self) -> int:
        return self.report.records

    def shots_for(self, item: Item) -> tuple[Item, ...]:
        return self.shots.get(item.group, self.shots.get("", ()))


def prepare_task(name: str, settings: TaskParams | Mapping[str, Any] | None = None,
                 data_dir: str | Path | None = None, seed: int = 0,
                 exclude_questions: Collection[str] = ()) -> PreparedTask:
    """Load (validating every record), subsample and attach few-shot examples for benchmark `name`.
    `exclude_questions`: question keys (kvlib.tasks.contamination.question_key) to drop before subsampling, e.g.
    the NQ-Open questions a finetuning set trained on; the report counts them (`excluded_trained_on`)."""

    spec = task_spec(name)
    if not isinstance(settings, TaskParams):
        settings = from_mapping(TaskParams, settings or {}, f"tasks.{name}")
    settings.check_against(spec, f"tasks.{name}")
    path = task_path(spec, data_dir, settings.path)
    items, report = spec.loader(path)
    if exclude_questions:

        items, dropped = drop_questions(items, set(exclude_questions))
        report = dataclasses.replace(report, notes=report.notes + (("excluded_trained_on", dropped),))
    chosen = subsample(items, settings.max_examples, settings.fraction, seed=seed, stratify=spec.macro)
    n_shot = spec.n_shot if settings.n_shot is None else settings.n_shot
    if name == "mmlu":
        shots = {k: tuple(v) for k, v in mmlu_shots(path, sorted({i.group for i in chosen}), n_shot).items()}
    elif name == "gsm8k":
        shots = {"": tuple(gsm8k_cot_exemplars()[:n_shot])}
    else:
        shots = {"": ()}
    # Shots never come from the test file (MMLU: dev split; GSM8K: fixed exemplars). MMLU itself repeats a
    # few questions across its splits (e.g. dev clinical_knowledge/0 is test college_medicine/152); the
    # harness keeps them, so do we, and the report counts items whose own prompt holds their question.
    repeats = sum(normalize_answer(item.question) in {normalize_answer(s.question) for s in
                                                      shots.get(item.group, shots.get("", ()))} for item in chosen)
    if repeats:
        report = dataclasses.replace(report, notes=report.notes + (("used items whose shots repeat their question",
                                                                    repeats),))
    return PreparedTask(spec, tuple(chosen), shots, n_shot,
                        settings.max_new_tokens or spec.max_new_tokens, settings.variant, report, path,
                        settings.prompt_format)


# ------------------------------------------------------------------------------------------ requests


def resolve_variant(task: PreparedTask, has_loglikelihood: bool) -> str | None:
    """The variant this backend runs the task as, or None when it cannot run it (a log-likelihood-only task
    on a chat API)."""
    if task.variant != "auto":
        if task.variant == "loglikelihood" and not has_loglikelihood:
            return None
        return task.variant
    for variant in task.spec.variants:
        if variant == "generate" or has_loglikelihood:
            return variant
    return None


def resolve_prompt_format(task: PreparedTask, raw_text: bool) -> str | None:
    """The prompt format ("raw" or "chat") a backend that can (`raw_text`) or cannot send raw text generates
    `task` in: the requested one, "auto" resolving to the task's harness default (`TaskSpec.prompt_format`) where
    the backend takes raw text, else to "chat"; None when raw text is required and the backend cannot send it."""
    requested = task.prompt_format
    if requested == "auto":
        return task.spec.prompt_format if raw_text else "chat"
    if requested == "raw" and not raw_text:
        return None
    if requested not in ("raw", "chat"):
        raise ValueError(f"{task.spec.name}: prompt_format must be auto, raw or chat, got {requested!r}")
    return requested


def fewshot_text(spec: TaskSpec, item: Item, shots: Sequence[Item]) -> str:
    """The harness's raw prompt: description, each shot as text + target_delimiter + target followed by
    the few-shot delimiter, then the item's text (ending where the answer starts)."""
    labeled = "".join(spec.doc_to_text(s) + spec.target_delimiter + spec.doc_to_target(s) + spec.fewshot_delimiter
                      for s in shots)
    return spec.description(item) + labeled + spec.doc_to_text(item)


def build_prompt(spec: TaskSpec, item: Item, shots: Sequence[Item], fewshot_format: str = "multiturn",
                 prompt_format: str = "chat"):
    """A generation request. prompt_format "raw": the harness's raw few-shot text (`fewshot_text`) as a RawPrompt,
    continued without the chat template. "chat", by `fewshot_format`: "single_turn", the raw few-shot text as one
    user message; "multiturn", each shot a user turn (its text) and an assistant turn (its answer), then the item
    as the last user turn. The description opens the first user turn (no system message: some chat templates,
    Mistral's among them, reject one)."""
    if prompt_format == "raw":
        return RawPrompt(fewshot_text(spec, item, shots))
    if prompt_format != "chat":
        raise ValueError(f"prompt_format must be 'raw' or 'chat', got {prompt_format!r}")
    if fewshot_format == "single_turn" or not shots:
        return [{"role": "user", "content": fewshot_text(spec, item, shots)}]
    if fewshot_format != "multiturn":
        raise ValueError(f"fewshot_format must be 'multiturn' or 'single_turn', got {fewshot_format!r}")
    messages = []
    for k, shot in enumerate(shots):
        prefix = spec.description(item) if k == 0 else ""
        messages += [{"role": "user", "content": prefix + spec.doc_to_text(shot)},
                     {"role": "assistant", "content": spec.doc_to_target(shot)}]
    return messages + [{"role": "user", "content": spec.doc_to_text(item)}]


def loglikelihood_requests(spec: TaskSpec, item: Item, shots: Sequence[Item]) -> list[tuple[str, str]]:
    """(raw context, target_delimiter + choice) for each choice, scored without the chat template as the
    harness does."""
    if spec.choices is None:
        raise ValueError(f"{spec.name} has no choices to score by log-likelihood")
    context = fewshot_text(spec, item, shots)
    return [(context, spec.target_delimiter + choice) for choice in spec.choices(item)]


def truncate_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to the earliest stop string (what the harness's `until` leaves), whitespace-stripped."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    cut = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:cut].strip()


# -------------------------------------------------------------------------------------------- scoring


def score_item(spec: TaskSpec, item: Item, variant: str, response: str | None = None,
               logliks: Sequence[float] | None = None, prompt_format: str = "chat") -> dict:
    """Per-item metrics (the columns of `spec.metrics[variant]`, plus what the model chose): from the
    choices' log-likelihoods (variant loglikelihood) or from the generated reply (variant generate; cut at the
    task's stop strings, for multiple choice only when the reply continues raw text, `prompt_format` "raw")."""
    if variant == "loglikelihood":
        if logliks is None:
            raise ValueError(f"{spec.name}: log-likelihood scoring needs logliks")
        choices = spec.choices(item)
        scores = multiple_choice_scores(logliks, choices, item.gold)
        return {**scores, "answer": choices[scores["pred"]]}
    if not isinstance(response, str):
        raise TypeError(f"{spec.name}: generation scoring needs the reply text, got {response!r}")
    if spec.scorer == "multiple_choice":  # generative multiple choice: the letter the reply names
        # raw text: the harness's mmlu_generative reads the first line; a chat reply is searched whole
        letter = parse_choice_letter(truncate_at_stop(response, spec.stop) if prompt_format == "raw" else response,
                                     len(item.choices))
        return {"answer": letter, "parsed": float(letter is not None),
                "acc": float(letter is not None and letter == LETTERS[item.gold])}
    answer = truncate_at_stop(response, spec.stop)
    if spec.scorer == "gsm8k":
        strict, flexible = extract_gsm8k_strict(answer), extract_gsm8k_flexible(answer)
        reference = item.answers[0]
        return {"answer": answer, "extracted_strict": strict, "extracted_flexible": flexible,
                "exact_strict": 0.0 if strict == GSM8K_INVALID else gsm8k_exact_match(strict, reference),
                "exact_flexible": 0.0 if flexible == GSM8K_INVALID else gsm8k_exact_match(flexible, reference)}
    if spec.scorer == "short_answer":
        # an alias that normalises to "" (e.g. the band "The The") would be inside every reply: not counted
        meaningful = [a for a in item.answers if normalize_answer(a)]
        first_line = response.strip().split("\n", 1)[0]
        return {"answer": answer, "em": exact_match_any(answer, list(item.answers)),
                "contains": best_subspan_em(first_line, meaningful) if meaningful else 0.0}
    raise ValueError(f"{spec.name}: unknown scorer {spec.scorer!r}")


# ----------------------------------------------------------------------------------------- evaluation


def supports_loglikelihood(backend) -> bool:
    """Whether the backend scores continuations (local HF models do; chat APIs do not). A
    kvlib.engine.cache.CachedBackend always has the method, so ask the backend it wraps."""
    inner = getattr(backend, "backend", backend)
    return callable(getattr(inner, "loglikelihood", None))


def answer_end(spec: TaskSpec) -> StopRule | None:
    """Where a generated reply's scored part ends (kvlib.engine.backends.StopRule; generation stops there), or
    None when the scorer may read the whole reply. GSM8K scores the reply up to its first stop string; the short
    answers' `em` reads the reply up to its first stop string ("\n" among them) and `contains` its first line,
    so both end at the first line; a generative multiple-choice letter may be named anywhere."""
    if spec.scorer == "gsm8k" and spec.stop:
        return StopRule(strings=spec.stop)
    if spec.scorer == "short_answer" and "\n" in spec.stop:
        return StopRule(first_line=True)
    return None


def _default_answer(backend, requests, max_new_tokens, stop=None):
    return answer_requests(backend, requests, max_new_tokens, stop)


def _loglikelihoods(backend, pairs: list[tuple[str, str]]) -> tuple[list, set[int]]:
    """Log-likelihood of every pair; pairs the model's context cannot hold are reported, not truncated:
    returns (results with None at those pairs, their indices)."""

    try:
        return [ll for ll, _ in backend.loglikelihood(pairs)], set()
    except ContextLengthError as exc:
        over = set(exc.indices)
    keep = [i for i in range(len(pairs)) if i not in over]
    results: list = [None] * len(pairs)
    for i, (ll, _) in zip(keep, backend.loglikelihood([pairs[i] for i in keep]) if keep else []):
        results[i] = ll
    return results, over


def evaluate_task(backend, task: PreparedTask, label: str, fewshot_format: str = "multiturn",
                  answer: Callable | None = None, row_fields: Mapping[str, Any] | None = None) -> list[dict]:
    """One row per item of `task` for model `label`: its metrics, or `skipped` with the reason (prompt over
    the context length; task not runnable on this backend). Nothing is dropped silently. `prompt_format` column:
    the text the model saw ("raw" without the chat template, log-likelihood always; "chat"; see
    resolve_prompt_format); `fewshot_format` applies to the chat format only.

    `answer(backend, requests, max_new_tokens) -> [str | None]` generates (default
    kvlib.engine.evaluate.answer_requests, stopping where `answer_end(spec)` says the scored part ends: None
    marks an over-length prompt); `row_fields` are columns added to
    every row (default kvlib.engine.evaluate.result_fields: model identity, dtype, max_new_tokens, ...)."""
    spec = task.spec
    variant = resolve_variant(task, supports_loglikelihood(backend))
    prompt_format = "raw" if variant == "loglikelihood" else (
        resolve_prompt_format(task, accepts_raw_text(backend)) if variant == "generate" else None)
    if row_fields is None:
        generates = variant == "generate"
        row_fields = result_fields(backend, task.max_new_tokens if generates else None,
                                   answer_end(spec) if generates and answer is None else None)
    base = {"model": label, "task": spec.name, "variant": variant or "not run", "n_shot": task.n_shot,
            "prompt_format": prompt_format, **row_fields}
    rows = [dict(base, id=item.id, group=item.group, skipped=None, response=None) for item in task.items]
    if variant is None or prompt_format is None:
        reason = ("no log-likelihoods on this backend" if variant is None
                  else "raw text (no chat template) asked for, which this backend cannot send")
        for row in rows:
            row["skipped"] = reason
        return rows
    if variant == "loglikelihood":
        spans, pairs = [], []
        for item in task.items:
            requests = loglikelihood_requests(spec, item, task.shots_for(item))
            spans.append((len(pairs), len(pairs) + len(requests)))
            pairs += requests
        lls, over = _loglikelihoods(backend, pairs)
        for row, item, (a, b) in zip(rows, task.items, spans):
            if over & set(range(a, b)):
                row["skipped"] = "over context length"
                continue
            row.update(score_item(spec, item, variant, logliks=lls[a:b]))
            row["response"] = row["answer"]
        return rows
    requests = [build_prompt(spec, item, task.shots_for(item), fewshot_format, prompt_format) for item in task.items]
    if answer is None:  # kvlib's own answering stops where the task's scorer stops reading
        replies = _default_answer(backend, requests, task.max_new_tokens, answer_end(spec))
    else:
        replies = answer(backend, requests, task.max_new_tokens)
    if len(replies) != len(requests):
        raise RuntimeError(f"{spec.name}: {len(replies)} replies for {len(requests)} requests")
    for row, item, reply in zip(rows, task.items, replies):
        if reply is None:
            row["skipped"] = "over context length"
            continue
        row["response"] = reply
        row.update(score_item(spec, item, variant, response=reply, prompt_format=prompt_format))
    return rows


# -------------------------------------------------------------------------------------------- reports


def _metric_columns(task: str, variant: str) -> tuple[str, ...]:
    return TASKS[task].metrics.get(variant, ())


def summarize_benchmarks(rows: Sequence[dict], n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """Per model x task x metric: n scored, n skipped, mean and 95% CI over items (`mean_ci`) (MMLU also
    `<metric>_macro`: mean over subjects, CI resampling within subjects). Models and tasks keep their
    order of appearance; a task not run on a model gives n = 0 and NaN."""
    out = []
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["task"]), []).append(r)
    for (model, task), items in groups.items():
        scored = [r for r in items if r["skipped"] is None]
        variant = items[0]["variant"]
        spec = TASKS[task]
        skipped = sorted({r["skipped"] for r in items if r["skipped"]})
        common = {"model": model, "task": task, "variant": variant, "prompt_format": items[0].get("prompt_format"),
                  "n_shot": items[0]["n_shot"],
                  "n": len(scored), "n_skipped": len(items) - len(scored), "skipped_reason": "; ".join(skipped)}
        metrics = _metric_columns(task, variant) or (spec.headline,)
        for metric in metrics:
            entries = [(metric, False)] + ([(f"{metric}_macro", True)] if spec.macro and metric != "parsed" else [])
            for name, macro in entries:
                value = lo = hi = float("nan")
                if scored:
                    values = [float(r[metric]) for r in scored]
                    value, lo, hi = (macro_bootstrap_ci(values, [r["group"] for r in scored], n_boot, seed) if macro
                                     else mean_ci(values, n_boot, seed))
                out.append({**common, "metric": name, "value": value, "ci_low": lo, "ci_high": hi,
                            "groups": len({r["group"] for r in scored}) if macro else None})
    return out


def benchmark_deltas(rows: Sequence[dict], baseline: str, n_boot: int = 2000, seed: int = 0,
                     margin: float | None = None) -> list[dict]:
    """Each other model minus `baseline` on the items both scored (same ids; kvlib.engine.evaluate.paired_with_base):
    per task x metric the mean difference with a paired 95% CI and the one-sided p-values of the claims' nulls
    from the same method (kvlib.engine.stats.paired_difference_test: Newcombe's paired score interval for 0/1 scores;
    columns as in kvlib.engine.evaluate.paired_deltas, `margin` the equivalence margin), and the baseline's score
    with its CI (`baseline_ci_low`, `baseline_ci_high`: Wilson), so a claim can tell whether it clears chance. MMLU
    macro: a bootstrap resampling within subjects, descriptive only (no p-values; no claim uses it)."""

    models = list(dict.fromkeys(r["model"] for r in rows))
    if baseline not in models:
        raise ValueError(f"baseline {baseline!r} has no rows; models: {models}")
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    scored = [r for r in rows if r["skipped"] is None]
    row_of = {(r["model"], r["task"], r["id"]): r for r in scored}
    pairings: dict[tuple[str, str], dict] = {}  # (task, metric) -> model -> (pairs, n_unpaired), once for all models
    out = []
    for model in models:
        if model == baseline:
            continue
        for task in tasks:
            task_rows = [r for r in rows if r["model"] == model and r["task"] == task]
            base_rows = [r for r in rows if r["model"] == baseline and r["task"] == task]
            if not task_rows or not base_rows:
                continue
            variant = task_rows[0]["variant"]
            base_variant = base_rows[0]["variant"]
            fmt, base_fmt = task_rows[0].get("prompt_format"), base_rows[0].get("prompt_format")
            spec = TASKS[task]
            metrics = [m for m in _metric_columns(task, variant) if m in _metric_columns(task, base_variant)
                       and m != "parsed"] or [spec.headline]
            for metric in metrics:
                if (task, metric) not in pairings:
                    pairings[(task, metric)] = paired_with_base([r for r in scored if r["task"] == task], baseline, [],
                                                                metric, "id").get((), {})
                pairs, _ = pairings[(task, metric)].get(model, ([], 0))
                for name, macro in [(metric, False)] + ([(f"{metric}_macro", True)] if spec.macro else []):
                    row = {"model": model, "baseline": baseline, "task": task, "metric": name,
                           "variant": variant if variant == base_variant else f"{variant} vs {base_variant}",
                           "prompt_format": fmt if fmt == base_fmt else f"{fmt} vs {base_fmt}",
                           "n": len(pairs), "value": float("nan"), "baseline_value": float("nan"),
                           "baseline_ci_low": float("nan"), "baseline_ci_high": float("nan"),
                           "delta": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "ci_method": "",
                           **dict.fromkeys(("p_increase", "p_decrease", "p_no_loss", "p_no_gain"), float("nan"))}
                    if pairs:
                        a = [float(v) for _, v, _ in pairs]
                        b = [float(v) for _, _, v in pairs]
                        if macro:
                            groups = [row_of[(model, task, i)]["group"] for i, _, _ in pairs]
                            value, base_value = macro_mean(a, groups), macro_mean(b, groups)
                            delta, lo, hi = macro_bootstrap_ci([x - y for x, y in zip(a, b)], groups, n_boot, seed)
                            row.update(value=value, baseline_value=base_value, delta=delta, ci_low=lo, ci_high=hi,
                                       ci_method="bootstrap within subjects (descriptive)")
                        else:
                            test = paired_difference_test(a, b)
                            _, base_lo, base_hi = mean_ci(b, n_boot, seed)
                            row.update(value=sum(a) / len(a), baseline_value=sum(b) / len(b), delta=test.estimate,
                                       baseline_ci_low=base_lo, baseline_ci_high=base_hi, **test.row(margin))
                    out.append(row)
    return out


def benchmark_seed_group_deltas(rows: Sequence[dict], baseline: str, groups: Mapping[str, Sequence[str]],
                                seed: int = 0, margin: float | None = None) -> list[dict]:
    """kvlib.engine.evaluate.seed_group_deltas on each benchmark's headline metric and its floor_metric (items the
    harness way: skipped items left out), one row per group x task x metric with `task` and `metric` set."""

    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        spec = TASKS[task]
        scored = [r for r in rows if r["task"] == task and r["skipped"] is None]
        for metric in dict.fromkeys(m for m in (spec.headline, spec.floor_metric) if m):
            out += by_seed(scored, baseline, groups, ["task"], metric, "id", seed=seed, margin=margin)
    return out


def drop_questions(items: Sequence, used: set[str]) -> tuple[list, int]:
    """(items whose question no training set used, how many were dropped): for the NQ-Open benchmark,
    `drop_questions(nq_items, kvlib.tasks.contamination.training_question_ids([...baseline dirs]))`."""
    kept = [item for item in items if question_id(item.question) not in used]
    return kept, len(items) - len(kept)
