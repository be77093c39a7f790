"""The paper's published numbers: `params/paper_reference.yaml`, read and validated in one place.

Notebooks show these beside the reproduced numbers; they never feed a computation except as the "paper"
column of a comparison. Keys of `general_scores()` are "<model>: <finetuning>" (e.g. "Mistral-7B-Instruct-v0.1:
IN2"), scores are percent.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from kvlib.config import ParamError, load_yaml

DEFAULT_PATH = Path(__file__).resolve().parents[1] / "params" / "paper_reference.yaml"
BENCHMARKS = ("mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open")  # kvlib.general.TASKS names
SECTIONS = ("paper", "general_benchmarks", "claims", "artifacts", "training", "not_published")
ARTIFACT_FIELDS = {"id", "title", "notebook", "claims", "results", "offline"}


@dataclass(frozen=True)
class PaperReference:
    paper: str
    general_benchmarks: tuple[dict, ...]  # {model, finetuning, source, scores: {benchmark: percent}}
    claims: dict[str, dict]  # id -> {source, unit, text, value | range}
    training: dict[str, dict]
    not_published: tuple[str, ...]
    artifacts: tuple[dict, ...] = ()  # {id, title, notebook, claims, results, offline?}, in paper order

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


def _check_artifact(i: int, art: Any, path: Path) -> dict:
    where = f"{path.name}: artifacts[{i}]"
    _need(isinstance(art, Mapping), where, f"expected a mapping, got {art!r}")
    missing = ARTIFACT_FIELDS - {"offline"} - set(art)
    _need(not missing, where, f"missing {sorted(missing)}")
    unknown = set(art) - ARTIFACT_FIELDS
    _need(not unknown, where, f"unknown fields {sorted(unknown)}; known: {sorted(ARTIFACT_FIELDS)}")
    _need(isinstance(art["claims"], bool), f"{where}.claims", "expected true or false")
    results = art["results"]
    _need(isinstance(results, list) and results and all(
        isinstance(r, str) and r.startswith(f"{art['notebook']}/") for r in results), f"{where}.results",
        f"expected files under {art['notebook']}/, got {results!r}")
    return dict(art)


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
    artifacts = tuple(_check_artifact(i, a, path) for i, a in enumerate(data.get("artifacts") or []))
    art_ids = [a["id"] for a in artifacts]
    _need(len(set(art_ids)) == len(art_ids), f"{path.name}: artifacts", "artifact ids must be unique")
    return PaperReference(paper=str(data.get("paper", "")), general_benchmarks=rows,
                          claims={c["id"]: c for c in claims}, training=dict(data.get("training") or {}),
                          not_published=tuple(data.get("not_published") or ()), artifacts=artifacts)


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


# ------------------------------------------------------------------------------------- judging claims

Expect = Literal["increase", "decrease", "no_loss", "no_gain"]
EXPECTS = ("increase", "decrease", "no_loss", "no_gain")
# A claim about a general-benchmark difference where both models score 0 on every item: there was nothing to
# lose, so the CI of [0, 0] says nothing about "loses nothing" or "loses" (the 135M embedded model answers no
# closed-book TriviaQA question).
AT_FLOOR = "untestable (both score 0)"


def at_floor(row: dict, d: Mapping[str, Any]) -> dict:
    """`row` (a judge() claim on difference `d`) with the AT_FLOOR verdict when both models scored 0."""
    if d.get("value") == 0 and d.get("baseline_value") == 0:
        row["verdict"] = AT_FLOOR
    return row


def equivalence_margin() -> float:
    """The largest change (a fraction) that "loses nothing" / "does not improve" tolerates: the smallest drop the
    paper itself calls a loss (Table 2's baseline TriviaQA drops start at 2.19 points). Why a margin: at small n a
    CI like [-25, +0] points "contains 0" yet allows a loss ten times the paper's, so it must not count as holding."""
    return load().claim("triviaqa_drop_baselines_table2")["range"][0] / 100


def verdict(ci_low: float | None, ci_high: float | None, expect: Expect, margin: float | None = None) -> str:
    """Whether a claimed direction holds, from the 95% CI of a difference (ours minus the original, fractions):
    "increase" holds when the CI is above 0 and "decrease" when below, else "inconclusive" (the CI contains 0)
    or "does not hold" (it excludes 0 on the other side). "no_loss" does not hold when the CI is below 0 and
    holds when it rules out any loss larger than `margin` (ci_low >= -margin); "no_gain" (the paper's "will not
    improve") mirrors it. In between, the CI allows a change the paper would call real: "inconclusive".
    `margin` defaults to `equivalence_margin()`."""
    if expect not in EXPECTS:
        raise ValueError(f"expect must be one of {', '.join(EXPECTS)}, got {expect!r}")
    if ci_low is None or ci_high is None or math.isnan(ci_low) or math.isnan(ci_high):
        return "not measured"
    if expect in ("no_loss", "no_gain"):
        margin = equivalence_margin() if margin is None else margin
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        if expect == "no_loss":
            return "does not hold" if ci_high < 0 else "holds" if ci_low >= -margin else "inconclusive"
        return "does not hold" if ci_low > 0 else "holds" if ci_high <= margin else "inconclusive"
    above, below = ci_low > 0, ci_high < 0
    if expect == "increase":
        return "holds" if above else "does not hold" if below else "inconclusive"
    return "holds" if below else "does not hold" if above else "inconclusive"


def judge(artifact: str, claim: str, model: str, delta: Mapping[str, Any], expect: Expect,
          value: str = "delta", unit: str = "points") -> dict:
    """One checked claim: a paired-delta row (`value`, ci_low, ci_high; n_pairs or n) judged by `verdict`.
    unit "points": the row holds fractions, reported x100; any other unit (e.g. "nats") is reported as is.
    `artifact` is an id of the reference file's artifacts (e.g. "fig5")."""
    known = [a["id"] for a in load().artifacts]
    if artifact not in known:
        raise ValueError(f"unknown paper artifact {artifact!r}; known: {', '.join(known)}")
    scale, digits = (100, 1) if unit == "points" else (1, 3)
    lo, hi, v = delta.get("ci_low"), delta.get("ci_high"), delta.get(value)
    return {"artifact": artifact, "claim": claim, "model": model, "n": delta.get("n_pairs", delta.get("n")),
            "delta": None if v is None else round(scale * v, 9) + 0.0,  # no -1.8e-15 from float means, no -0.0
            "ci": "" if lo is None or hi is None else f"[{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]",
            "unit": unit, "verdict": verdict(lo, hi, expect)}


def token_loss_claims(rows: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]], model: str = "original",
                      seed: int = 0) -> list[dict]:
    """Fig. 4: with the answer template, the loss on the answer's formatting tokens is lower than without it
    (so finetuning concentrates on the value). `rows`: kvlib.train.answer_token_losses rows with a "run" column;
    `pairs`: (run with template, run without) on the same samples (same item index). Per sample, the mean loss
    over its "format" tokens; the paired difference (with minus without) must be below 0."""
    from kvlib.stats import bootstrap_ci

    def per_sample(run: str) -> dict[str, float]:
        losses: dict[str, list[float]] = {}
        for r in rows:
            if r["run"] == run and r["model"] == model and r["kind"] == "format":
                losses.setdefault(r["id"].rsplit("-", 1)[-1], []).append(float(r["loss"]))
        return {k: sum(v) / len(v) for k, v in losses.items()}

    out = []
    for with_t, without in pairs:
        a, b = per_sample(with_t), per_sample(without)
        diffs = [a[k] - b[k] for k in a if k in b]
        if not diffs:
            continue
        mean, lo, hi = bootstrap_ci(diffs, seed=seed)
        out.append(judge("fig4", f"the answer template lowers the {model} model's loss on formatting tokens "
                                 f"({with_t} minus {without}, mean per sample)", model,
                         {"delta": mean, "ci_low": lo, "ci_high": hi, "n": len(diffs)}, "decrease", unit="nats"))
    return out


