"""FLenQA (Levy, Jacoby & Goldberg, ACL 2024, "Same Task, More Tokens", arXiv 2402.14848) as the paper
evaluates it (arXiv 2406.19292, Figs. 6-8): true/false reasoning questions whose two key paragraphs are
padded to 250-3000 tokens; accuracy against input length, with and without chain-of-thought.

What the official release looks like (and what `load_flenqa` reads)
- Source: the HF dataset `alonj/FLenQA` (split `eval`, 12,000 rows, `data/eval-*.parquet`; earlier also
  `FLenQA_hf.jsonl`) and the authors' repository github.com/alonj/Same-Task-More-Tokens (`FLenQA.zip`, JSON
  lines; `FLenQA analysis.ipynb` documents the fields and holds the prompts). Neither is reachable from this
  machine. The fields below come from that notebook, from microsoft/eureka-ml-insights (configs/flenqa.py,
  data_utils/flenqa_utils.py, prompt_templates/flenqa_templates/flenqa.jinja) and from a third-party loader
  that checked the full file's counts.
- One record per (problem, ctx_size, padding_type, dispersion): `global_sample_id` (int: the problem, 40 rows
  each = 5 lengths x 2 padding types x 4 dispersions; 300 problems), `sample_id` (int, within the task),
  `dataset` (the task: "MonoRel", "PIR" or "Simplified RuleTaker", 4,000 rows each), `label` ("True"/"False"
  or a bool, 6,000 each), `facts` (PIR, MonoRel: the two key paragraphs, each a whole line of the mixin),
  `statement` (RuleTaker: the two key fact sentences, each inside a key paragraph), `rule` (RuleTaker: a
  string, or a list of strings), `assertion/question`, `mixin` (key paragraphs and padding joined by "\\n",
  no instructions), `padding_type` ("same": paragraphs of other samples of the task; "books": unrelated
  book text), `dispersion` ("first", "middle", "last", "random": where the key paragraphs sit), `ctx_size`
  (250, 500, 1000, 2000, 3000: the target size of the mixin in tokens; the tokenizer is not documented).
  kvlib maps padding "same" -> "similar", "books" -> "different"; the paper's third kind, "duplicate" (the
  key paragraphs repeated), is not in the release. A rule given as a list is joined with spaces (the
  authors' f-string would print the list's repr).
- Prompts (kvlib/tasks/templates/flenqa_<task>.prompt.txt and .cot.txt): the authors' per-task normal and
  chain-of-thought prompts, verbatim with their quirks (RuleTaker's `"True or "False"`, PIR's line break in
  "to / be sure", typographic quotes, a final newline). The whole prompt is the user turn; decoding greedy
  (the authors: GPT-3.5-turbo-1106, temperature 0, up to 400 new tokens).
- Answers: kvlib.engine.scoring.parse_true_false. The authors lower-case the reply, turn "not true" into "false"
  and take whichever of "true"/"false" occurs last. kvlib keeps that rule on whole words (with "not",
  "n't", "untrue"), but an explicit "answer is X"/"Answer: X" wins and a reply that opens with its verdict
  is read from there; option lists ("True/False", "true or false") are not answers. A reply with no verdict
  is "unparseable" (their "other/refused"): counted, reported per setting, and scored wrong.

The regenerated benchmark (`FLenQAConfig`, `generate_flenqa`). The official data cannot be fetched here,
so kvlib rebuilds the benchmark from the published recipe. It is marked "regenerated" everywhere (each
record's `source`, ids, tables); its numbers are not numbers on the official release. Per task,
`samples_per_task` problems, half True and half False, each with two key fact sentences whose label
follows from them by construction (tests/test_flenqa.py proves every label with its own parser):
- Monotone Relations ("MonoRel"): "A is younger than B." "B is younger than C." (either may be stated by
  its converse, "C is older than B."); "Is A younger than C?" is True, the reversed question False.
- People In Rooms ("PIR"): "P is in the north library." "The north library is painted red." (or "... has a
  marble floor."); "Is P in a room painted red?" is True, another colour (floor) False: a room has one.
- Simplified RuleTaker: rule "If someone is big and kind then they are round.", facts "N is big." "N is
  kind.", statement "N is round."; True when the facts meet both conditions, False when one fact names
  another attribute (the statement then cannot be derived, which is what the prompt asks).
Vocabulary and sentences: kvlib/tasks/templates/flenqa.vocabulary.txt, flenqa.sentences.txt. Differences from
the official recipe:
- Key paragraphs: each fact sentence followed by `elaborations` background sentences
  (flenqa.elaborations.txt) that state nothing a question depends on; the official ones are GPT-4
  expansions of the facts.
- Padding: "duplicate" (the key paragraphs repeated; arrangement "repeated"), "similar" (paragraphs of other
  problems of the task, drawn from a separate pool of `similar_pool_problems` problems), "different" (real
  unrelated prose: DPR Wikipedia passages, the gold passages of the LitM oracle file of the data directory,
  instead of the authors' books). Padding never names the sample's people or rooms. Those passages are also
  MDQA's gold passages: harmless for FLenQA (another task), but FLenQA runs are not MDQA-clean.
- Dispersion: key paragraphs first, in the middle (by tokens), last, or at two random places (in order).
- Length: the mixin is whole padding paragraphs plus one paragraph cut at a word, to `ctx_size` +-
  `length_tolerance` tokens of the *evaluated model's* tokenizer (`tokenizer`). A problem's padding stream
  is shared by its lengths (the 500-token mixin extends the 250-token one), so only length changes.
- Size: `variants: all` makes every (length, padding, dispersion) of every problem, like the release;
  `one_per_length` gives each (problem, length) one (padding, dispersion), cycling, for small budgets.
Determinism: every random choice comes from a `random.Random(f"kvlib/flenqa/{seed}/<task>/<problem>/...")`
stream, so the same config gives byte-identical files, independent of which other tasks or sizes are made.
"""
from __future__ import annotations

import dataclasses
import json
import random
import re
import statistics
import zipfile
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Sequence

from tqdm.auto import tqdm

