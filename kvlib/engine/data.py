"""Where evaluation and source data live. kvlib never ships data: it reads a data directory laid out
like the official releases (kvlib/engine/datasets.yaml, the data registry, says what goes where; `kvlib data fetch`
fills it). Loaders for each benchmark live here too."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "KVLIB_DATA_DIR"
# A checkout of this repo next to a `shared/` folder (this project's CI layout) finds its data there.
_SIBLING = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# Otherwise `kvlib data fetch` fills data/ inside the checkout (git-ignored).
_REPO_DATA = Path(__file__).resolve().parents[2] / "data"


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: `explicit`, else $KVLIB_DATA_DIR, else ../shared/data beside the repo, else data/ in
    the checkout (where `kvlib data fetch` puts the data when none of the others is given)."""
    for source, candidate in (("argument", explicit), (DATA_ENV, os.environ.get(DATA_ENV))):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"data directory from {source} does not exist: {path}")
            return path
    for default in (_SIBLING, _REPO_DATA):
        if default.is_dir():
            return default
    raise FileNotFoundError(
        f"no data directory: pass one, set ${DATA_ENV}, or place the data at {_SIBLING}. "
        "`kvlib data fetch` downloads it (README.md, section 'Data', lists every file and its source)."
    )


def data_dir_for_writing(explicit: str | Path | None = None) -> Path:
    """Where `kvlib data fetch` installs files: `explicit`, else $KVLIB_DATA_DIR, else the data directory
    resolve_data_dir finds, else data/ in the checkout; created when missing."""
    candidate = explicit or os.environ.get(DATA_ENV)
    if candidate:
        path = Path(candidate).expanduser()
    else:
        try:
            path = resolve_data_dir()
        except FileNotFoundError:
            path = _REPO_DATA
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------- JSONL files (plain or gzip)

import gzip
import json
from dataclasses import dataclass
from typing import Any, Literal

OnTruncated = Literal["raise", "stop"]


@dataclass(frozen=True)
class JsonlReport:
    """What reading one JSONL file found. `truncated_line` is the 1-based number of a final line that was
    cut off (and dropped, in on_truncated="stop" mode); None when the file ended cleanly."""

    path: str
    records: int
    truncated_line: int | None = None
    blank_lines: int = 0

    @property
    def truncated(self) -> bool:
        return self.truncated_line is not None

    def summary(self) -> str:
        text = f"{self.path}: {self.records} records read"
        if self.truncated:
            text += f"; line {self.truncated_line} was truncated and dropped"
        return text


