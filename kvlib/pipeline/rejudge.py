"""Re-judging a notebook's claims from its committed item files with the current statistics (no model is run),
so a change of method can be applied to results that took hours to compute; nothing is written."""
from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from kvlib.engine import evaluate
from kvlib.engine.config import from_mapping, load_yaml
from kvlib.pipeline import baselines_study as study
from kvlib.pipeline.notebooks import FinetuneNotebookParams, synthetic_models
from kvlib.report.paper import (
    equivalence_margin,
    flenqa_claims,
    general_claims,
    longer_context_claims,
    mdqa_claims,
    token_loss_claims,
)
from kvlib.tasks import general, mdqa
from kvlib.tasks.mdqa import SETTING_RANDOM, SETTING_RETRIEVED

ITEM_FILES = {
    "02_finetune": ("token_loss.csv",),
    "03_mdqa": ("mdqa_items.csv",),
    "04_flenqa": ("flenqa_items.csv",),
    "05_general_benchmarks": ("items.csv",),
    "06_baselines": ("mdqa_items.csv", "flenqa_items.csv", "general_items.csv"),
    "08_longer_context": ("mdqa_items.csv",),
}
_BOOL_COLUMNS = ("label", "parsed", "over_length", "unparseable", "correct", "template")


def read_items(path: str | Path) -> list[dict]:
    """An item-level CSV written by a notebook, as the row dicts it was written from: ids as text, empty cells
    None, "True"/"False" cells of the true/false columns as booleans (FLenQA `correct` stays a boolean, MDQA's a
    float)."""
    import pandas as pd

    frame = pd.read_csv(path, dtype={"id": str, "qid": str, "group": str}, low_memory=False)
    rows = frame.to_dict("records")
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float) and math.isnan(value):
                row[key] = None
            elif key in _BOOL_COLUMNS and isinstance(value, str) and value in ("True", "False"):
                row[key] = value == "True"
        if "group" in row and row["group"] is None:
            row["group"] = ""
    return rows


def notebook_params(notebook: str, profile: str, params_root: str | Path = "params") -> dict:
    """A notebook's params file of a profile (params/<profile>/<notebook>.yaml), models in their written order."""
    path = Path(params_root) / profile / f"{notebook}.yaml"
    data = load_yaml(path) if path.is_file() else {}
    return dict(data or {})


def _template_pairs(params: Mapping[str, Any], profile: str, params_root: str | Path, runs: Sequence[str]
                    ) -> list[tuple[str, str]]:
    """Notebook 02's (run with template, run without) pairs: from its params (kvlib.train), else by run name."""
    try:
        fields = {k: v for k, v in params.items() if k in {f for f in FinetuneNotebookParams.__dataclass_fields__}}
        P = from_mapping(FinetuneNotebookParams, {**fields, "profile": profile, "params_root": str(params_root)})
        return P.template_pairs()
    except Exception:  # noqa: BLE001 - the params may not validate offline: fall back to the run names
        return [(r, r.replace("-template-", "-notemplate-")) for r in runs
                if "-template-" in r and r.replace("-template-", "-notemplate-") in runs]