from kvlib.engine.config import ParamError, check_positive, fail, from_mapping, to_mapping
from kvlib.engine.data import mdqa_paths, read_jsonl_records
from kvlib.engine.evaluate import count_over_length, group_rows, summarize
from kvlib.engine.io import atomic_write_text, dumps_json, file_sha256
from kvlib.engine.models import MemoTokenCounter, load_token_counter
from kvlib.engine.scoring import parse_true_false
from kvlib.engine.stats import balanced_accuracy_ci
from kvlib.tasks.mdqa import load_mdqa
from kvlib.tasks.synthetic import load_template

Task = Literal["MonoRel", "PIR", "Simplified RuleTaker"]
Padding = Literal["duplicate", "similar", "different"]
Dispersion = Literal["first", "middle", "last", "random"]
Style = Literal["normal", "cot"]

FLENQA_TASKS: tuple[str, ...] = ("MonoRel", "PIR", "Simplified RuleTaker")  # the official `dataset` values
TASK_TITLES = {"MonoRel": "Monotone Relations", "PIR": "People In Rooms", "Simplified RuleTaker": "Simplified RuleTaker"}
TASK_SLUGS = {"MonoRel": "monorel", "PIR": "pir", "Simplified RuleTaker": "ruletaker"}
LENGTHS = (250, 500, 1000, 2000, 3000)
PADDINGS: tuple[str, ...] = ("duplicate", "similar", "different")
DISPERSIONS: tuple[str, ...] = ("first", "middle", "last", "random")
REPEATED = "repeated"  # the one arrangement of "duplicate" padding (the key paragraphs are the padding)
STYLES: tuple[str, ...] = ("normal", "cot")
# true/false verdicts: any constant answer scores 50% balanced accuracy (`balanced_accuracy_table`), so a claim is
# testable only where the original's balanced accuracy clears it (kvlib.report.paper.original_level)
FLENQA_CHANCE = 0.5
OFFICIAL_PADDING = {"same": "similar", "books": "different", "duplicate": "duplicate"}
SOURCES = ("official", "regenerated")
FLENQA_FILE = "flenqa.jsonl"
_SEP = "\n"  # between the paragraphs of a mixin, as in the release


class FLenQAFormatError(ValueError):
    """A record of a FLenQA file is malformed. The message starts with `file:line:`."""


# ---------------------------------------------------------------- records


def _check_text(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}: must be a non-empty string, got {value!r}")


@dataclass(frozen=True)
class FLenQARecord:
    """One prompt's worth of FLenQA: a problem at one length, padding kind and dispersion.

    `facts` are the key facts: the fact sentences (regenerated data), or as the release gives them (its
    PIR/MonoRel `facts` are the key paragraphs themselves, RuleTaker's `statement` the sentences);
    `key_paragraphs` are the mixin lines that hold them and `key_positions` their line indices;
    `n_tokens` is the mixin's measured length (regenerated data) in `tokenizer`."""

    id: str
    problem_id: str
    task: str
    label: bool
    question: str
    facts: tuple[str, ...]
    mixin: str
    ctx_size: int
    padding: str
    dispersion: str
    source: str
    rule: str | None = None
    key_paragraphs: tuple[str, ...] = ()
    key_positions: tuple[int, ...] = ()
    n_tokens: int | None = None
    tokenizer: str | None = None

    def __post_init__(self) -> None:
        for name in ("id", "problem_id", "question", "mixin"):
            _check_text(name, getattr(self, name))
        if self.task not in FLENQA_TASKS:
            raise ValueError(f"task: must be one of {list(FLENQA_TASKS)}, got {self.task!r}")
        if not isinstance(self.label, bool):
            raise ValueError(f"label: must be true or false, got {self.label!r}")
        if not isinstance(self.facts, tuple) or not self.facts:
            raise ValueError(f"facts: must be a non-empty tuple of strings, got {self.facts!r}")
        for i, fact in enumerate(self.facts):
            _check_text(f"facts[{i}]", fact)
        if (self.task == "Simplified RuleTaker") != (self.rule is not None):
            raise ValueError(f"rule: required for Simplified RuleTaker and only there, got {self.rule!r}")
        if self.rule is not None:
            _check_text("rule", self.rule)
        if isinstance(self.ctx_size, bool) or not isinstance(self.ctx_size, int) or self.ctx_size < 1:
            raise ValueError(f"ctx_size: must be a positive integer, got {self.ctx_size!r}")
        if self.padding not in PADDINGS:
            raise ValueError(f"padding: must be one of {list(PADDINGS)}, got {self.padding!r}")
        if self.dispersion not in (*DISPERSIONS, REPEATED):
            raise ValueError(f"dispersion: must be one of {[*DISPERSIONS, REPEATED]}, got {self.dispersion!r}")
        if self.source not in SOURCES:
            raise ValueError(f"source: must be one of {list(SOURCES)}, got {self.source!r}")
        lines = self.mixin.split(_SEP)
        if len(self.key_positions) != len(self.key_paragraphs):
            raise ValueError("key_positions: one position per key paragraph is required")
        for pos, paragraph in zip(self.key_positions, self.key_paragraphs):
            if not 0 <= pos < len(lines) or lines[pos] != paragraph:
                raise ValueError(f"key_positions: mixin line {pos} is not the key paragraph {paragraph[:40]!r}...")


def record_to_json(record: FLenQARecord) -> dict:
    """Plain-data view of a record (field order as declared; tuples become lists)."""
    return to_mapping(record)


def record_from_json(data: dict) -> FLenQARecord:
    """A record from `record_to_json` data; wrong fields raise ValueError naming them."""
    try:
        return from_mapping(FLenQARecord, data)
    except ParamError as exc:
        raise ValueError(str(exc)) from None


# ---------------------------------------------------------------- the official release


@dataclass
class _RawOfficial:
    """One record of the official release (see the module docstring); `assertion/question` is read into
    `question`. Other keys are ignored."""

    dataset: str
    label: str | bool
    question: str
    mixin: str
    ctx_size: int
    padding_type: str
    dispersion: str
    global_sample_id: int | None = None
    sample_id: int | None = None
    facts: list[str] | None = None
    statement: list[str] | None = None
    rule: str | list[str] | None = None


_OFFICIAL_KEYS = {f.name for f in dataclasses.fields(_RawOfficial)} - {"question"} | {"assertion/question"}


