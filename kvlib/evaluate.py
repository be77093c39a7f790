"""Running evaluations: a backend answers a task's prompts, kvlib.scoring scores them, and the result is
one row per item (so every table and CI is computed from the same rows)."""
from __future__ import annotations

from typing import Sequence

from kvlib.generate import Sample
from kvlib.scoring import score_kv_answer


def evaluate_kv(backend, samples: Sequence[Sample], max_new_tokens: int, label: str) -> list[dict]:
    """Answer synthetic key-value prompts (user turn only, as in training) and score each answer.
    Over-length prompts are never skipped: the backend raises, naming them."""
    requests = [[{"role": "user", "content": s.prompt}] for s in samples]
    answers = backend.generate(requests, max_new_tokens=max_new_tokens)
    rows = []
    for s, answer in zip(samples, answers):
        scores = score_kv_answer(answer, s.meta)
        rows.append({"model": label, "id": s.meta["id"], "task": s.meta["task"], "template": s.meta["template"],
                     "gold_position": s.meta["gold_position"], "n_tokens": s.meta["n_tokens"],
                     "response": answer, **scores})
    return rows


def summarize(rows: list[dict], by: list[str], metrics: list[str], seed: int = 0) -> list[dict]:
    """Mean and bootstrap 95% CI of each metric per group of rows (one row per item in, one per group out)."""
    from kvlib.scoring import bootstrap_ci

    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    out = []
    for key, items in groups.items():
        row = dict(zip(by, key), n=len(items))
        for m in metrics:
            mean, lo, hi = bootstrap_ci([float(i[m]) for i in items], seed=seed)
            row.update({m: mean, f"{m}_ci_low": lo, f"{m}_ci_high": hi})
        out.append(row)
    return out