def rejudge_claims(notebook: str, results_dir: str | Path, params: Mapping[str, Any] | None = None,
                   params_root: str | Path = "params") -> list[dict]:
    """A notebook's claims table recomputed from the item-level files it committed (`ITEM_FILES`, under
    results_dir/<notebook>/) with the current intervals, chance checks and Holm adjustment, without running any
    model: the same calls the notebook makes after scoring. `params`: the notebook's params (default: read from
    params_root/<profile>/<notebook>.yaml, the profile being results_dir's folder name), for the models' order
    (the first is the baseline, as in the notebooks), seed groups and baselines. Nothing is written."""


    if notebook not in ITEM_FILES:
        raise ValueError(f"no claims to re-judge for {notebook!r}; notebooks with claims: {', '.join(ITEM_FILES)}")
    results_dir = Path(results_dir)
    profile = results_dir.name
    params = dict(notebook_params(notebook, profile, params_root) if params is None else params)
    folder = results_dir / notebook
    missing = [f for f in ITEM_FILES[notebook] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (has {notebook} run in this profile?)")
    items = {f: read_items(folder / f) for f in ITEM_FILES[notebook]}
    entries = dict(params.get("models") or {"original": {}})
    models = list(entries)
    groups = dict(params.get("seed_groups") or {})

    if notebook == "02_finetune":
        rows = items["token_loss.csv"]
        runs = list(dict.fromkeys(r["run"] for r in rows))
        return token_loss_claims(rows, _template_pairs(params, profile, params_root, runs))

    if notebook in ("03_mdqa", "08_longer_context"):
        rows = items["mdqa_items.csv"]
        base = models[0]
        pooled, _ = mdqa.mdqa_pooled_deltas(rows, base, groups, margin=equivalence_margin())
        compared = synthetic_models(entries, base, groups)  # other models are reported, not judged
        if notebook == "08_longer_context":
            return longer_context_claims(pooled, compared, int(params.get("num_documents", rows[0]["num_documents"])))

        return mdqa_claims(pooled, compared, SETTING_RANDOM, SETTING_RETRIEVED)

    if notebook == "04_flenqa":
        rows = items["flenqa_items.csv"]
        base = models[0]
        pooled = evaluate.paired_deltas(rows, base, ["style"], "correct", "id", margin=equivalence_margin())
        if groups:
            pooled = evaluate.with_seed_groups(
                pooled, evaluate.seed_group_deltas(rows, base, groups, ["style"], "correct", "id", margin=equivalence_margin()), groups)
        return flenqa_claims(pooled, synthetic_models(entries, base, groups), rows)


    if notebook == "05_general_benchmarks":
        rows = items["items.csv"]
        baseline = params.get("baseline", "original")
        n_boot, seed = int(params.get("n_boot", 2000)), int(params.get("seed", 0))
        deltas = general.benchmark_deltas(rows, baseline, n_boot, seed, margin=equivalence_margin())
        if groups:
            deltas = evaluate.with_seed_groups(
                deltas, general.benchmark_seed_group_deltas(rows, baseline, groups, seed, margin=equivalence_margin()), groups)
        return general_claims(deltas, synthetic_models(entries, baseline, groups),
                              {name: spec.headline for name, spec in general.TASKS.items()},
                              {name: spec.title for name, spec in general.TASKS.items()})


    original = params.get("original", "original")
    P = SimpleNamespace(models=params.get("models") or {original: {}}, original=original,
                        baselines=params.get("baselines") or {})
    mdqa_rows, flenqa_rows = items["mdqa_items.csv"], items["flenqa_items.csv"]
    mdqa_deltas = evaluate.paired_deltas(mdqa.mdqa_question_means(mdqa_rows), original, ["setting"], "correct",
                                         "qid", margin=equivalence_margin())
    flenqa_deltas = evaluate.paired_deltas(flenqa_rows, original, ["style"], "correct", "id", margin=equivalence_margin())
    general_deltas = general.benchmark_deltas(items["general_items.csv"], original, margin=equivalence_margin())
    return study.claims(P, mdqa_deltas, flenqa_deltas, general_deltas, flenqa_rows=flenqa_rows)


def compare_claims(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Old and new verdicts side by side, matched on (artifact, claim, model): one row per claim of either table,
    with the old CI and verdict, and the new CI, p-values and verdict (a claim only one table has gets blanks)."""
    key = ("artifact", "claim", "model")
    before = {tuple(r[k] for k in key): r for r in old}
    after = {tuple(r[k] for k in key): r for r in new}
    out = []
    for k in dict.fromkeys([*before, *after]):
        o, n = before.get(k, {}), after.get(k, {})
        out.append({**dict(zip(key, k)), "old_ci": o.get("ci", ""), "old_verdict": o.get("verdict", ""),
                    "new_ci": n.get("ci", ""), "p_value": n.get("p_value"), "p_holm": n.get("p_holm"),
                    "family_size": n.get("family_size"), "new_verdict": n.get("verdict", "")})
    return out