def _official_label(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ValueError(f"label: must be True or False, got {value!r}")


def _key_lines(lines: list[str], keys: Sequence[str], whole_line: bool) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """The first mixin line that is (PIR/MonoRel) or contains (RuleTaker) each key text, with its index."""
    paragraphs, positions = [], []
    for key in keys:
        for i, line in enumerate(lines):
            if (line == key) if whole_line else (key in line):
                paragraphs.append(line)
                positions.append(i)
                break
    return tuple(paragraphs), tuple(positions)


def official_record(data: dict, line: int = 0) -> FLenQARecord:
    """A FLenQARecord from one official record; ValueError naming the field if it is malformed."""
    if not isinstance(data, dict):
        raise ValueError(f"a record must be a JSON object, got {type(data).__name__}")
    if "assertion/question" not in data:
        raise ValueError("assertion/question: required parameter is missing")
    raw_data = {k: v for k, v in data.items() if k in _OFFICIAL_KEYS and k != "assertion/question"}
    try:
        raw = from_mapping(_RawOfficial, {**raw_data, "question": data["assertion/question"]})
    except ParamError as exc:
        raise ValueError(str(exc).replace("question:", "assertion/question:", 1)) from None
    if raw.dataset not in FLENQA_TASKS:
        raise ValueError(f"dataset: must be one of {list(FLENQA_TASKS)}, got {raw.dataset!r}")
    if raw.padding_type not in OFFICIAL_PADDING:
        raise ValueError(f"padding_type: must be one of {list(OFFICIAL_PADDING)}, got {raw.padding_type!r}")
    ruletaker = raw.dataset == "Simplified RuleTaker"
    key_field = "statement" if ruletaker else "facts"
    facts = raw.statement if ruletaker else raw.facts
    if not facts:
        raise ValueError(f"{key_field}: required (a non-empty list) for {raw.dataset}")
    rule = None
    if ruletaker:
        if not raw.rule:
            raise ValueError("rule: required for Simplified RuleTaker")
        rule = raw.rule if isinstance(raw.rule, str) else " ".join(raw.rule)
    problem = f"official-{raw.global_sample_id}" if raw.global_sample_id is not None else f"official-line{line}"
    paragraphs, positions = _key_lines(raw.mixin.split(_SEP), facts, whole_line=not ruletaker)
    return FLenQARecord(
        id=f"{problem}-{raw.ctx_size}-{raw.padding_type}-{raw.dispersion}",
        problem_id=problem, task=raw.dataset, label=_official_label(raw.label), question=raw.question,
        facts=tuple(facts), mixin=raw.mixin, ctx_size=raw.ctx_size, padding=OFFICIAL_PADDING[raw.padding_type],
        dispersion=raw.dispersion, source="official", rule=rule, key_paragraphs=paragraphs,
        key_positions=positions,
    )


def to_official_record(record: FLenQARecord, global_sample_id: int, sample_id: int) -> dict:
    """The record in the release's format (e.g. to hand regenerated data to other FLenQA tooling)."""
    official_padding = {v: k for k, v in OFFICIAL_PADDING.items()}[record.padding]
    ruletaker = record.task == "Simplified RuleTaker"
    return {
        "global_sample_id": global_sample_id, "sample_id": sample_id, "label": str(record.label),
        # the release's PIR/MonoRel `facts` are the key paragraphs themselves; RuleTaker's `statement` the sentences
        "dataset": record.task, "facts": None if ruletaker else list(record.key_paragraphs or record.facts),
        "rule": record.rule,
        "statement": list(record.facts) if ruletaker else None, "assertion/question": record.question,
        "mixin": record.mixin, "padding_type": official_padding, "dispersion": record.dispersion,
        "ctx_size": record.ctx_size,
    }


def _official_rows(path: Path) -> list[tuple[int, Any]]:
    """(line or row number, record) of an official file: JSON lines (plain, gzip, or inside a .zip as the
    authors ship it), a JSON array, or parquet (needs pyarrow)."""

    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise FLenQAFormatError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    if suffix == ".zip":
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if not n.endswith("/") and not n.startswith("__MACOSX")]
            if len(members) != 1:
                raise FLenQAFormatError(f"{path}: expected one data file in the archive, found {members}")
            text = archive.read(members[0]).decode("utf-8")
        return _parse_text(text, f"{path}!{members[0]}")
    if suffix == ".json":
        return _parse_text(path.read_text(encoding="utf-8"), str(path))
    return read_jsonl_records(path)[0]


def _parse_text(text: str, where: str) -> list[tuple[int, Any]]:
    if text.lstrip().startswith("["):
        try:
            values = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FLenQAFormatError(f"{where}: not valid JSON ({exc})") from None
        return list(enumerate(values, 1))
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                raise FLenQAFormatError(f"{where}:{lineno}: malformed JSON line ({exc.msg})") from None
    return rows


