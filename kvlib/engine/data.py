"""Where evaluation and source data live. kvlib never ships data: it reads a data directory laid out
like the official releases (see README "Data"). Loaders for each benchmark live here too."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "KVLIB_DATA_DIR"
# A checkout of this repo next to a `shared/` folder (this project's CI layout) finds its data there.
_SIBLING = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: `explicit`, else $KVLIB_DATA_DIR, else ../shared/data beside the repo."""
    for source, candidate in (("argument", explicit), (DATA_ENV, os.environ.get(DATA_ENV))):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"data directory from {source} does not exist: {path}")
            return path
    if _SIBLING.is_dir():
        return _SIBLING
    raise FileNotFoundError(
        f"no data directory: pass one, set ${DATA_ENV}, or place the data at {_SIBLING}. "
        "README.md, section 'Data', lists where to download each official file."
    )


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


def _require(path: Path, source: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing MDQA file {path}; official source: {source}")
    return path


def mdqa_paths(data_dir: str | Path | None = None) -> dict:
    """The MDQA files this project's data directory holds (layout of <data>/mdqa/SOURCE.md):
    `oracle` (LitM qa_data/nq-open-oracle.jsonl.gz, 2655 questions), `subset_20docs` ({gold position:
    path} of the 441-question 20-document copies) and `partial_copy` (the truncated ViktorTorp file).
    Raises FileNotFoundError naming each missing file and where to get it."""
    root = resolve_data_dir(data_dir) / "mdqa"
    subset = "nq-open-20_total_documents_gold_at_{}.first441.jsonl.gz"
    return {
        "oracle": _require(root / "qa_data" / "nq-open-oracle.jsonl.gz",
                           f"{LITM_REPO} (qa_data/nq-open-oracle.jsonl.gz)"),
        "subset_20docs": {
            pos: _require(root / "derived_20docs_first441" / subset.format(pos),
                          f"built from the partial copy, recipe in {root / 'SOURCE.md'}")
            for pos in MDQA_SUBSET_POSITIONS
        },
        "partial_copy": _require(root / _PARTIAL_COPY,
                                 f"{VIKTORTORP_REPO} (qa_predictions/20_total_documents/gpt_reordered/)"),
    }


def mdqa_official_path(num_documents: int, gold_index: int, data_dir: str | Path | None = None) -> Path:
    """An official complete LitM K-document file, at LitM's own layout under <data>/mdqa/qa_data/."""
    if isinstance(num_documents, bool) or not isinstance(num_documents, int) or num_documents < 2:
        raise ValueError(f"num_documents must be an integer >= 2, got {num_documents!r}")
    if isinstance(gold_index, bool) or not isinstance(gold_index, int) or not 0 <= gold_index < num_documents:
        raise ValueError(f"gold_index must be in [0, {num_documents}), got {gold_index!r}")
    name = f"{num_documents}_total_documents/nq-open-{num_documents}_total_documents_gold_at_{gold_index}.jsonl.gz"
    return _require(resolve_data_dir(data_dir) / "mdqa" / "qa_data" / name, f"{LITM_REPO} (qa_data/{name})")


def mdqa_random_documents_path(data_dir: str | Path | None = None) -> Path:
    """LitM's questions with randomly sampled DPR passages (LitM issue #11), if downloaded."""
    return _require(resolve_data_dir(data_dir) / "mdqa" / "nq-open-random-documents.jsonl.gz", LITM_RANDOM_URL)


def read_jsonl(path: str | Path) -> list:
    """Every JSON value of a (gzip or plain) JSONL file; a malformed line raises naming `path:line`."""
    return [value for _, value in read_jsonl_records(path)[0]]
