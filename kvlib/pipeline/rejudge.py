"""Re-judging a notebook's claims from its committed item files with the current statistics (no model is run),
so a change of method can be applied to results that took hours to compute (`rejudge_claims`, which writes
nothing), and the record of what is known about a profile's committed results without re-running them
(`build_record`, written to results/<profile>/rejudged.json by `kvlib rejudge --profile P --write`): per notebook,
the protocol changes its item files show it predates (`PROTOCOL_CHANGES`, detected from the recorded fields), and
its claims re-judged where the committed items still measure what the claim asks."""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

from kvlib.engine import evaluate
from kvlib.engine.config import from_mapping, load_yaml
from kvlib.engine.io import atomic_write_text, dumps_json, file_sha256
from kvlib.pipeline.manifest import load_manifest_entries
from kvlib.pipeline import baselines_study as study
from kvlib.pipeline.notebooks import FINETUNE, FinetuneNotebookParams
from kvlib.pipeline.runs import HELDOUT_FINETUNED, LearnedGate, committed_gate, not_learned_reason
from kvlib.report.paper import (
    HALF_WIDTH,
    MAX_HALF_WIDTH,
    ROLE,
    PrimaryClaim,
    artifact_verdict,
    claim_interval,
    equivalence_margin,
    flenqa_claims,
    general_claims,
    longer_context_claims,
    mark_not_tested,
    mdqa_claims,
    token_loss_claims,
    verdict_category,
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


def committed_params(notebook: str, results_dir: str | Path, params_root: str | Path = "params") -> dict:
    """The params a notebook's committed results were run with: its manifest entry's (the profile's params may have
    changed since, e.g. a new design waiting for its re-run, and the committed items answer only the old one), else
    the current params file. The manifest keeps mappings with sorted keys, so `models` is in alphabetical order
    there: rejudge_claims takes the models' order from the item files."""
    results_dir = Path(results_dir)
    entry = load_manifest_entries(results_dir).get(notebook) or {}
    if isinstance(entry.get("params"), Mapping):
        return dict(entry["params"])
    return notebook_params(notebook, results_dir.name, params_root)


def _in_item_order(entries: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """`entries` (label -> model) in the order their labels first appear in item rows (the notebook wrote them in
    its models' order, the baseline first); labels the items do not hold keep their place after those."""
    seen = list(dict.fromkeys(str(r["model"]) for r in rows if "model" in r))
    order = [label for label in seen if label in entries] + [label for label in entries if label not in seen]
    return {label: entries[label] for label in order}


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


def primary_claims(params: Mapping[str, Any]) -> list[PrimaryClaim]:
    """The primary claims a notebook's params pre-register (`primary:`), as the notebook judges them."""
    return [from_mapping(PrimaryClaim, entry, f"primary[{i}]") for i, entry in enumerate(params.get("primary") or [])]


def not_learned(results_dir: str | Path, models: Mapping[str, Any], threshold: float) -> dict[str, str]:
    """label -> why, for each model that is a run of 02_finetune ({run: name}) whose finetuned row in 02's committed
    heldout_accuracy.csv does not reach `threshold` (kvlib.pipeline.runs.not_learned_reason: the rule of the gate
    the evaluation notebooks apply, on the same held-out prompts). Empty when 02's table is not there."""
    path = Path(results_dir) / FINETUNE / "heldout_accuracy.csv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8") as fh:
        table = {r["run"]: r for r in csv.DictReader(fh) if r.get("model") == "finetuned"}
    out = {}
    for label, entry in models.items():
        run = entry.get("run") if isinstance(entry, Mapping) else None
        if run in table:
            reason = not_learned_reason(float(table[run]["value"]), int(table[run]["n"]), threshold)
            if reason is not None:
                out[label] = reason
    return out


def rejudge_claims(notebook: str, results_dir: str | Path, params: Mapping[str, Any] | None = None,
                   params_root: str | Path = "params") -> list[dict]:
    """A notebook's claims table recomputed from the item-level files it committed (`ITEM_FILES`, under
    results_dir/<notebook>/) with the current intervals, chance checks and Holm adjustment, without running any
    model: the same calls the notebook makes after scoring. `params`: the notebook's params (default: those its
    committed results were run with, `committed_params`), for the models' order
    (the first is the baseline, as in the notebooks), seed groups and baselines. Nothing is written."""
    if notebook not in ITEM_FILES:
        raise ValueError(f"no claims to re-judge for {notebook!r}; notebooks with claims: {', '.join(ITEM_FILES)}")
    results_dir = Path(results_dir)
    profile = results_dir.name
    params = dict(committed_params(notebook, results_dir, params_root) if params is None else params)
    folder = results_dir / notebook
    missing = [f for f in ITEM_FILES[notebook] if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing {', '.join(missing)} (has {notebook} run in this profile?)")
    items = {f: read_items(folder / f) for f in ITEM_FILES[notebook]}
    entries = _in_item_order(dict(params.get("models") or {"original": {}}),
                             [r for rows in items.values() for r in rows])
    # the finetunes the notebook left out (they did not learn their own task): their claims say not tested, and a
    # seed group holding one is not averaged, as in the notebook (kvlib.pipeline.runs.LearnedGate)
    gate = committed_gate(folder, entries, dict(params.get("seed_groups") or {}))
    if notebook == "02_finetune" or gate.files:
        return _judge(notebook, items, params, profile, params_root, entries, gate)
    # results from before the gate: every finetune was evaluated; those that 02's held-out check says did not learn
    # their own task are marked not tested (the same rule and threshold: kvlib.pipeline.runs.not_learned_reason)
    threshold = float(committed_params(FINETUNE, results_dir, params_root).get(
        "learned_threshold", FinetuneNotebookParams.learned_threshold))
    return mark_not_tested(_judge(notebook, items, params, profile, params_root, entries, gate),
                           not_learned(results_dir, entries, threshold))


def _judge(notebook: str, items: Mapping[str, list], params: Mapping[str, Any], profile: str,
           params_root: str | Path, entries: Mapping[str, Any], gate: LearnedGate) -> list[dict]:
    """`rejudge_claims`' calls per notebook: those the notebook makes after scoring, on its item files."""
    models = list(entries)
    groups = gate.learned_seed_groups

    if notebook == "02_finetune":
        rows = items["token_loss.csv"]
        runs = list(dict.fromkeys(r["run"] for r in rows))
        return token_loss_claims(rows, _template_pairs(params, profile, params_root, runs))

    if notebook in ("03_mdqa", "08_longer_context"):
        rows = items["mdqa_items.csv"]
        base = models[0]
        pooled, _ = mdqa.mdqa_pooled_deltas(rows, base, groups, margin=equivalence_margin())
        settings = list(dict.fromkeys(r["setting"] for r in rows))
        if notebook == "08_longer_context":
            return gate.judge(longer_context_claims, pooled, [{"setting": s} for s in settings], base,
                              int(params.get("num_documents", rows[0]["num_documents"])), primary=primary_claims(params))
        return gate.judge(mdqa_claims, pooled, mdqa.pooled_keys(settings), base, SETTING_RANDOM, SETTING_RETRIEVED,
                          primary=primary_claims(params))

    if notebook == "04_flenqa":
        rows = items["flenqa_items.csv"]
        base = models[0]
        pooled = evaluate.paired_deltas(rows, base, ["style"], "correct", "id", margin=equivalence_margin())
        if groups:
            pooled = evaluate.with_seed_groups(
                pooled, evaluate.seed_group_deltas(rows, base, groups, ["style"], "correct", "id", margin=equivalence_margin()), groups)
        return gate.judge(flenqa_claims, pooled, [{"style": s} for s in dict.fromkeys(r["style"] for r in rows)],
                          base, rows)

    if notebook == "05_general_benchmarks":
        rows = items["items.csv"]
        baseline = params.get("baseline", "original")
        n_boot, seed = int(params.get("n_boot", 2000)), int(params.get("seed", 0))
        deltas = general.benchmark_deltas(rows, baseline, n_boot, seed, margin=equivalence_margin())
        if groups:
            deltas = evaluate.with_seed_groups(
                deltas, general.benchmark_seed_group_deltas(rows, baseline, groups, seed, margin=equivalence_margin()), groups)
        return gate.judge(general_claims, deltas,
                          general.headline_keys(r["task"] for r in rows), baseline, general.HEADLINES,
                          general.TITLES, primary=primary_claims(params))

    original = params.get("original", "original")
    P = SimpleNamespace(models=params.get("models") or {original: {}}, original=original,
                        baselines=params.get("baselines") or {})
    mdqa_rows, flenqa_rows = items["mdqa_items.csv"], items["flenqa_items.csv"]
    mdqa_deltas = evaluate.paired_deltas(mdqa.mdqa_question_means(mdqa_rows), original, ["setting"], "correct",
                                         "qid", margin=equivalence_margin())
    flenqa_deltas = evaluate.paired_deltas(flenqa_rows, original, ["style"], "correct", "id", margin=equivalence_margin())
    general_deltas = general.benchmark_deltas(items["general_items.csv"], original, margin=equivalence_margin())
    return study.claims(P, mdqa_deltas, flenqa_deltas, general_deltas, flenqa_rows=flenqa_rows, gate=gate)


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


# ------------------------------------------------------------------------ what is known without re-running
#
# The protocol changes that committed results may predate. Each is detected from a field every item row records
# (nothing is assumed from dates or commits); what the protocol is NOW cannot be read from old rows, so it is
# declared here. `rejudge`: whether the committed items still measure what the claims ask, so the current
# statistics can be applied to them (True: the same models on the same prompts, only the numerics differ; the
# re-judged verdict stands for those numerics until the notebook runs again) or not (False: another model or
# another prompt was measured; only a re-run can judge the claim).

@dataclass(frozen=True)
class ProtocolChange:
    id: str
    field: str  # the item-file column that shows a row predates the change
    now: str  # the protocol today, as the map states it
    rejudge: bool


PROTOCOL_CHANGES = {change.id: change for change in (
    # evaluation dtype: a CPU evaluation used to run in bfloat16 when a short matmul timing found it faster
    # (`dtype: auto`); it now runs in EVAL_DTYPE unless the profile says otherwise, the same in every notebook
    ProtocolChange("numerics", "dtype", "now float32", rejudge=True),
    # the weights a notebook evaluated for a run of 02_finetune, against those the profile's latest evaluation of
    # that run recorded: other weights are an earlier training of the run
    ProtocolChange("evaluated_weights", "weights_sha256", "an earlier training of the run", rejudge=False),
    # generative benchmarks: prompts went through the chat template; lm-evaluation-harness's default, and
    # kvlib's now, is the raw few-shot text (RAW_TEXT_TASKS)
    ProtocolChange("chat_template", "chat_template", "now raw text, as lm-evaluation-harness does by default",
                   rejudge=False),
)}
EVAL_DTYPE = "float32"  # the evaluation dtype of the profiles that have committed results (cpu, quick: CPU runs)
# the generative tasks (on a local model) whose default prompt is now the raw few-shot text, not the chat template
RAW_TEXT_TASKS = tuple(name for name, spec in general.TASKS.items()
                       if spec.variants[0] == "generate" and spec.prompt_format == "raw")
RECORD_FILE = "rejudged.json"
RECORD_COMMAND = "kvlib rejudge --profile {profile} --write"
STALE_RERUN = "stale: to be re-run"  # a claim the committed items cannot judge (the claims figure's category)


def item_files(folder: Path) -> list[Path]:
    """The item-level files a notebook committed (every *items.csv in its results folder, token_loss.csv)."""
    return sorted([*folder.glob("*items.csv"), *folder.glob("token_loss.csv")])


def _label_runs(entry: Mapping[str, Any]) -> dict[str, str]:
    """label -> 02_finetune run of the models a manifest entry evaluated (its recorded params)."""
    models = (entry.get("params") or {}).get("models") or {}
    return {label: m["run"] for label, m in models.items() if isinstance(m, Mapping) and m.get("run")}


def _run_weights(name: str, entry: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> dict[str, tuple[str, set]]:
    """run -> (model label, weights sha256s) of the 02_finetune runs that notebook `name`'s item rows evaluated: by
    the label its params give a run, or in 02's held-out items by the row's own `run` (its finetuned rows: 02 checks
    every run it trains, so its record is the latest training of a run when it finished last)."""
    runs = _label_runs(entry)
    out: dict[str, tuple[str, set]] = {}
    for row in rows:
        label, sha = str(row.get("model")), row.get("weights_sha256")
        run = runs.get(label) or (row.get("run") if name == FINETUNE and label == HELDOUT_FINETUNED else None)
        if sha and run:
            out.setdefault(str(run), (label, set()))[1].add(str(sha))
    return out


def current_run_weights(results_dir: Path, entries: Mapping[str, Mapping[str, Any]],
                        items: Mapping[str, Mapping[str, list]]) -> dict[str, tuple[str, str]]:
    """run -> (weights sha256, notebook): the weights the latest-finished notebook evaluating the run recorded."""
    current: dict[str, tuple[str, str, str]] = {}
    for name, entry in entries.items():
        finished = str(entry.get("finished", ""))
        for rows in items.get(name, {}).values():
            for run, (_, hashes) in _run_weights(name, entry, rows).items():
                if len(hashes) == 1 and (run not in current or finished > current[run][2]):
                    current[run] = (next(iter(hashes)), name, finished)
    return {run: (sha, name) for run, (sha, name, _) in current.items()}


def protocol_findings(name: str, entry: Mapping[str, Any], files: Mapping[str, list],
                      current: Mapping[str, tuple[str, str]]) -> list[dict]:
    """The protocol changes (`PROTOCOL_CHANGES`) that notebook `name`'s item rows (`files`: file name -> rows)
    predate, each {change, reason, models, tasks}: `models`/`tasks` the labels or benchmarks it concerns (None:
    every claim of the notebook); `reason` says what the rows record and what the protocol is now."""
    findings = []
    dtypes = {str(r["dtype"]) for rows in files.values() for r in rows if r.get("dtype")}
    if dtypes - {EVAL_DTYPE}:
        where = ", ".join(f for f, rows in files.items() if any(r.get("dtype") not in (None, EVAL_DTYPE) for r in rows))
        findings.append({"change": "numerics", "models": None, "tasks": None,
                         "reason": f"evaluated in {'/'.join(sorted(dtypes - {EVAL_DTYPE}))} ({where}), "
                                   f"{PROTOCOL_CHANGES['numerics'].now}"})
    stale = {}
    for rows in files.values():
        for run, (label, hashes) in _run_weights(name, entry, rows).items():
            if run in current and hashes != {current[run][0]}:
                stale[(label, run)] = (sorted(hashes), *current[run])
    for (label, run), (old, sha, where) in sorted(stale.items()):
        findings.append({"change": "evaluated_weights", "models": [label], "tasks": None,
                         "reason": f"{label!r} (run {run}) evaluated weights {', '.join(h[:10] for h in old)}, not "
                                   f"{sha[:10]} as {where}: {PROTOCOL_CHANGES['evaluated_weights'].now}"})
    templated = sorted({str(r["task"]) for rows in files.values() for r in rows
                        if r.get("task") in RAW_TEXT_TASKS and r.get("chat_template")
                        and r.get("prompt_format", "chat") == "chat"})
    if templated:
        titles = [general.TASKS[t].title for t in templated]
        findings.append({"change": "chat_template", "models": None, "tasks": templated,
                         "reason": f"{', '.join(titles)} prompted through the chat template, "
                                   f"{PROTOCOL_CHANGES['chat_template'].now}"})
    return findings


def _claim_concerns(claim: Mapping[str, Any], finding: Mapping[str, Any], groups: Mapping[str, Sequence[str]]) -> bool:
    """Whether a claims-table row is about what `finding` changed: its model (or a seed group holding it), its
    benchmark (named by its title in the claim)."""
    if finding["models"] is not None:
        members = {str(claim.get("model"))} | set(groups.get(str(claim.get("model")), ()))
        if not members & set(finding["models"]):
            return False
    if finding["tasks"] is not None:
        titles = [general.TASKS[t].title for t in finding["tasks"]]
        if not any(f"on {title}" in str(claim.get("claim", "")) for title in titles):
            return False
    return True


def _zero_width(ci: str) -> bool:
    lo, hi = claim_interval({"ci": ci})
    return lo is not None and lo == hi


def _old_claims(folder: Path, entry: Mapping[str, Any]) -> list[dict]:
    path = folder / "claims.csv"
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh))
    return [dict(c) for c in (entry.get("facts") or {}).get("claims", [])]


def _rounded(value: Any) -> Any:
    """A number for the record: 4 decimals; NaN (a claim that was not tested has no p) as null."""
    if isinstance(value, float):
        return round(value, 4) if math.isfinite(value) else None
    return value


def notebook_record(name: str, results_dir: Path, entry: Mapping[str, Any], files: Mapping[str, list],
                    current: Mapping[str, tuple[str, str]], params_root: str | Path = "params") -> dict:
    """One notebook's part of the record (`build_record`): its item files with their sha256 (the record holds only
    while they are unchanged), the protocol changes it predates (`stale`), and per claim the old and re-judged
    verdict and CI, or why it is not re-judged. A claim is re-judged unless a change that the committed items
    cannot answer (ProtocolChange.rejudge False) concerns it; re-judged claims stay Holm-adjusted within their
    artifact's whole family (the claims left to a re-run count in it, the conservative side)."""
    folder = results_dir / name
    findings = protocol_findings(name, entry, files, current)
    record: dict[str, Any] = {
        "items": {f: file_sha256(folder / f) for f in sorted(files)},
        "stale": [{"change": f["change"], "reason": f["reason"], "rejudged": PROTOCOL_CHANGES[f["change"]].rejudge}
                  for f in findings],
        "claims": [],
    }
    if name not in ITEM_FILES:
        return record
    params = committed_params(name, results_dir, params_root)
    groups = dict(params.get("seed_groups") or {})
    new = rejudge_claims(name, results_dir, params, params_root)
    old = _old_claims(folder, entry)
    fresh = {(r["artifact"], r["claim"], r["model"]): r for r in new}
    for row in compare_claims(old, new):
        blocking = [f for f in findings if not PROTOCOL_CHANGES[f["change"]].rejudge and _claim_concerns(row, f, groups)]
        if blocking and not row["old_verdict"]:
            continue  # a claim the notebook did not make then, which its items cannot judge now
        claim = {"artifact": row["artifact"], "claim": row["claim"], "model": row["model"],
                 "old_ci": row["old_ci"], "old_verdict": row["old_verdict"],
                 "old_ci_zero_width": _zero_width(row["old_ci"])}
        if blocking:
            claim["rerun"] = "; ".join(f["reason"] for f in blocking)
        else:
            n = fresh[(row["artifact"], row["claim"], row["model"])]
            claim.update({"new_ci": row["new_ci"], "new_verdict": row["new_verdict"], "new_delta": _rounded(n.get("delta")),
                          "unit": n.get("unit"), "h0": n.get("h0"), "p_holm": _rounded(n.get("p_holm")),
                          "family_size": n.get("family_size"),
                          **{k: _rounded(n[k]) for k in (ROLE, HALF_WIDTH, MAX_HALF_WIDTH) if k in n}})
        record["claims"].append(claim)
    return record


def build_record(profile: str, results_root: str | Path = "results", params_root: str | Path = "params") -> dict:
    """What is known about a profile's committed results without re-running them (results/<profile>/rejudged.json):
    per finished notebook that committed item files, `notebook_record`. Deterministic: the same committed files
    give the same record."""
    results_dir = Path(results_root) / profile
    entries = {n: e for n, e in load_manifest_entries(results_dir).items() if e.get("status") == "ok"}
    items = {n: {p.name: read_items(p) for p in item_files(results_dir / n)} for n in sorted(entries)}
    items = {n: files for n, files in items.items() if files}
    current = current_run_weights(results_dir, entries, items)
    notebooks = {n: notebook_record(n, results_dir, entries[n], files, current, params_root)
                 for n, files in items.items()}
    return {"profile": profile, "command": RECORD_COMMAND.format(profile=profile),
            "about": "Each notebook's committed results as they stand under the current protocol, without re-running "
                     "a model: `stale` lists the protocol changes its item files show it predates (rejudged: whether "
                     "its claims could still be re-judged from those items); `claims` has each claim's old verdict "
                     "and CI and, unless a change it cannot answer concerns it (`rerun`), the verdict and CI the "
                     "current statistics give on the committed items. Valid while the item files keep the sha256 "
                     "listed under `items`; a re-run of the notebook replaces it.",
            "notebooks": notebooks}


def write_record(profile: str, results_root: str | Path = "results", params_root: str | Path = "params") -> Path:
    """`build_record` written to results/<profile>/rejudged.json."""
    path = Path(results_root) / profile / RECORD_FILE
    return atomic_write_text(path, dumps_json(build_record(profile, results_root, params_root)))


def load_record(results_dir: str | Path) -> dict[str, dict]:
    """notebook -> its part of results_dir/rejudged.json, for the notebooks whose item files are still those the
    record was derived from (a notebook run again is judged by its own claims table); {} without a record."""
    results_dir = Path(results_dir)
    path = results_dir / RECORD_FILE
    if not path.is_file():
        return {}
    notebooks = json.loads(path.read_text(encoding="utf-8")).get("notebooks", {})
    return {name: rec for name, rec in notebooks.items()
            if all((results_dir / name / f).is_file() and file_sha256(results_dir / name / f) == sha
                   for f, sha in rec.get("items", {}).items())}


def artifact_summary(record: Mapping[str, Any], artifact: str) -> dict:
    """A notebook record's standing on one artifact, for the reproduction map: `reasons` (every protocol change
    it predates), `old` and `new` artifact verdicts (kvlib.report.paper.artifact_verdict) over its claims that
    were re-judged, `new_counts` (category -> count), `rerun` (how many of its claims only a re-run can judge),
    `claims` (how many it has) and `collapsed` (how many old verdicts stood on a zero-width interval)."""
    claims = [c for c in record.get("claims", []) if c["artifact"] == artifact]
    judged = [c for c in claims if "new_verdict" in c]
    categories = [verdict_category(c["new_verdict"]) for c in judged]
    return {"reasons": [s["reason"] for s in record.get("stale", [])],
            "old": artifact_verdict([c["old_verdict"] for c in judged if c["old_verdict"]]) if judged else None,
            "new": artifact_verdict([c["new_verdict"] for c in judged]) if judged else None,
            "new_counts": {v: categories.count(v) for v in dict.fromkeys(categories)},
            "collapsed": sum(bool(c.get("old_ci_zero_width")) for c in claims),
            "rerun": len(claims) - len(judged), "claims": len(claims)}


def figure_claims(record: Mapping[str, Any], old: Sequence[Mapping[str, Any]]) -> list[dict]:
    """The claims figure's rows for a notebook with a record: each re-judged claim with its new difference, CI and
    verdict; each claim left to a re-run with its old numbers under the STALE_RERUN verdict (the paper's
    published differences kept from the old table)."""
    published = {(c.get("artifact"), c.get("claim"), c.get("model")): c.get("published_delta_points") for c in old}
    rows = []
    for c in record.get("claims", []):
        key = (c["artifact"], c["claim"], c["model"])
        base = {"artifact": c["artifact"], "claim": c["claim"], "model": c["model"],
                "published_delta_points": published.get(key)}
        if "new_verdict" in c:
            rows.append({**base, "delta": c.get("new_delta"), "ci": c["new_ci"], "unit": c.get("unit"),
                         "h0": c.get("h0"), "verdict": c["new_verdict"],
                         **{k: c[k] for k in (ROLE, HALF_WIDTH, MAX_HALF_WIDTH) if k in c}})
        else:
            old_row = next((o for o in old if (o.get("artifact"), o.get("claim"), o.get("model")) == key), {})
            rows.append({**old_row, **base, "verdict": STALE_RERUN})
    return rows


def format_record(record: Mapping[str, Any]) -> str:
    """A record (`build_record`) as text for the terminal: per notebook, why it is stale, then each claim whose
    verdict the re-judging changed (old -> new) and how many claims only a re-run can judge."""
    lines = []
    for name, rec in record.get("notebooks", {}).items():
        lines.append(name)
        lines += [f"  stale: {s['reason']}" + ("" if s["rejudged"] else " (the claims it concerns: to be re-run)") for s in rec["stale"]]
        judged = [c for c in rec["claims"] if "new_verdict" in c]
        for c in judged:
            if c["new_verdict"] != c["old_verdict"]:
                lines.append(f"  {c['artifact']} {c['model']}: {c['claim']}: {c['old_verdict'] or '(new claim)'} "
                             f"{c['old_ci']} -> {c['new_verdict']} {c['new_ci']}")
        same = sum(c["new_verdict"] == c["old_verdict"] for c in judged)
        rerun = len(rec["claims"]) - len(judged)
        if rec["claims"]:
            lines.append(f"  {len(judged)} claims re-judged ({same} unchanged), {rerun} to be re-run")
    return "\n".join(lines) + "\n"