def load_flenqa(path: str | Path) -> list[FLenQARecord]:
    """Every record of an official FLenQA file (.jsonl[.gz], .json, .zip as in the authors' repository, or
    .parquet as on the HF hub), validated; a malformed record raises FLenQAFormatError naming `file:line`
    (row number for JSON arrays and parquet) and the field. Records keep the file's order."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"FLenQA file not found: {path} (official source: HF dataset alonj/FLenQA)")
    try:
        rows = _official_rows(path)
    except ValueError as exc:  # kvlib.engine.data names path:line already
        raise FLenQAFormatError(str(exc)) from None
    records, seen = [], {}
    for lineno, data in rows:
        try:
            record = official_record(data, lineno)
        except ValueError as exc:
            raise FLenQAFormatError(f"{path}:{lineno}: {exc}") from None
        if record.id in seen:
            raise FLenQAFormatError(f"{path}:{lineno}: duplicate record {record.id} (also line {seen[record.id]})")
        seen[record.id] = lineno
        records.append(record)
    if not records:
        raise FLenQAFormatError(f"{path}: no records")
    return records


# ---------------------------------------------------------------- vocabulary and sentences


@lru_cache(maxsize=None)
def _keyed_lines(name: str) -> dict[str, list[str]]:
    """`key: value` lines of kvlib/tasks/templates/<name>.txt (comments and blank lines skipped), key -> values."""
    out: dict[str, list[str]] = {}
    for line in load_template(name).splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise ValueError(f"kvlib/tasks/templates/{name}.txt: line without `key:` {line!r}")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


@lru_cache(maxsize=None)
def vocabulary() -> dict[str, list[str]]:
    """The word lists of kvlib/tasks/templates/flenqa.vocabulary.txt (do not mutate: cached)."""
    return {k: [x.strip() for x in v[0].split(",")] for k, v in _keyed_lines("flenqa.vocabulary").items()}


def _sentence(key: str, /, **fields: str) -> str:
    return _keyed_lines("flenqa.sentences")[key][0].format(**fields)


# ---------------------------------------------------------------- problems


@dataclass(frozen=True)
class Problem:
    """One base problem: two key facts, each expanded into a key paragraph, a question (the statement, for
    RuleTaker), the rule (RuleTaker) and the label by construction. `entities` are the people and rooms it
    names."""

    task: str
    index: int
    label: bool
    facts: tuple[str, str]
    paragraphs: tuple[str, str]
    question: str
    rule: str | None
    entities: tuple[str, ...]

    @property
    def blocked(self) -> tuple[str, ...]:
        """What padding may not contain: the problem's people and rooms, and every part of its people's
        names (no other "Bramley" next to Abigail Bramley)."""
        people = [e for e in self.entities if e[:1].isupper()]
        return tuple(dict.fromkeys([*self.entities, *(part for name in people for part in name.split(" "))]))


def _people(rng: random.Random, vocab: dict, n: int) -> list[str]:
    # distinct first and distinct last names, so no two people of a problem can be confused
    return [f"{f} {last}" for f, last in zip(rng.sample(vocab["first_names"], n), rng.sample(vocab["last_names"], n))]


def _draw_monorel(rng: random.Random, vocab: dict, label: bool):
    lesser, greater = rng.choice(vocab["relations"]).split("/")
    a, b, c = _people(rng, vocab, 3)  # a < b < c in the `lesser` sense (a is younger than b, b than c)

    def state(x: str, y: str) -> tuple[str, str, dict]:  # "x lesser y", or its converse "y greater x"
        first, rel, second = (x, lesser, y) if rng.random() < 0.5 else (y, greater, x)
        return _sentence("monorel.fact", a=first, relation=rel, b=second), "monorel", {"a": first, "b": second}

    facts = [state(a, b), state(b, c)]
    if label:
        question = (a, lesser, c) if rng.random() < 0.5 else (c, greater, a)
    else:
        question = (c, lesser, a) if rng.random() < 0.5 else (a, greater, c)
    q = _sentence("monorel.question", a=question[0], relation=question[1], b=question[2])
    return facts, q, None, (a, b, c)


def _draw_pir(rng: random.Random, vocab: dict, label: bool):
    (person,) = _people(rng, vocab, 1)
    room = f"{rng.choice(vocab['room_adjectives'])} {rng.choice(vocab['room_nouns'])}"
    category = rng.choice(["color", "floor"])
    values = vocab["colors"] if category == "color" else vocab["floors"]
    value = rng.choice(values)
    asked = value if label else rng.choice([v for v in values if v != value])
    facts = [
        (_sentence("pir.person_fact", person=person, room=room), "pir_person", {"person": person, "room": room}),
        (_sentence(f"pir.{category}_fact", room=room, value=value), "pir_room", {"room": room}),
    ]
    return facts, _sentence(f"pir.{category}_question", person=person, value=asked), None, (person, room)


def _draw_ruletaker(rng: random.Random, vocab: dict, label: bool):
    (name,) = _people(rng, vocab, 1)
    a, b, c, other = rng.sample(vocab["attributes"], 4)
    held = [a, b]
    if not label:  # one condition of the rule is not met: the statement cannot be derived
        held[rng.randrange(2)] = other
    facts = [(_sentence("ruletaker.fact", name=name, attribute=x), "ruletaker", {"name": name}) for x in held]
    rule = _sentence("ruletaker.rule", a=a, b=b, c=c)
    return facts, _sentence("ruletaker.statement", name=name, attribute=c), rule, (name,)


_DRAW = {"MonoRel": _draw_monorel, "PIR": _draw_pir, "Simplified RuleTaker": _draw_ruletaker}


def draw_problem(task: str, index: int, seed: int, elaborations: int = 2, pool: bool = False) -> Problem:
    """Problem `index` of `task` (label True for even indices, so any even count is balanced). `pool`
    problems come from their own streams: they only pad other problems ("similar" padding)."""
    if task not in FLENQA_TASKS:
        raise ValueError(f"task must be one of {list(FLENQA_TASKS)}, got {task!r}")
    stream = f"kvlib/flenqa/{seed}/{TASK_SLUGS[task]}/{'pool/' if pool else ''}{index}"
    rng, vocab = random.Random(stream), vocabulary()
    label = index % 2 == 0
    facts, question, rule, entities = _DRAW[task](rng, vocab, label)
    rng.shuffle(facts)  # which key fact comes first in the text
    templates = _keyed_lines("flenqa.elaborations")
    paragraphs = []
    for sentence, kind, fields in facts:
        extra = [t.format(**fields) for t in rng.sample(templates[kind], elaborations)]
        paragraphs.append(" ".join([sentence, *extra]))
    return Problem(task, index, label, (facts[0][0], facts[1][0]), (paragraphs[0], paragraphs[1]), question,
                   rule, tuple(entities))


# ---------------------------------------------------------------- padding and lengths


def load_padding_passages(data_dir: str | Path | None = None) -> tuple[list[str], Path]:
    """Unrelated real prose for "different" padding: the DPR Wikipedia gold passages of the LitM oracle
    file in the data directory (kvlib.engine.data), whitespace-normalised, deduplicated, at least 20 words, in
    file order. Returns (passages, the file read)."""

    path = padding_source_file(data_dir)
    examples, _ = load_mdqa(path)
    passages = list(dict.fromkeys(" ".join(e.gold.text.split()) for e in examples))
    return [p for p in passages if len(p.split(" ")) >= 20], path


class _TokenCache(MemoTokenCounter):
    """Token counts of padding and key paragraphs, each text counted once, in batches; `sep` is what the
    paragraph separator adds when two paragraphs are joined (1 for most tokenizers)."""

    def __init__(self, count: Callable[[list[str]], list[int]]):
        super().__init__(count)
        a, b, joined = self.count(["Alpha beta.", "Gamma delta.", f"Alpha beta.{_SEP}Gamma delta."])
        self.sep = max(0, joined - a - b)


class _Stream:
    """A problem's padding paragraphs in the order it uses them, materialised (and counted) as needed, so
    every length of the problem reads the same stream: longer mixins extend shorter ones."""

    def __init__(self, units: Iterator[tuple[str, int]], cache: _TokenCache):
        self.source, self.units, self.cache = units, [], cache

    def unit(self, k: int) -> tuple[str, int, int]:
        """(paragraph, fewest words a cut of it may keep, tokens) of the k-th unit; IndexError past the end."""
        while len(self.units) <= k:
            chunk = list(islice(self.source, 32))
            if not chunk:
                raise IndexError(k)
            self.cache.prime([text for text, _ in chunk])
            self.units.extend(chunk)
        text, min_words = self.units[k]
        return text, min_words, self.cache[text]


def _mentions(text: str, entities: Sequence[str]) -> bool:
    return any(e in text for e in entities)


def _shuffled(rng: random.Random, n: int) -> list[int]:
    order = list(range(n))
    rng.shuffle(order)
    return order


def _padding_units(problem: Problem, padding: str, seed: int, pool: Sequence[tuple[str, int]],
                   passages: Sequence[str]) -> Iterator[tuple[str, int]]:
    """(paragraph, fewest words a cut may keep) of `padding` for `problem`. A cut of a generated paragraph
    keeps at least its fact sentence (its first), so padding never holds half a fact."""
    if padding == "duplicate":
        while True:
            for paragraph, fact in zip(problem.paragraphs, problem.facts):
                yield paragraph, len(fact.split(" "))
    rng = random.Random(f"kvlib/flenqa/{seed}/{TASK_SLUGS[problem.task]}/{problem.index}/{padding}")
    if padding == "similar":
        for i in _shuffled(rng, len(pool)):
            if not _mentions(pool[i][0], problem.blocked):  # other people and rooms only
                yield pool[i]
    else:
        for i in _shuffled(rng, len(passages)):
            if not _mentions(passages[i], problem.blocked):
                yield passages[i], 1


def _best_cut(text: str, min_words: int, target: int,
              count: Callable[[list[str]], list[int]]) -> tuple[str, int] | None:
    """The word prefix of `text` (at least `min_words` words, not all of them) whose token count is closest
    to `target`, with its count. Prefix counts grow with the prefix, so a search that counts 16 evenly
    spaced prefixes per round (one batch) brackets the answer in two or three rounds, also in passages
    whose token density varies (numbers, tables)."""
    words = text.split(" ")
    lo, hi = max(min_words, 1), len(words) - 1
    if target <= 0 or lo > hi:
        return None
    while True:
        final = hi - lo < 24
        ms = list(range(lo, hi + 1)) if final else sorted({lo + round((hi - lo) * k / 15) for k in range(16)})
        prefixes = [" ".join(words[:m]) for m in ms]
        counts = count(prefixes)
        if final:
            return min(zip(prefixes, counts), key=lambda pc: abs(target - pc[1]))
        below = [k for k, c in enumerate(counts) if c <= target]
        k = below[-1] if below else 0
        lo, hi = ms[k], ms[min(k + 1, len(ms) - 1)]


def _fill(stream: _Stream, budget: int, cache: _TokenCache) -> list[tuple[str, int]]:
    """(paragraph, tokens) of the padding: whole paragraphs while they fit `budget` (separators counted),
    then whichever ending comes closest to it: nothing more, a cut of the next paragraph, or, when even the
    shortest allowed cut of the next paragraph (its fact sentence) overshoots, the previous paragraph cut
    shorter to make room for that shortest cut."""
    chosen: list[tuple[str, int]] = []
    used, k = 0, 0
    while True:
        text, min_words, tokens = stream.unit(k)
        cost = tokens + (cache.sep if chosen else 0)
        if used + cost > budget:
            break
        chosen.append((text, tokens))
        used, k = used + cost, k + 1
    sep = cache.sep if chosen else 0
    options = [(budget - used, chosen)]
    cut = _best_cut(text, min_words, budget - used - sep, cache.count)
    if cut is not None:
        options.append((abs(budget - used - sep - cut[1]), chosen + [cut]))
    if chosen and min_words > 1:
        shortest = " ".join(text.split(" ")[:min_words])
        (short_tokens,) = cache.count([shortest])
        previous, previous_words = stream.units[k - 1]
        room = chosen[-1][1] + budget - used - cache.sep - short_tokens
        trimmed = _best_cut(previous, previous_words, room, cache.count)
        if trimmed is not None:
            options.append((abs(room - trimmed[1]), chosen[:-1] + [trimmed, (shortest, short_tokens)]))
    return min(options, key=lambda option: option[0])[1]


def _halve(padding: list[tuple[str, int]]) -> tuple[list[str], int]:
    """The padding lines and the index that splits them at their token halfway mark: between paragraphs, or
    at a sentence end inside the paragraph that straddles it (split into two lines; tokens inside a paragraph
    estimated by characters), whichever is closer. Never inside a sentence, so no fact is broken."""
    half = sum(n for _, n in padding) / 2
    before = 0.0
    for k, (text, n) in enumerate(padding):
        if before + n >= half:
            options = [(abs(before - half), 0), (abs(before + n - half), len(text))]
            for end in (m.end() for m in re.finditer(r"[.?!] ", text)):
                options.append((abs(before + n * end / len(text) - half), end))
            _, cut = min(options)
            texts = [t for t, _ in padding]
            if cut == 0:
                return texts, k
            if cut == len(text):
                return texts, k + 1
            return texts[:k] + [text[:cut].rstrip(), text[cut:]] + texts[k + 1:], k + 1
        before += n
    return [t for t, _ in padding], len(padding)


def _arrange(keys: tuple[str, str], padding: list[tuple[str, int]], dispersion: str,
             rng: random.Random) -> tuple[list[str], tuple[int, int]]:
    """Mixin lines and the positions of the two key paragraphs (kept in order)."""
    texts = [t for t, _ in padding]
    if dispersion in ("first", REPEATED):
        i = j = 0
    elif dispersion == "last":
        i = j = len(texts)
    elif dispersion == "middle":
        texts, i = _halve(padding)
        j = i
    elif dispersion == "random":
        i, j = sorted(rng.randint(0, len(texts)) for _ in range(2))
    else:
        raise ValueError(f"unknown dispersion {dispersion!r}")
    lines = texts[:i] + [keys[0]] + texts[i:j] + [keys[1]] + texts[j:]
    return lines, (i, j + 1)


@dataclass
class FLenQAConfig:
    """The regenerated benchmark (see the module docstring). Defaults: the release's shape (100 problems per
    task, five lengths, the two released padding kinds, four dispersions, every combination)."""

    tasks: list[Task] = field(default_factory=lambda: list(FLENQA_TASKS))
    samples_per_task: int = 100  # problems per task, half True (even indices) and half False
    lengths: list[int] = field(default_factory=lambda: list(LENGTHS))  # target mixin tokens
    paddings: list[Padding] = field(default_factory=lambda: ["similar", "different"])
    dispersions: list[Dispersion] = field(default_factory=lambda: list(DISPERSIONS))
    variants: Literal["all", "one_per_length"] = "all"
    tokenizer: str = "smollm2-135m-instruct"  # the evaluated model's: lengths are measured in its tokens
    length_tolerance: int = 10  # |mixin tokens - target| allowed
    elaborations: int = 2  # background sentences after each fact sentence in its key paragraph
    similar_pool_problems: int = 200  # problems per task made only to pad ("similar" padding)
    seed: int = 0

    def validate(self) -> None:
        for name in ("tasks", "lengths", "paddings", "dispersions"):
            values = getattr(self, name)
            if not values:
                fail(name, "must not be empty")
            if len(set(values)) != len(values):
                fail(name, f"must not repeat a value, got {values}")
        check_positive("samples_per_task", self.samples_per_task, 2)
        if self.samples_per_task % 2:
            fail("samples_per_task", f"must be even (half True, half False), got {self.samples_per_task}")
        for i, length in enumerate(self.lengths):
            check_positive(f"lengths[{i}]", length, 50)
        check_positive("length_tolerance", self.length_tolerance)
        most = min(len(v) for v in _keyed_lines("flenqa.elaborations").values())
        if not 0 <= self.elaborations <= most:
            fail("elaborations", f"must be in [0, {most}] (the templates per kind), got {self.elaborations}")
        if "similar" in self.paddings:
            check_positive("similar_pool_problems", self.similar_pool_problems, 2)
        if not self.tokenizer.strip():
            fail("tokenizer", "must name the evaluated model's tokenizer")

    def combos(self) -> list[tuple[str, str]]:
        """(padding, dispersion) pairs; "duplicate" has the one arrangement "repeated"."""
        return [(p, d) for p in self.paddings for d in ([REPEATED] if p == "duplicate" else self.dispersions)]


@dataclass
class _Variant:
    problem: Problem
    padding: str
    dispersion: str
    length: int
    key_tokens: int  # both key paragraphs and the separator between them
    stream: _Stream


def _problem_id(problem: Problem, seed: int) -> str:
    return f"{TASK_SLUGS[problem.task]}-s{seed}-p{problem.index:03d}"


def _build(v: _Variant, budget: int, seed: int, cache: _TokenCache) -> tuple[list[str], tuple[int, int]]:
    padding = _fill(v.stream, budget, cache)
    rng = random.Random(f"kvlib/flenqa/{seed}/{TASK_SLUGS[v.problem.task]}/{v.problem.index}/{v.padding}/"
                        f"{v.length}/{v.dispersion}")
    return _arrange(v.problem.paragraphs, padding, v.dispersion, rng)


def _finalize(variants: list[_Variant], cfg: FLenQAConfig, cache: _TokenCache) -> list[FLenQARecord]:
    """Build every variant's mixin, measure it exactly and rebuild (budget corrected by the error) the few
    whose measured length misses the target by more than the tolerance (token merges at the joins)."""
    budgets = [v.length - v.key_tokens - cache.sep for v in variants]
    built: list = [None] * len(variants)
    measured = [0] * len(variants)
    todo = list(range(len(variants)))
    for _ in range(5):
        for k in todo:
            built[k] = _build(variants[k], budgets[k], cfg.seed, cache)
        counts = cache.count([_SEP.join(built[k][0]) for k in todo])
        missed = []
        for k, n in zip(todo, counts):
            measured[k] = n
            if abs(n - variants[k].length) > cfg.length_tolerance:
                budgets[k] -= n - variants[k].length
                missed.append(k)
        todo = missed
        if not todo:
            break
    if todo:
        v = variants[todo[0]]
        raise ValueError(f"{len(todo)} mixin(s) stay outside {cfg.length_tolerance} tokens of their target, "
                         f"e.g. {_problem_id(v.problem, cfg.seed)} at {v.length}: {measured[todo[0]]} tokens")
    records = []
    for v, (lines, positions), n in zip(variants, built, measured):
        pid = _problem_id(v.problem, cfg.seed)
        records.append(FLenQARecord(
            id=f"{pid}-{v.length}-{v.padding}-{v.dispersion}", problem_id=pid, task=v.problem.task,
            label=v.problem.label, question=v.problem.question, facts=v.problem.facts, mixin=_SEP.join(lines),
            ctx_size=v.length, padding=v.padding, dispersion=v.dispersion, source="regenerated",
            rule=v.problem.rule, key_paragraphs=v.problem.paragraphs, key_positions=positions, n_tokens=n,
            tokenizer=cfg.tokenizer,
        ))
    return records


def generate_flenqa(cfg: FLenQAConfig, count_tokens: Callable[[list[str]], list[int]] | None = None,
                    passages: Sequence[str] | None = None, data_dir: str | Path | None = None,
                    progress: bool = False) -> list[FLenQARecord]:
    """The regenerated benchmark of `cfg`: records by task, problem, length, padding, dispersion.
    `count_tokens` defaults to `cfg.tokenizer`; `passages` ("different" padding) to
    load_padding_passages(data_dir)."""
    if not isinstance(cfg, FLenQAConfig):
        cfg = from_mapping(FLenQAConfig, cfg, "generation")
    if count_tokens is None:

        count_tokens = load_token_counter(cfg.tokenizer).count
    if "different" in cfg.paddings and passages is None:
        passages, _ = load_padding_passages(data_dir)
    passages = list(passages or [])
    cache, combos = _TokenCache(count_tokens), cfg.combos()
    bar = None
    if progress:

        bar = tqdm(total=len(cfg.tasks) * cfg.samples_per_task, desc="regenerate FLenQA", unit="problem")
    records: list[FLenQARecord] = []
    try:
        for task in cfg.tasks:
            pool: list[tuple[str, int]] = []
            if "similar" in cfg.paddings:
                for j in range(cfg.similar_pool_problems):
                    p = draw_problem(task, j, cfg.seed, cfg.elaborations, pool=True)
                    pool += [(text, len(fact.split(" "))) for text, fact in zip(p.paragraphs, p.facts)]
            variants = []
            for i in range(cfg.samples_per_task):
                problem = draw_problem(task, i, cfg.seed, cfg.elaborations)
                key_tokens = sum(cache[p] for p in problem.paragraphs) + cache.sep
                streams: dict[str, _Stream] = {}
                for j, length in enumerate(cfg.lengths):
                    if key_tokens > length + cfg.length_tolerance:
                        raise ParamError(f"lengths: {length} tokens is too short for {_problem_id(problem, cfg.seed)}: "
                                         f"its two key paragraphs alone take {key_tokens}")
                    chosen = combos if cfg.variants == "all" else [combos[(i + j) % len(combos)]]
                    for padding, dispersion in chosen:
                        if padding not in streams:
                            streams[padding] = _Stream(_padding_units(problem, padding, cfg.seed, pool, passages), cache)
                        variants.append(_Variant(problem, padding, dispersion, length, key_tokens, streams[padding]))
                if bar is not None:
                    bar.update(1)
            try:
                records += _finalize(variants, cfg, cache)
            except IndexError:
                raise ParamError(f"lengths: the padding paragraphs of {task} ran out before {max(cfg.lengths)} "
                                 f"tokens; raise similar_pool_problems or lower lengths") from None
    finally:
        if bar is not None:
            bar.close()
    return records


# ---------------------------------------------------------------- files


def padding_source_file(data_dir: str | Path | None = None) -> Path:
    """The file "different" padding reads its Wikipedia passages from (the LitM oracle file)."""

    return mdqa_paths(data_dir)["oracle"]


def _padding_source(cfg: FLenQAConfig, data_dir: str | Path | None) -> dict | None:
    """Name and sha256 of the file "different" padding reads (None when it is not used)."""
    if "different" not in cfg.paddings:
        return None

    path = padding_source_file(data_dir)
    return {"file": f"mdqa/qa_data/{path.name}", "sha256": file_sha256(path)}


def flenqa_stats(records: Sequence[FLenQARecord]) -> list[dict]:
    """Per task and length: records, share of True labels, and measured mixin tokens (regenerated data)."""
    groups: dict[tuple, list[FLenQARecord]] = {}
    for r in records:
        groups.setdefault((r.task, r.ctx_size), []).append(r)
    rows = []
    for (task, size), items in sorted(groups.items(), key=lambda kv: (FLENQA_TASKS.index(kv[0][0]), kv[0][1])):
        tokens = [r.n_tokens for r in items if r.n_tokens is not None]
        row = {"task": task, "ctx_size": size, "records": len(items), "problems": len({r.problem_id for r in items}),
               "true_share": round(sum(r.label for r in items) / len(items), 4)}
        if tokens:
            row.update({"tokens_min": min(tokens), "tokens_mean": round(statistics.fmean(tokens), 1),
                        "tokens_max": max(tokens), "max_abs_error": max(abs(t - size) for t in tokens)})
        rows.append(row)
    return rows


def write_flenqa(records: Sequence[FLenQARecord], out_dir: str | Path, identity: dict) -> Path:
    """Write `flenqa.jsonl` (one record a line, fixed serialisation: byte-identical for the same records),
    `config.json` (`identity`: the config and padding source that made them) and `stats.json`."""

    out_dir = Path(out_dir)
    text = "".join(json.dumps(record_to_json(r), ensure_ascii=True) + "\n" for r in records)
    atomic_write_text(out_dir / FLENQA_FILE, text)
    atomic_write_text(out_dir / "stats.json", dumps_json(flenqa_stats(records)))
    atomic_write_text(out_dir / "config.json", dumps_json(identity))
    return out_dir / FLENQA_FILE


def read_flenqa(out_dir: str | Path) -> list[FLenQARecord]:
    """The records `write_flenqa` wrote; a malformed line raises FLenQAFormatError naming `file:line`."""

    path = Path(out_dir) / FLENQA_FILE
    records = []
    for lineno, data in read_jsonl_records(path)[0]:
        try:
            records.append(record_from_json(data))
        except ValueError as exc:
            raise FLenQAFormatError(f"{path}:{lineno}: {exc}") from None
    return records


def ensure_flenqa(cfg: FLenQAConfig, out_dir: str | Path, data_dir: str | Path | None = None,
                  progress: bool = False) -> list[FLenQARecord]:
    """The regenerated records of `cfg` in `out_dir`: read back when it already holds them for this exact
    config and padding source, else generated and written (deterministic, so both give the same bytes)."""
    out_dir = Path(out_dir)
    identity = {"config": to_mapping(cfg), "padding_source": _padding_source(cfg, data_dir), "source": "regenerated"}
    config_file = out_dir / "config.json"
    if config_file.is_file() and (out_dir / FLENQA_FILE).is_file():
        if json.loads(config_file.read_text(encoding="utf-8")) == identity:
            return read_flenqa(out_dir)
    records = generate_flenqa(cfg, data_dir=data_dir, progress=progress)
    write_flenqa(records, out_dir, identity)
    return records


def select_records(records: Sequence[FLenQARecord], cfg: FLenQAConfig,
                   problems_per_task: int | None = None) -> list[FLenQARecord]:
    """The records (e.g. of the official release) in cfg's tasks, lengths, paddings and dispersions; with
    `problems_per_task`, only the first that many problems of each task (file order)."""
    keep = [r for r in records if r.task in cfg.tasks and r.ctx_size in cfg.lengths and r.padding in cfg.paddings
            and (r.dispersion in cfg.dispersions or r.dispersion == REPEATED)]
    if problems_per_task is None:
        return keep
    first: dict[str, list[str]] = {}
    for r in keep:
        ids = first.setdefault(r.task, [])
        if r.problem_id not in ids and len(ids) < problems_per_task:
            ids.append(r.problem_id)
    allowed = {pid for ids in first.values() for pid in ids}
    return [r for r in keep if r.problem_id in allowed]


# ---------------------------------------------------------------- prompts and scores


def build_prompt(record: FLenQARecord, style: str = "normal") -> str:
    """The authors' prompt for the record's task, normal ("answer only True or False") or chain-of-thought."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {list(STYLES)}, got {style!r}")
    if not isinstance(record, FLenQARecord):
        raise TypeError(f"build_prompt needs a FLenQARecord, got {type(record).__name__}")
    template = load_template(f"flenqa_{TASK_SLUGS[record.task]}.{'prompt' if style == 'normal' else 'cot'}")
    return template.format(question=record.question, mixin=record.mixin, rule=record.rule or "")


