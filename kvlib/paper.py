"""The paper's published numbers: `params/paper_reference.yaml`, read and validated in one place.

Notebooks show these beside the reproduced numbers; they never feed a computation except as the "paper"
column of a comparison. Keys of `general_scores()` are "<model>: <finetuning>" (e.g. "Mistral-7B-Instruct-v0.1:
IN2"), scores are percent.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kvlib.config import ParamError, load_yaml

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "params" / "paper_reference.yaml"
BENCHMARKS = ("mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open")  # kvlib.general.TASKS names
SECTIONS = ("paper", "general_benchmarks", "claims", "training", "not_published")


@dataclass(frozen=True)
class PaperReference:
    paper: str
    general_benchmarks: tuple[dict, ...]  # {model, finetuning, source, scores: {benchmark: percent}}
    claims: dict[str, dict]  # id -> {source, unit, text, value | range}
    training: dict[str, dict]
    not_published: tuple[str, ...]

    def general_scores(self) -> dict[str, dict[str, float]]:
        return {f"{r['model']}: {r['finetuning']}": dict(r["scores"]) for r in self.general_benchmarks}

    def claim(self, claim_id: str) -> dict:
        if claim_id not in self.claims:
            raise KeyError(f"unknown paper claim {claim_id!r}; known: {', '.join(self.claims)}")
        return self.claims[claim_id]


def _need(cond: bool, where: str, message: str) -> None:
    if not cond:
        raise ParamError(f"{where}: {message}")


def _check_row(i: int, row: Any, path: Path) -> dict:
    where = f"{path.name}: general_benchmarks[{i}]"
    _need(isinstance(row, Mapping), where, f"expected a mapping, got {row!r}")
    missing = {"model", "finetuning", "source", "scores"} - set(row)
    _need(not missing, where, f"missing {sorted(missing)}")
    scores = row["scores"]
    _need(isinstance(scores, Mapping) and scores, f"{where}.scores", "expected a non-empty mapping")
    for name, value in scores.items():
        _need(name in BENCHMARKS, f"{where}.scores.{name}", f"unknown benchmark; known: {', '.join(BENCHMARKS)}")
        _need(isinstance(value, (int, float)) and 0 <= value <= 100, f"{where}.scores.{name}",
              f"expected a percentage in [0, 100], got {value!r}")
    return {**row, "scores": {k: float(v) for k, v in scores.items()}}


def _check_claim(i: int, claim: Any, path: Path) -> dict:
    where = f"{path.name}: claims[{i}]"
    _need(isinstance(claim, Mapping), where, f"expected a mapping, got {claim!r}")
    missing = {"id", "source", "unit", "text"} - set(claim)
    _need(not missing, where, f"missing {sorted(missing)}")
    _need(("value" in claim) != ("range" in claim), where, "needs exactly one of value or range")
    if "range" in claim:
        lo_hi = claim["range"]
        _need(isinstance(lo_hi, list) and len(lo_hi) == 2 and lo_hi[0] <= lo_hi[1], f"{where}.range",
              f"expected [low, high], got {lo_hi!r}")
    return dict(claim)


@functools.lru_cache(maxsize=4)
def load(path: str | Path | None = None) -> PaperReference:
    """Read and validate the reference file (default: the repository's params/paper_reference.yaml)."""
    path = Path(path) if path is not None else DEFAULT_PATH
    if not path.is_file():
        raise ParamError(f"paper reference: {path} not found (it ships in the repository's params/)")
    data = load_yaml(path)
    _need(isinstance(data, Mapping), path.name, "expected a mapping at the top level")
    unknown = set(data) - set(SECTIONS)
    _need(not unknown, path.name, f"unknown sections {sorted(unknown)}; known: {', '.join(SECTIONS)}")
    rows = tuple(_check_row(i, r, path) for i, r in enumerate(data.get("general_benchmarks") or []))
    keys = [f"{r['model']}: {r['finetuning']}" for r in rows]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    _need(not dup, f"{path.name}: general_benchmarks", f"duplicate model/finetuning rows {dup}")
    claims = [_check_claim(i, c, path) for i, c in enumerate(data.get("claims") or [])]
    ids = [c["id"] for c in claims]
    _need(len(set(ids)) == len(ids), f"{path.name}: claims", "claim ids must be unique")
    return PaperReference(paper=str(data.get("paper", "")), general_benchmarks=rows,
                          claims={c["id"]: c for c in claims}, training=dict(data.get("training") or {}),
                          not_published=tuple(data.get("not_published") or ()))


def general_table(titles: Mapping[str, str] | None = None):
    """The published general-benchmark scores as a DataFrame (percent), one row per model and finetuning,
    with the table each row is printed in; `titles` renames benchmark columns (e.g. kvlib.general's)."""
    import pandas as pd

    titles = titles or {}
    return pd.DataFrame([{"model": r["model"], "finetuning": r["finetuning"],
                          **{titles.get(b, b): r["scores"].get(b) for b in BENCHMARKS}, "source": r["source"]}
                         for r in load().general_benchmarks])


def claims_table():
    """The paper's numeric claims outside the tables, as printed (both TriviaQA ranges, unreconciled)."""
    import pandas as pd

    return pd.DataFrame([{"id": c["id"], "source": c["source"], "claim": c["text"],
                          "published": c.get("value", c.get("range")), "unit": c["unit"]}
                         for c in load().claims.values()])