def mdqa_claims(pooled: Sequence[Mapping[str, Any]], synthetic: Sequence[str], random_label: str,
                retrieved_label: str) -> list[dict]:
    """Figs. 5 and 10 from MDQA paired deltas pooled over gold positions (one row per model and setting):
    synthetic finetuning improves MDQA with random distractors and does not with retrieved ones."""
    out = []
    for d in pooled:
        if d["model"] not in synthetic:
            continue
        if d.get("setting") == random_label:
            out.append(judge("fig5", "synthetic finetuning improves MDQA, random distractors (mean over positions)",
                             d["model"], d, "increase", "delta_correct"))
        elif d.get("setting") == retrieved_label:
            out.append(judge("fig10", "synthetic finetuning does not improve MDQA with retrieved distractors "
                                      "(mean over positions)", d["model"], d, "no_gain", "delta_correct"))
    return out


def longer_context_claims(pooled: Sequence[Mapping[str, Any]], synthetic: Sequence[str], num_documents: int
                          ) -> list[dict]:
    """Fig. 9 from MDQA paired deltas pooled over gold positions at the longer context: finetuning on long
    key-value prompts improves MDQA with many documents."""
    return [judge("fig9", f"finetuning on long key-value prompts improves {num_documents}-document MDQA (random "
                          f"distractors, mean over positions)", d["model"], d, "increase", "delta_correct")
            for d in pooled if d["model"] in synthetic]