def build_requests(records: Sequence[FLenQARecord], style: str) -> list[list[dict]]:
    """One chat request (the whole prompt as the user turn, as the authors send it) per record."""
    return [[{"role": "user", "content": build_prompt(r, style)}] for r in records]


def score_answer(record: FLenQARecord, answer: str | None) -> dict:
    """The `parsed` verdict and whether it is `correct`. An unparseable reply (no verdict) is flagged and
    scored wrong (the authors' "other/refused"); an over-length prompt (answer None: it did not fit the
    model) is flagged and not scored (`correct` None), as everywhere in kvlib.engine.evaluate."""

    if answer is None:
        return {"response": None, "parsed": None, "over_length": True, "unparseable": False, "correct": None}
    parsed = parse_true_false(answer)
    return {"response": answer, "parsed": parsed, "over_length": False, "unparseable": parsed is None,
            "correct": parsed is not None and parsed == record.label}


def result_rows(records: Sequence[FLenQARecord], answers: Sequence[str | None], style: str, model: str,
                fields: dict | None = None) -> list[dict]:
    """One scored row per record (plus `fields`, e.g. kvlib.engine.evaluate.result_fields)."""
    if len(records) != len(answers):
        raise ValueError(f"{len(records)} records but {len(answers)} answers")
    return [{"model": model, "style": style, "id": r.id, "problem_id": r.problem_id, "task": r.task,
             "ctx_size": r.ctx_size, "padding": r.padding, "dispersion": r.dispersion, "label": r.label,
             "n_tokens": r.n_tokens, "source": r.source, **score_answer(r, a), **(fields or {})}
            for r, a in zip(records, answers)]


