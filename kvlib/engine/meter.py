"""What the work of a process cost, recorded by the code that does it, so that the next run's wall time can be
predicted from rates measured on this machine (kvlib.pipeline.planner).

A record is one backend call or one training session (`Work`, added with `Work.done`): how many prompts it had
and how many of them the response cache answered (they cost nothing and are counted as such), their prompt tokens
and new-token budgets, and per part of the work -- `prefill` (prompt tokens actually computed: after prefix
reuse, with the padding a batch computes), `decode` (new tokens, one per row per step) and `train` (sequence tokens,
forward and backward) -- its tokens, its attention pairs (every computed token attends to each position up to its
own: the work that grows with length; `attention_pairs`) and, where the code can time the part alone, its seconds.
Every record has its total seconds. Records are tagged with their numerics (evaluation dtype or training precision),
device, machine (`machine`) and model size (parameters), so rates are never mixed across them.

`point_at(path)` (kvlib.pipeline.notebooks.start: <results_dir>/<notebook>/cost.json) makes every later record
rewrite that file atomically, so it is published with the notebook's other outputs and each run refreshes it.
`fit_rates` fits seconds = per_token x tokens + per_attention x attention pairs for each part, by non-negative
least squares over a group of records (scipy.optimize.nnls).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from kvlib.engine.io import atomic_write_text, dumps_json

COST_FILE = "cost.json"
PARTS = ("prefill", "decode", "train")  # the kinds of compute a rate is fitted for
FEATURES = ("tokens", "attention")  # what each part's seconds are fitted on
# the tags records must share to be fitted together (with training apart from evaluation: `rate_key`)
RATE_TAGS = ("backend", "numerics", "device", "machine", "parameters", "method")

_LOCK = threading.Lock()  # a backend may answer from worker threads (the OpenAI-compatible one)
_target: Path | None = None
_records: list[dict] = []


def point_at(path: str | Path | None) -> None:
    """Keep the records from now on in `path` (cost.json, rewritten atomically after each record; an earlier
    target's records are dropped); None: keep none."""
    global _target
    with _LOCK:
        _target = None if path is None else Path(path)
        _records.clear()
        if _target is not None:
            _write()


def _write() -> None:
    atomic_write_text(_target, dumps_json({"records": _records}))


def read_records(path: str | Path) -> list[dict]:
    """The records of a cost.json ([] when there is none)."""
    path = Path(path)
    if not path.is_file():
        return []
    return list(json.loads(path.read_text(encoding="utf-8")).get("records", []))


def rate_key(kind: str, tags: Mapping[str, Any]) -> tuple:
    """What records (and planned work) must share to be fitted together: training or evaluation, and every
    RATE_TAGS tag (numerics, device, machine, model size, ...)."""
    return ("train" if kind == "train" else "eval", *(tags.get(t) for t in RATE_TAGS))


def attention_pairs(start: int, end: int) -> int:
    """Attention pairs of computing positions start+1..end of a sequence (1-based), each attending to every
    position up to its own: a prompt of length L prefilled from scratch costs L(L+1)/2, after a reused prefix of
    p tokens L(L+1)/2 - p(p+1)/2."""
    return (end * (end + 1) - start * (start + 1)) // 2


@functools.lru_cache(maxsize=8)
def machine(device: str = "cpu") -> str:
    """The kind of machine a record ran on, without anything that names this host: a CUDA device's name, or the
    CPU's model with the cores this process may use ("cpu: Intel(R) Xeon(R) ... x 2 cores")."""
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():  # an engine that manages its own GPU (vLLM) where torch sees none
            return "cuda: unknown device"
        index = torch.device(device).index or 0
        return f"cuda: {torch.cuda.get_device_name(index)}"
    model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = " ".join(value.split())
                break
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {model or platform.machine() or 'unknown'} x {cores} cores"


@dataclass
class Work:
    """The counters of one backend call or training session; `done()` adds it as a record. `kind`: "generate",
    "loglikelihood" or "train"; `tags`: numerics, device, machine and model size (see the module docstring)."""

    kind: str
    tags: dict
    prompts: int = 0
    cached: int = 0  # prompts the response cache answered: no compute
    prompt_tokens: int = 0
    budget_tokens: int = 0  # new tokens the prompts were allowed (prompts x max_new_tokens)
    parts: dict = field(default_factory=dict)  # part -> {"tokens", "attention"[, "seconds"]}
    started: float = field(default_factory=time.perf_counter)

    def add(self, part: str, tokens: int, attention: int) -> None:
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        counts = self.parts.setdefault(part, {"tokens": 0, "attention": 0})
        counts["tokens"] += int(tokens)
        counts["attention"] += int(attention)

    @contextlib.contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Count the seconds of the block as `part`'s own (a part timed alone is fitted on its own seconds)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            counts = self.parts.setdefault(part, {"tokens": 0, "attention": 0})
            counts["seconds"] = counts.get("seconds", 0.0) + time.perf_counter() - start

    def record(self) -> dict:
        parts = {p: {k: round(v, 6) if isinstance(v, float) else v for k, v in c.items()}
                 for p, c in self.parts.items()}
        return {"kind": self.kind, "tags": dict(self.tags), "prompts": self.prompts, "cached": self.cached,
                "prompt_tokens": self.prompt_tokens, "budget_tokens": self.budget_tokens, "parts": parts,
                "seconds": round(time.perf_counter() - self.started, 6)}

    def done(self) -> dict:
        """Add this work as a record (written to the target of `point_at`, if any); returns the record."""
        record = self.record()
        with _LOCK:
            if _target is not None:
                _records.append(record)
                _write()
        return record


def cached(kind: str, tags: Mapping[str, Any], prompts: int) -> None:
    """Record `prompts` answered by the response cache: counted, at no cost."""
    if prompts:
        Work(kind, dict(tags), prompts=prompts, cached=prompts).done()


# ------------------------------------------------------------------------------------------------ rates


@dataclass(frozen=True)
class Rates:
    """Seconds per token and per attention pair of each part fitted from `records` records (parts absent from them
    have no rate)."""

    per_token: dict[str, float]
    per_attention: dict[str, float]
    records: int

    def seconds(self, part: str, tokens: float, attention: float) -> float:
        return self.per_token[part] * tokens + self.per_attention[part] * attention


def _rows(records: Iterable[Mapping[str, Any]]) -> list[tuple[dict, float]]:
    """(features {(part, feature): value}, seconds) for the least-squares fit: a part timed alone is a row of its
    own; the parts of a record that were not timed alone share one row with the seconds left of its total."""
    rows = []
    for r in records:
        parts = r.get("parts") or {}
        untimed, left = {}, float(r.get("seconds") or 0.0)
        for part, counts in parts.items():
            features = {(part, f): float(counts.get(f) or 0) for f in FEATURES}
            if "seconds" in counts:
                rows.append((features, float(counts["seconds"])))
                left -= float(counts["seconds"])
            else:
                untimed.update(features)
        if untimed and any(untimed.values()):
            rows.append((untimed, max(left, 0.0)))
    return [(f, s) for f, s in rows if any(f.values())]


def fit_rates(records: Sequence[Mapping[str, Any]]) -> Rates | None:
    """Non-negative least squares (scipy.optimize.nnls) of seconds on tokens and attention pairs per part, over
    records of one kind of machine and numerics; None when they hold no computed work (only cache hits)."""
    from scipy.optimize import nnls

    rows = _rows(records)
    if not rows:
        return None
    columns = sorted({key for features, _ in rows for key, value in features.items()})
    a = np.array([[features.get(c, 0.0) for c in columns] for features, _ in rows], dtype=float)
    b = np.array([s for _, s in rows], dtype=float)
    scale = a.max(axis=0)
    scale[scale == 0] = 1.0
    solution, _ = nnls(a / scale, b)
    coef = dict(zip(columns, solution / scale))
    parts = sorted({part for part, _ in columns})
    return Rates({p: float(coef.get((p, "tokens"), 0.0)) for p in parts},
                 {p: float(coef.get((p, "attention"), 0.0)) for p in parts}, len(list(records)))