def flenqa_claims(pooled: Sequence[Mapping[str, Any]], synthetic: Sequence[str]) -> list[dict]:
    """Figs. 6-7 from FLenQA paired deltas pooled over lengths (one row per model and prompt style)."""
    return [judge("fig6_7", f"synthetic finetuning improves FLenQA ({d['style']} prompts, pooled over lengths)",
                  d["model"], d, "increase", "delta_correct") for d in pooled if d["model"] in synthetic]


def published_deltas(benchmark: str, finetuning: str = "key-value, with template") -> str:
    """The paper's own difference (points) for `benchmark`, `finetuning` minus original, per model that has both,
    as text ("Mistral-7B-Instruct-v0.1: +0.02; GPT-3.5 Turbo (1106): -0.32")."""
    rows = {(r["model"], r["finetuning"]): r["scores"] for r in load().general_benchmarks}
    parts = []
    for (model, ft), scores in rows.items():
        base = rows.get((model, "original"), {})
        if ft == finetuning and benchmark in scores and benchmark in base:
            parts.append(f"{model}: {scores[benchmark] - base[benchmark]:+.2f}")
    return "; ".join(parts)


def judge_general(artifact: str, claim: str, d: Mapping[str, Any], expect: Expect, deltas: Sequence[Mapping[str, Any]],
                  floor_metric: str | None = None) -> list[dict]:
    """A claim on general-benchmark difference `d` (a kvlib.general.paired_deltas row): judge() it, AT_FLOOR when
    both models scored 0. At the floor, and when the task declares a `floor_metric`, the same claim is judged
    again on that metric's difference for the same model and task (from `deltas`), its metric named in the claim
    text, so a floor on the strict metric does not leave the claim unmeasured when the lenient one has signal."""
    out = [at_floor(judge(artifact, claim, d["model"], d, expect), d)]
    if out[0]["verdict"] == AT_FLOOR and floor_metric and floor_metric != d["metric"]:
        alt = next((x for x in deltas if x["model"] == d["model"] and x["task"] == d["task"]
                    and x["metric"] == floor_metric and x.get("baseline") == d.get("baseline")), None)
        if alt is not None:
            out.append(at_floor(judge(artifact, f"{claim} ({floor_metric}; {d['metric']} is 0 for both models)",
                                      d["model"], alt, expect), alt))
    return out