def accuracy_table(rows: Sequence[dict], by: list[str], seed: int = 0) -> list[dict]:
    """Per group: `n` items, `n_over_length` (not scored) and `n_unparseable` (scored wrong), and accuracy
    over the scored items with a 95% CI (Wilson; kvlib.engine.evaluate.summarize). Rows are ordered by model
    (first appearance), style, task and length."""

    over = {tuple(c[k] for k in by): c["n_over_length"] for c in count_over_length(list(rows), by)}
    unparseable = {key: sum(bool(r["unparseable"]) for r in items) for key, items in group_rows(rows, by).items()}
    out = []
    for s in summarize(list(rows), by, ["correct"], seed=seed):
        key = tuple(s[k] for k in by)
        out.append({**{k: s[k] for k in by}, "n": s["n"], "n_over_length": over[key], "n_unparseable": unparseable[key],
                    "accuracy": s["correct"], "accuracy_ci_low": s["correct_ci_low"],
                    "accuracy_ci_high": s["correct_ci_high"]})
    first_seen = {m: i for i, m in enumerate(dict.fromkeys(r.get("model") for r in rows))}

    def order(row: dict) -> tuple:
        return (first_seen.get(row.get("model"), 0), STYLES.index(row["style"]) if row.get("style") in STYLES else 0,
                FLENQA_TASKS.index(row["task"]) if row.get("task") in FLENQA_TASKS else -1, row.get("ctx_size", 0))

    return sorted(out, key=order)