def _is_gzip(path: Path) -> bool:
    # by content, not by suffix: a renamed .gz (or a plain file named .gz) still reads correctly
    with path.open("rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _lines(path: Path):
    """(line number, text) of every line, transparently gunzipped. A gzip stream that ends early raises
    EOFError after the last whole line, which the caller treats as truncation."""
    opener = gzip.open if _is_gzip(path) else open
    with opener(path, "rt", encoding="utf-8") as fh:
        yield from enumerate(fh, 1)


def read_jsonl_records(
    path: str | Path, on_truncated: OnTruncated = "raise"
) -> tuple[list[tuple[int, Any]], JsonlReport]:
    """(line number, value) of every JSON line of `path` (gzip or plain), and a report. The line numbers
    let a caller that validates the values name the offending `path:line`.

    A line that is not valid JSON raises ValueError naming `path:line`, except a broken *final* line
    (an upload cut short) when on_truncated="stop": then reading stops there and the report says so.
    A broken line followed by more lines is corruption, never truncation, and always raises.
    """
    if on_truncated not in ("raise", "stop"):
        raise ValueError(f"on_truncated must be 'raise' or 'stop', got {on_truncated!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file not found: {path}")
    rows: list = []
    blank = 0
    broken: tuple[int, str] | None = None  # (line, reason) of a line that failed to parse
    lineno = 0
    try:
        for lineno, line in _lines(path):
            if broken is not None:  # a line after the broken one: it was not the last line
                if line.strip():
                    raise ValueError(f"{path}:{broken[0]}: malformed JSON line ({broken[1]})")
                blank += 1
                continue
            if not line.strip():
                blank += 1
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as exc:
                broken = (lineno, exc.msg)
    except (EOFError, gzip.BadGzipFile) as exc:  # compressed stream cut short: the next line is lost
        broken = broken or (lineno + 1, f"gzip stream ends early: {exc}")
    if broken is not None:
        if on_truncated == "raise":
            raise ValueError(
                f"{path}:{broken[0]}: truncated final line ({broken[1]}); {len(rows)} complete records "
                "precede it. Pass on_truncated='stop' to keep them."
            )
        return rows, JsonlReport(str(path), len(rows), truncated_line=broken[0], blank_lines=blank)
    return rows, JsonlReport(str(path), len(rows), blank_lines=blank)


# ---------------------------------------------------------------- MDQA ("Lost in the Middle") files

LITM_REPO = "https://github.com/nelson-liu/lost-in-the-middle"
LITM_RANDOM_URL = "https://nlp.stanford.edu/data/nfliu/lost-in-the-middle/nq-open-random-documents.jsonl.gz"
VIKTORTORP_REPO = "https://github.com/ViktorTorp/lost-in-the-middle"
MDQA_SUBSET_POSITIONS = (0, 4, 9, 14, 19)  # the 20-document gold positions of the paper and of LitM
_PARTIAL_COPY = ("partial_copy_ViktorTorp/nq-open-20_total_documents_gold_at_0-gpt-35-reorder-"
                 "predictions-scored.jsonl.gz")


MDQA_QUESTIONS = 2655  # the LitM oracle file and every complete K-document file
_OFFICIAL_20DOCS = "qa_data/20_total_documents/nq-open-20_total_documents_gold_at_{}.jsonl.gz"
_SUBSET_20DOCS = "derived_20docs_first441/nq-open-20_total_documents_gold_at_{}.first441.jsonl.gz"
MDQA_SUBSET_QUESTIONS = 441  # the first 441 questions: what the offline data directory holds


def _require(path: Path, source: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing MDQA file {path}; official source: {source}")
    return path


def mdqa_paths(data_dir: str | Path | None = None) -> dict:
    """The MDQA files of the data directory (layout: kvlib/engine/datasets.yaml, entries mdqa-*):
    - `oracle`: LitM qa_data/nq-open-oracle.jsonl.gz (2655 questions);
    - `retrieved_20docs`: {gold position: path} of the 20-document files with retrieved distractors: the
      official LitM files (qa_data/20_total_documents/, all 2655 questions) when the gold-at-0 one is present,
      else the 441-question subset (derived_20docs_first441/). Only position 0 is required (kvlib moves the
      gold itself); the other positions are listed when present. `retrieved_20docs_source` ("official" or
      "subset") and `retrieved_20docs_questions` (2655 or 441) say which; `subset_20docs` is the same dict
      (its older name);
    - `random_documents`: LitM's nq-open-random-documents.jsonl.gz, or None;
    - `partial_copy`: the truncated third-party prediction file the subset was rebuilt from, or None.
    Raises FileNotFoundError naming each missing file, where to get it and the command that fetches it."""
    root = resolve_data_dir(data_dir) / "mdqa"
    oracle = _require(root / "qa_data" / "nq-open-oracle.jsonl.gz",
                      f"{LITM_REPO} (qa_data/nq-open-oracle.jsonl.gz); fetch: kvlib data fetch mdqa-oracle")
    official = {pos: root / _OFFICIAL_20DOCS.format(pos) for pos in MDQA_SUBSET_POSITIONS}
    subset = {pos: root / _SUBSET_20DOCS.format(pos) for pos in MDQA_SUBSET_POSITIONS}
    if official[0].is_file():
        chosen, source, questions = official, "official", MDQA_QUESTIONS
    elif subset[0].is_file():
        chosen, source, questions = subset, "subset", MDQA_SUBSET_QUESTIONS
    else:
        raise FileNotFoundError(
            f"missing MDQA file {official[0]}; official source: {LITM_REPO} (qa_data/20_total_documents/); fetch: "
            f"kvlib data fetch mdqa-20docs (the {MDQA_SUBSET_QUESTIONS}-question subset {subset[0]} is accepted too)")
    retrieved = {pos: path for pos, path in chosen.items() if path.is_file()}
    random_documents = root / "nq-open-random-documents.jsonl.gz"
    partial = root / _PARTIAL_COPY
    return {
        "oracle": oracle,
        "retrieved_20docs": retrieved,
        "retrieved_20docs_source": source,
        "retrieved_20docs_questions": questions,
        "subset_20docs": retrieved,
        "random_documents": random_documents if random_documents.is_file() else None,
        "partial_copy": partial if partial.is_file() else None,
    }


def mdqa_official_path(num_documents: int, gold_index: int, data_dir: str | Path | None = None) -> Path:
    """An official complete LitM K-document file, at LitM's own layout under <data>/mdqa/qa_data/."""
    if isinstance(num_documents, bool) or not isinstance(num_documents, int) or num_documents < 2:
        raise ValueError(f"num_documents must be an integer >= 2, got {num_documents!r}")
    if isinstance(gold_index, bool) or not isinstance(gold_index, int) or not 0 <= gold_index < num_documents:
        raise ValueError(f"gold_index must be in [0, {num_documents}), got {gold_index!r}")
    name = f"{num_documents}_total_documents/nq-open-{num_documents}_total_documents_gold_at_{gold_index}.jsonl.gz"
    entry = f"mdqa-{num_documents}docs" + ("-positions" if num_documents == 20 and gold_index else "")
    fetch = f"; fetch: kvlib data fetch {entry}" if num_documents in (10, 20, 30) else ""
    return _require(resolve_data_dir(data_dir) / "mdqa" / "qa_data" / name, f"{LITM_REPO} (qa_data/{name}){fetch}")


def mdqa_random_documents_path(data_dir: str | Path | None = None) -> Path:
    """LitM's questions with randomly sampled DPR passages (LitM issue #11), if downloaded."""
    return _require(resolve_data_dir(data_dir) / "mdqa" / "nq-open-random-documents.jsonl.gz",
                    f"{LITM_RANDOM_URL}; fetch: kvlib data fetch mdqa-random")


def read_jsonl(path: str | Path) -> list:
    """Every JSON value of a (gzip or plain) JSONL file; a malformed line raises naming `path:line`."""
    return [value for _, value in read_jsonl_records(path)[0]]