def general_claims(deltas: Sequence[Mapping[str, Any]], synthetic: Sequence[str], headline: Mapping[str, str],
                   titles: Mapping[str, str], artifact: str = "table1",
                   floor_metrics: Mapping[str, str | None] | None = None) -> list[dict]:
    """Table 1 (or 2): synthetic finetuning loses nothing on each general benchmark's headline metric, with the
    paper's own difference for its key-value (with template) models beside ours. `floor_metrics` (task -> metric,
    default: each kvlib.general task's floor_metric): what a claim at the floor is also judged on (judge_general)."""
    if floor_metrics is None:
        from kvlib.general import TASKS

        floor_metrics = {name: spec.floor_metric for name, spec in TASKS.items()}
    out = []
    for d in deltas:
        if d["model"] not in synthetic or d["metric"] != headline[d["task"]]:
            continue
        for row in judge_general(artifact, f"synthetic finetuning loses nothing on {titles[d['task']]}", d,
                                 "no_loss", deltas, floor_metrics.get(d["task"])):
            out.append({**row, "published_delta_points": published_deltas(d["task"])})
    return out


# -------------------------------------------------------------------------------- reproduction map

def artifact_verdict(verdicts: Sequence[str]) -> str:
    """One verdict for an artifact from its claims' verdicts: all hold -> "holds"; some hold -> "partly holds";
    none holds but some are inconclusive -> "inconclusive at this n"; all fail -> "does not hold on this model".
    Claims not measured or untestable at the floor (AT_FLOOR) do not count."""
    measured = [v for v in verdicts if v not in ("not measured", AT_FLOOR)]
    if not measured:
        return AT_FLOOR if AT_FLOOR in verdicts else "not measured"
    if all(v == "holds" for v in measured):
        return "holds"
    if any(v == "holds" for v in measured):
        return "partly holds"
    if any(v == "inconclusive" for v in measured):
        return "inconclusive at this n"
    return "does not hold on this model"


def _model_of(entry: Mapping[str, Any]) -> str:
    """The base model(s) a notebook ran on: 02's base_model, else the `model` entries of its models."""
    params = entry.get("params") or {}
    if "runs" in params or "base_model" in params:  # 02_finetune: kvlib.train's default base is the embedded model
        from kvlib.models import DEFAULT_MODEL

        return str(params.get("base_model") or DEFAULT_MODEL)
    models = params.get("models") or {}
    names = [str(m["model"]) for m in models.values() if isinstance(m, Mapping) and m.get("model")]
    return ", ".join(dict.fromkeys(names))