def verdict_shares(rows: Sequence[dict], by: list[str]) -> list[dict]:
    """Per group: how often the model said True, False or nothing parseable (over the scored rows), beside how
    often the label is True. Labels are balanced, so a model that always gives one verdict scores 50%: this
    tells a model at chance that reasons from one that always agrees."""

    out = []
    for key, items in group_rows([r for r in rows if not r["over_length"]], by).items():
        n = len(items)
        out.append({**dict(zip(by, key)), "n": n,
                    "said_true": sum(r["parsed"] is True for r in items) / n,
                    "said_false": sum(r["parsed"] is False for r in items) / n,
                    "unparseable": sum(bool(r["unparseable"]) for r in items) / n,
                    "label_true": sum(r["label"] is True for r in items) / n})
    return out


def balanced_accuracy_table(rows: Sequence[dict], by: list[str]) -> list[dict]:
    """Per group of scored rows (over-length prompts left out): `n`, and the balanced accuracy (mean of the recall
    on True-labelled and on False-labelled prompts; an unparseable reply is wrong for both) with its 95% CI
    (kvlib.stats.balanced_accuracy_ci). Chance is `FLENQA_CHANCE` (0.5) for any model that always gives one verdict,
    whatever the balance of labels, which plain accuracy only has when labels are balanced. NaN where a group
    lacks one of the classes."""

    out = []
    for key, items in group_rows([r for r in rows if not r["over_length"]], by).items():
        labels, parsed = [bool(r["label"]) for r in items], [r["parsed"] for r in items]
        try:
            value, lo, hi = balanced_accuracy_ci(labels, parsed)
        except ValueError:
            value = lo = hi = float("nan")
        out.append({**dict(zip(by, key)), "n": len(items), "balanced_accuracy": value,
                    "balanced_accuracy_ci_low": lo, "balanced_accuracy_ci_high": hi})
    return out


# ---------------------------------------------------------------- notebook 04