def reproduction_map(profile: str, results_root: str | Path = "results", params_root: str | Path = "params",
                     link_root: str | Path | None = None, entries: Mapping[str, dict] | None = None,
                     changed: Mapping[str, str] | None = None) -> list[dict]:
    """One row per paper artifact for `profile`, from its manifest's notebook entries (`entries`, default: read
    from results/<profile>/manifest.json): the notebook (its html), params file, result files and model, and the
    verdict aggregated from the claims the notebook recorded. Links are relative to `link_root` (default: the
    working directory, i.e. the repository root) and are given only for files that exist, so every link
    resolves. `changed` (kvlib.reproduce.changed_since_run: notebook -> reason) marks the verdicts of results
    that an earlier params or notebook version produced, so they are not read as the current configuration's."""
    import os

    from kvlib.reproduce import load_manifest_entries

    results_dir = Path(results_root) / profile
    link_root = Path(link_root) if link_root is not None else Path.cwd()
    if entries is None:
        entries = load_manifest_entries(results_dir)

    def link(path: Path, text: str) -> str:
        if not path.is_file():
            return ""
        return f"[{text}]({Path(os.path.relpath(path.resolve(), link_root.resolve())).as_posix()})"

    rows = []
    for art in load().artifacts:
        nb = art["notebook"]
        entry = entries.get(nb)
        ok = entry is not None and entry.get("status") == "ok"
        claims = [c for c in ((entry or {}).get("facts") or {}).get("claims", []) if c.get("artifact") == art["id"]]
        if entry is not None and entry.get("status") == "skipped":
            verdict_text = f"not for this profile: {entry.get('reason', '')}"
        elif not ok:
            verdict_text = "not run in this profile yet"
        elif not art["claims"]:
            verdict_text = "shown (illustration)"
        elif claims:
            verdict_text = artifact_verdict([c["verdict"] for c in claims])
            counts = {v: sum(c["verdict"] == v for c in claims) for v in dict.fromkeys(c["verdict"] for c in claims)}
            verdict_text += " (" + ", ".join(f"{n} {v}" for v, n in counts.items()) + ")"
        else:
            verdict_text = "not measured (no claim recorded)"
        if ok and nb in (changed or {}):
            verdict_text = f"stale ({changed[nb]} since this run; kvlib reproduce re-runs it): {verdict_text}"
        files = [link(results_dir / r, Path(r).name) for r in art["results"]] if ok else []
        rows.append({
            "artifact": art["title"],
            "notebook": link(results_dir / f"{nb}.html", nb) or nb,
            "params": link(Path(params_root) / profile / f"{nb}.yaml", f"{profile}/{nb}.yaml"),
            "results": ", ".join(f for f in files if f),
            "model": _model_of(entry) if ok else "",
            "verdict": verdict_text,
            "offline": " ".join(str(art.get("offline", "")).split()),
        })
    return rows


def map_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """The reproduction map as a Markdown table (README)."""
    cols = ["artifact", "notebook", "params", "results", "model", "verdict", "offline"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


MAP_START = "<!-- reproduction-map:{profile}:start (kvlib map --profile {profile} --update README.md) -->"
MAP_END = "<!-- reproduction-map:{profile}:end -->"


def readme_map_section(profile: str, results_root: str | Path = "results", params_root: str | Path = "params",
                       link_root: str | Path | None = None, notebooks_dir: str | Path = "notebooks") -> str:
    """What goes between a profile's map markers in the README: the map, then the profile's wall time from its
    manifest (what the results cost on this machine, with the notebooks `kvlib reproduce` runs from
    `notebooks_dir` that have not finished yet, or changed since they ran, named)."""
    from kvlib.reporting import wall_time_summary
    from kvlib.reproduce import changed_since_run, discover_notebooks, load_manifest_entries

    entries = load_manifest_entries(Path(results_root) / profile)
    changed = changed_since_run(profile, entries, Path(params_root), Path(notebooks_dir))
    text = map_markdown(reproduction_map(profile, results_root, params_root, link_root, entries=entries,
                                         changed=changed))
    if entries:
        text += "\n" + wall_time_summary(entries, list(discover_notebooks(Path(notebooks_dir))), changed) + "\n"
    return text


def update_readme_map(readme: str | Path, profile: str, results_root: str | Path = "results",
                      params_root: str | Path = "params", notebooks_dir: str | Path = "notebooks") -> bool:
    """Replace the text between the profile's map markers in `readme` with `readme_map_section` (links relative
    to the README's folder). Returns whether the file changed; the markers must already be there."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    start, end = MAP_START.format(profile=profile), MAP_END.format(profile=profile)
    if start not in text or end not in text:
        raise ValueError(f"{readme}: add the lines\n{start}\n{end}\nwhere the {profile} map belongs")
    section = readme_map_section(profile, results_root, params_root, readme.parent, notebooks_dir)
    head, rest = text.split(start, 1)
    new = f"{head}{start}\n{section}{end}{rest.split(end, 1)[1]}"
    if new != text:
        readme.write_text(new, encoding="utf-8")
    return new != text
