"""The paper's published numbers: `params/paper_reference.yaml`, read and validated in one place.

Notebooks show these beside the reproduced numbers; they never feed a computation except as the "paper"
column of a comparison. Keys of `general_scores()` are "<model>: <finetuning>" (e.g. "Mistral-7B-Instruct-v0.1:
IN2"), scores are percent.
"""
from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

from kvlib.engine import resources
from kvlib.engine.config import ParamError, check_fraction, fail, load_yaml
from kvlib.engine.stats import holm, p_from_interval, paired_difference_test
from kvlib.tasks.flenqa import FLENQA_CHANCE, balanced_accuracy_table
from kvlib.tasks.general import TASKS
from kvlib.tasks.mdqa import MDQA_CHANCE, SETTING_CONTRAST

REFERENCE_FILE = "params/paper_reference.yaml"  # in the checkout, or carried by the wheel (kvlib.engine.resources)
BENCHMARKS = ("mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open")  # kvlib.tasks.general.TASKS names
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
    """Read and validate the reference file (default: params/paper_reference.yaml of the checkout kvlib runs from,
    or the copy an installed wheel carries)."""
    path = Path(path) if path is not None else resources.resource_path(REFERENCE_FILE)
    if not path.is_file():
        raise ParamError(f"paper reference: {path} not found (it ships in the repository's params/ and in the wheel)")
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
    with the table each row is printed in; `titles` renames benchmark columns (e.g. kvlib.tasks.general's)."""
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
#
# A claim is a one-sided hypothesis on a difference (ours minus the original): "increase" tests H0: diff <= 0,
# "decrease" H0: diff >= 0, "no_loss" H0: diff <= -margin and "no_gain" H0: diff >= +margin (equivalence_margin).
# Each difference row carries the p-values of those nulls from its own interval method (kvlib.stats: the interval
# and the p-value come from the same test, so at a family of one, p < ALPHA exactly when the 95% CI excludes the
# null). A notebook's claims on one artifact (a figure or table) are one family: their p-values are Holm-adjusted
# (`holm_families`) and a claim holds when its adjusted p is below ALPHA. "Does not hold" is the contrary test
# (diff < 0 for increase and no_loss, diff > 0 for decrease and no_gain), Holm-adjusted the same way. Before any
# test, the original's score must clear the task's chance rate (or floor) by a margin (`original_level`): a model
# at chance has nothing to lose and shows no effect the paper is about, so such a claim is "untestable at this
# model's level", with the reason, and is left out of its family.

Expect = Literal["increase", "decrease", "no_loss", "no_gain"]
EXPECTS = ("increase", "decrease", "no_loss", "no_gain")
ALPHA = 0.025  # one-sided, per claim after Holm: each side of a two-sided 95% interval
UNTESTABLE = "untestable at this model's level"
# Kept for claims recorded before chance rates were declared (and rows without the original's interval): both
# models scored 0 on every item, so a CI of [0, 0] says nothing about "loses nothing" or "loses".
AT_FLOOR = "untestable (both score 0)"
# claim -> (p-value column of its null, p-value column of the contrary null) in a difference row
CLAIM_P = {"increase": ("p_increase", "p_decrease"), "decrease": ("p_decrease", "p_increase"),
           "no_loss": ("p_no_loss", "p_decrease"), "no_gain": ("p_no_gain", "p_increase")}


# A transfer claim whose finetune did not learn its own task: nothing to transfer, nothing tested (`mark_not_tested`).
NOT_TESTED = "not tested: the finetune did not learn its task"


def not_tested_reason(verdict_text: str) -> str:
    """Why a NOT_TESTED verdict's finetune was left out, as `mark_not_tested` wrote it in the parentheses: "held-out
    value accuracy 0.0% of 40 < 50%"; '' for any other verdict, or one without its reason."""
    if not verdict_text.startswith(NOT_TESTED):
        return ""
    return verdict_text.removeprefix(NOT_TESTED).strip().removeprefix("(").removesuffix(")")


def is_untestable(verdict_text: str) -> bool:
    return verdict_text.startswith(("untestable", NOT_TESTED))


def verdict_category(verdict_text: str) -> str:
    """A verdict without its reason (what the reproduction map counts): "untestable at this model's level (...)"
    -> "untestable at this model's level"; other verdicts are returned as they are."""
    for category in (UNTESTABLE, NOT_TESTED):
        if verdict_text.startswith(category):
            return category
    return verdict_text


def at_floor(row: dict, d: Mapping[str, Any]) -> dict:
    """`row` (a judge() claim on difference `d`) with the AT_FLOOR verdict when both models scored 0 and the row
    was not already found untestable (rows that carry the original's interval are checked by `original_level`)."""
    if d.get("value") == 0 and d.get("baseline_value") == 0 and not is_untestable(row["verdict"]):
        row["verdict"] = AT_FLOOR
    return row


def equivalence_margin() -> float:
    """The largest change (a fraction) that "loses nothing" / "does not improve" tolerates: the smallest drop the
    paper itself calls a loss (Table 2's baseline TriviaQA drops start at 2.19 points). Why a margin: at small n a
    CI like [-25, +0] points "contains 0" yet allows a loss ten times the paper's, so it must not count as holding."""
    return load().claim("triviaqa_drop_baselines_table2")["range"][0] / 100


def verdict(ci_low: float | None, ci_high: float | None, expect: Expect, margin: float | None = None) -> str:
    """Whether a claimed direction holds, read off the 95% CI of a difference alone (ours minus the original,
    fractions; no multiplicity adjustment: `judge` decides on Holm-adjusted p-values, which for a family of one
    agree with this): "increase" holds when the CI is above 0 and "decrease" when below, else "inconclusive" (the
    CI contains 0) or "does not hold" (it excludes 0 on the other side). "no_loss" does not hold when the CI is
    below 0 and holds when it rules out any loss larger than `margin` (ci_low >= -margin); "no_gain" (the paper's
    "will not improve") mirrors it. In between, the CI allows a change the paper would call real: "inconclusive".
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


def decide(p_value: float, p_contrary: float, alpha: float = ALPHA) -> str:
    """"does not hold" when the contrary test rejects (p_contrary < alpha), else "holds" when the claim's test
    rejects its null (p_value < alpha), else "inconclusive"; "not measured" without a p-value."""
    if p_value is None or math.isnan(p_value):
        return "not measured"
    if p_contrary is not None and not math.isnan(p_contrary) and p_contrary < alpha:
        return "does not hold"
    return "holds" if p_value < alpha else "inconclusive"


def _null(expect: Expect, margin: float) -> tuple[float, str]:
    """(the null's boundary, the side of the claim's test) and the contrary test's, as used by `_claim_p`."""
    return {"increase": (0.0, "greater"), "decrease": (0.0, "less"), "no_loss": (-margin, "greater"),
            "no_gain": (margin, "less")}[expect]


def _claim_p(delta: Mapping[str, Any], expect: Expect, estimate: float | None, lo: float | None, hi: float | None
             ) -> tuple[float, float, bool]:
    """(p of the claim's null, p of the contrary null, read off the CI?) from a difference row: its own p-value
    columns, else approximated from its interval (kvlib.stats.p_from_interval) for rows that carry none."""

    column, contrary = CLAIM_P[expect]
    p, pc = delta.get(column), delta.get(contrary)
    if p is not None and pc is not None:
        return float(p), float(pc), False
    if estimate is None or lo is None or hi is None:
        return math.nan, math.nan, True
    null, side = _null(expect, equivalence_margin())
    contrary_side = "less" if expect in ("increase", "no_loss") else "greater"
    return (p_from_interval(estimate, lo, hi, null, side), p_from_interval(estimate, lo, hi, 0.0, contrary_side),
            True)


def h0_text(expect: Expect, unit: str = "points") -> str:
    """The claim's null hypothesis as printed in the claims table."""
    if expect in ("no_loss", "no_gain"):
        m = equivalence_margin()
        bound = f"{100 * m:.2f} points" if unit == "points" else f"{m:g}"
        return f"diff <= -{bound}" if expect == "no_loss" else f"diff >= +{bound}"
    return "diff <= 0" if expect == "increase" else "diff >= 0"


def original_level(d: Mapping[str, Any], chance: float, margin: float | None = None, metric: str = "",
                   value: str = "baseline_value") -> dict | None:
    """The original's score on a difference row's items (`baseline_value` with `baseline_ci_low`/`_high`; a
    balanced accuracy for FLenQA) with the chance rate (or floor) it must clear by `margin` (default
    `equivalence_margin()`: a claim about changes of that size needs that much room above chance). None when the
    row carries no interval of the original's score (nothing to check)."""
    lo, hi, v = d.get("baseline_ci_low"), d.get("baseline_ci_high"), d.get(value)
    if lo is None or hi is None or v is None or any(math.isnan(float(x)) for x in (lo, hi, v)):
        return None
    return {"value": float(v), "ci_low": float(lo), "ci_high": float(hi), "chance": float(chance),
            "margin": equivalence_margin() if margin is None else float(margin), "metric": metric}


def _level_text(level: Mapping[str, Any]) -> str:
    kind = "chance" if level["chance"] > 0 else "floor"
    what = f"{level['metric']} " if level["metric"] else ""
    return (f"{what}{100 * level['value']:.1f}% [{100 * level['ci_low']:.1f}, {100 * level['ci_high']:.1f}], "
            f"{kind} {100 * level['chance']:g}%")


def untestable_reason(levels: Sequence[Mapping[str, Any] | None]) -> str | None:
    """The UNTESTABLE verdict with its reason when an original's interval does not clear its chance rate by its
    margin (ci_low < chance + margin), else None."""
    for level in levels:
        if level is not None and level["ci_low"] < level["chance"] + level["margin"]:
            kind = "chance" if level["chance"] > 0 else "floor"
            what = f" {level['metric']}" if level["metric"] else ""
            return (f"{UNTESTABLE} (the original's{what} {100 * level['value']:.1f}% [{100 * level['ci_low']:.1f}, "
                    f"{100 * level['ci_high']:.1f}] does not clear {kind} {100 * level['chance']:g}% by "
                    f"{100 * level['margin']:.2f} points)")
    return None


def judge(artifact: str, claim: str, model: str, delta: Mapping[str, Any], expect: Expect,
          value: str = "delta", unit: str = "points", levels: Sequence[Mapping[str, Any] | None] = ()) -> dict:
    """One checked claim on a difference row (`value`, ci_low, ci_high, the p-value columns of
    kvlib.engine.evaluate.paired_deltas; n_pairs or n). unit "points": the row holds fractions, reported x100; any other
    unit (e.g. "nats") is reported as is. `artifact` is an id of the reference file's artifacts (e.g. "fig5").
    `levels`: the original's score(s) the claim needs clear of chance (`original_level`): if one does not, the
    verdict is UNTESTABLE with the reason. Otherwise the verdict is `decide` on the claim's p-values, unadjusted
    until `holm_families` adjusts the family (every *_claims function does). Columns: artifact, claim, model, n,
    delta, ci (95%, unadjusted), unit, ci_method, h0, p_value, p_holm, p_contrary, p_contrary_holm, family_size,
    original (its score and chance), verdict."""
    known = [a["id"] for a in load().artifacts]
    if artifact not in known:
        raise ValueError(f"unknown paper artifact {artifact!r}; known: {', '.join(known)}")
    if expect not in EXPECTS:
        raise ValueError(f"expect must be one of {', '.join(EXPECTS)}, got {expect!r}")
    scale, digits = (100, 1) if unit == "points" else (1, 3)
    lo, hi, v = (None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)
                 for x in (delta.get("ci_low"), delta.get("ci_high"), delta.get(value)))
    p, pc, from_ci = _claim_p(delta, expect, v, lo, hi)
    method = str(delta.get("ci_method") or "")
    if from_ci and lo is not None:
        method = (method + "; " if method else "") + "p read off the CI (normal approximation)"
    reason = untestable_reason(levels)
    text = "not measured" if lo is None or hi is None else reason or decide(p, pc)
    tested = text in ("holds", "does not hold", "inconclusive")  # a family of one until holm_families adjusts
    return {"artifact": artifact, "claim": claim, "model": model, "n": delta.get("n_pairs", delta.get("n")),
            "delta": None if v is None else round(scale * v, 9) + 0.0,  # no -1.8e-15 from float means, no -0.0
            "ci": "" if lo is None or hi is None else f"[{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]",
            "unit": unit, "ci_method": method, "h0": h0_text(expect, unit),
            "p_value": p, "p_holm": p if tested else math.nan, "p_contrary": pc,
            "p_contrary_holm": pc if tested else math.nan, "family_size": 1 if tested else None,
            "original": "; ".join(_level_text(level) for level in levels if level is not None),
            "verdict": text}


# ------------------------------------------------------------------------- pre-registered primary claims
#
# A profile may state before any run which contrast of each main claim is primary and the 95% interval half-width
# it must reach (`primary:` in a notebook's params, `PrimaryClaim`). Its claims tables then say which claims are
# primary (ROLE column) and how wide their intervals came out (HALF_WIDTH, MAX_HALF_WIDTH); the primary claims of
# an artifact are their own Holm family and every other claim of it is exploratory, adjusted in a family of its
# own (`holm_families`). Without a `primary:` section the tables and families are as they always were.

PRIMARY, EXPLORATORY = "primary", "exploratory"
ROLE, HALF_WIDTH, MAX_HALF_WIDTH = "role", "half_width", "max_half_width"
# what a notebook records of its claims in the manifest (facts): the verdicts, and the roles where it has them
CLAIM_FACTS = ("artifact", "claim", "model", "verdict", ROLE, HALF_WIDTH, MAX_HALF_WIDTH)
CONTRAST = "contrast"  # a primary claim's MDQA setting for Fig. 10's contrast (random minus retrieved)


@dataclass(frozen=True)
class PrimaryClaim:
    """A pre-registered primary contrast (an entry of a notebook's `primary:` params): `artifact`'s claim on
    `model` (a label of the notebook's models or seed groups) minus the original, in MDQA `setting` (random,
    retrieved, or contrast: the gain with random minus the gain with retrieved distractors, per question) or on
    general `benchmark` (its headline metric, or `metric`), and `max_half_width`, the 95% interval half-width in
    points it must reach. Before any item file measured the spread, the planner assumes `prior_sd` (points: the
    standard deviation of a unit's paired difference) and `prior_level` (percent: the original's score; default
    50, where Newcombe's floor is widest)."""

    artifact: str
    model: str
    max_half_width: float
    setting: str | None = None
    benchmark: str | None = None
    metric: str | None = None
    prior_sd: float | None = None
    prior_level: float | None = None

    def validate(self) -> None:
        known = [a["id"] for a in load().artifacts if a["claims"]]
        if self.artifact not in known:
            fail("artifact", f"unknown paper artifact {self.artifact!r}; artifacts with claims: {', '.join(known)}")
        if not self.max_half_width > 0:
            fail("max_half_width", f"must be > 0 (points), got {self.max_half_width}")
        if self.prior_sd is not None and not self.prior_sd >= 0:
            fail("prior_sd", f"must be >= 0 (points), got {self.prior_sd}")
        if self.prior_level is not None:
            check_fraction("prior_level", self.prior_level / 100)

    def describe(self) -> str:
        what = self.setting or (self.benchmark + (f" {self.metric}" if self.metric else "") if self.benchmark else "")
        return f"{self.artifact} {self.model} {what}".strip()

    def matches(self, artifact: str, model: str, setting: str | None = None, benchmark: str | None = None,
                metric: str | None = None, headline: str | None = None) -> bool:
        """Whether a claim (artifact, model, MDQA setting label or benchmark and metric) is this one."""
        if (artifact, model) != (self.artifact, self.model):
            return False
        if self.setting is not None:
            return setting == self.setting
        return benchmark == self.benchmark and metric == (self.metric or headline)


def claim_facts(claims: Any) -> list[dict]:
    """What a notebook records of its claims table (a DataFrame) in the manifest: the CLAIM_FACTS columns it has,
    one mapping per claim, a missing value (NaN) as None."""
    records = claims[[c for c in CLAIM_FACTS if c in claims]].to_dict("records")
    return [{c: None if isinstance(v, float) and math.isnan(v) else v for c, v in r.items()} for r in records]


def with_role(row: dict, primary: Sequence[PrimaryClaim] | None, **claim: Any) -> dict:
    """`row` (a judge() claim) with its ROLE, the HALF_WIDTH its interval reached (points, or the claim's unit)
    and the MAX_HALF_WIDTH it was pre-registered with, when the notebook pre-registered primary claims
    (`primary`, matched on `claim`: PrimaryClaim.matches' fields); unchanged without them."""
    if not primary:
        return row
    declared = next((p for p in primary if p.matches(row["artifact"], row["model"], **claim)), None)
    lo, hi = claim_interval(row)
    return {**row, ROLE: PRIMARY if declared else EXPLORATORY,
            HALF_WIDTH: None if lo is None else round((hi - lo) / 2, 6),
            MAX_HALF_WIDTH: declared.max_half_width if declared else None}


def _tested(row: Mapping[str, Any]) -> bool:
    p = row.get("p_value")
    return (row["verdict"] in ("holds", "does not hold", "inconclusive") and p is not None
            and not math.isnan(float(p)))


def holm_families(rows: Sequence[Mapping[str, Any]], alpha: float = ALPHA) -> list[dict]:
    """Claims with their p-values Holm-adjusted within each artifact's family (kvlib.stats.holm), the tested
    claims of one artifact (untestable and unmeasured ones are not tests and stay out): `p_holm` and
    `p_contrary_holm` set, `family_size` the number of claims adjusted together, and the verdict decided on the
    adjusted p-values (`decide`), so one nominally significant claim among many does not make an artifact
    "partly hold". Idempotent: it adjusts the raw p_value/p_contrary columns, so a notebook that judges an
    artifact's claims in parts adjusts the whole list once more at the end. Rows with a ROLE (a notebook that
    pre-registered primary claims: `with_role`) are adjusted in two families per artifact, its primary claims and
    its exploratory ones."""

    out = [dict(r) for r in rows]
    for r in out:
        if not _tested(r):  # not a test: nothing to adjust, in no family
            r.update(p_holm=math.nan, p_contrary_holm=math.nan, family_size=None)
    # an artifact's family; with pre-registered claims (ROLE), its primary claims and its exploratory ones apart
    for key in dict.fromkeys((r["artifact"], r.get(ROLE)) for r in out):
        family = [r for r in out if (r["artifact"], r.get(ROLE)) == key and _tested(r)]
        contrary = [math.nan if r.get("p_contrary") is None else float(r["p_contrary"]) for r in family]
        known = [i for i, pc in enumerate(contrary) if not math.isnan(pc)]
        adjusted_contrary = dict(zip(known, holm([contrary[i] for i in known])))
        for i, (r, p) in enumerate(zip(family, holm([float(r["p_value"]) for r in family]))):
            pc = adjusted_contrary.get(i, math.nan)
            r.update(p_holm=p, p_contrary_holm=pc, family_size=len(family), verdict=decide(p, pc, alpha))
    return out


def token_loss_claims(rows: Sequence[Mapping[str, Any]], pairs: Sequence[tuple[str, str]], model: str = "original",
                      seed: int = 0) -> list[dict]:
    """Fig. 4: with the answer template, the loss on the answer's formatting tokens is lower than without it
    (so finetuning concentrates on the value). `rows`: kvlib.engine.train.answer_token_losses rows with a "run" column;
    `pairs`: (run with template, run without) on the same samples (same item index). Per sample, the mean loss
    over its "format" tokens; the paired difference (with minus without) must be below 0: the paired t test
    (kvlib.stats.paired_difference_test; losses are unbounded, so no floor), Holm-adjusted over the pairs.
    `seed` is kept for compatibility (nothing is resampled)."""

    def per_sample(run: str) -> dict[str, float]:
        losses: dict[str, list[float]] = {}
        for r in rows:
            if r["run"] == run and r["model"] == model and r["kind"] == "format":
                losses.setdefault(str(r["id"]).rsplit("-", 1)[-1], []).append(float(r["loss"]))
        return {k: sum(v) / len(v) for k, v in losses.items()}

    out = []
    for with_t, without in pairs:
        a, b = per_sample(with_t), per_sample(without)
        keys = [k for k in a if k in b]
        if not keys:
            continue
        test = paired_difference_test([a[k] for k in keys], [b[k] for k in keys])
        out.append(judge("fig4", f"the answer template lowers the {model} model's loss on formatting tokens "
                                 f"({with_t} minus {without}, mean per sample)", model,
                         {"delta": test.estimate, **test.row(equivalence_margin()), "n": len(keys)}, "decrease",
                         unit="nats"))
    return holm_families(out)


def _mdqa_level(d: Mapping[str, Any]) -> dict | None:

    return original_level(d, MDQA_CHANCE, metric="accuracy")


def mdqa_claims(pooled: Sequence[Mapping[str, Any]], synthetic: Sequence[str], random_label: str,
                retrieved_label: str, contrast_label: str | None = None,
                primary: Sequence[PrimaryClaim] | None = None) -> list[dict]:
    """Figs. 5 and 10 from MDQA paired deltas pooled over gold positions (one row per model and setting;
    kvlib.engine.evaluate.mdqa_pooled_deltas): synthetic finetuning improves MDQA with random distractors (Fig. 5), does
    not with retrieved ones (Fig. 10, "no gain"), and, Fig. 10's point, gains more with random distractors than
    with retrieved ones (the contrast row, setting `contrast_label`, default kvlib.tasks.mdqa.SETTING_CONTRAST: the gain
    with random minus the gain with retrieved, paired by question). Each claim needs the original to clear
    MDQA's floor in the settings it involves. Holm-adjusted per figure; with `primary` (the notebook's
    pre-registered claims) per figure and role (`with_role`)."""

    contrast_label = SETTING_CONTRAST if contrast_label is None else contrast_label
    by_setting = {(d["model"], d.get("setting")): d for d in pooled}
    short = {random_label: "random", retrieved_label: "retrieved", contrast_label: CONTRAST}  # PrimaryClaim.setting
    out = []
    for d in pooled:
        if d["model"] not in synthetic or d.get("setting") not in short:
            continue
        if d.get("setting") == random_label:
            out.append(judge("fig5", "synthetic finetuning improves MDQA, random distractors (mean over positions)",
                             d["model"], d, "increase", "delta_correct", levels=[_mdqa_level(d)]))
        elif d.get("setting") == retrieved_label:
            out.append(judge("fig10", "synthetic finetuning does not improve MDQA with retrieved distractors "
                                      "(mean over positions)", d["model"], d, "no_gain", "delta_correct",
                             levels=[_mdqa_level(d)]))
        elif d.get("setting") == contrast_label:
            levels = [_mdqa_level(by_setting[(d["model"], s)]) if (d["model"], s) in by_setting else None
                      for s in (random_label, retrieved_label)]
            out.append(judge("fig10", "synthetic finetuning gains more on MDQA with random distractors than with "
                                      "retrieved ones (gain with random minus gain with retrieved, paired by "
                                      "question, mean over positions)", d["model"], d, "increase", "delta_correct",
                             levels=levels))
        out[-1] = with_role(out[-1], primary, setting=short[d.get("setting")])
    return holm_families(out)


def longer_context_claims(pooled: Sequence[Mapping[str, Any]], synthetic: Sequence[str], num_documents: int,
                          primary: Sequence[PrimaryClaim] | None = None) -> list[dict]:
    """Fig. 9 from MDQA paired deltas pooled over gold positions at the longer context: finetuning on long
    key-value prompts improves MDQA with many documents (the original must clear MDQA's floor). Holm-adjusted.
    Judged only for a finetune that learned its own task: `mark_not_tested` marks the others. `primary`: the
    notebook's pre-registered claims (`with_role`; random distractors are its only setting)."""
    return holm_families([
        with_role(judge("fig9", f"finetuning on long key-value prompts improves {num_documents}-document MDQA "
                            f"(random distractors, mean over positions)", d["model"], d, "increase", "delta_correct",
                        levels=[_mdqa_level(d)]), primary, setting="random")
        for d in pooled if d["model"] in synthetic and d.get("setting") != SETTING_CONTRAST])


def mark_not_tested(claims: Sequence[Mapping[str, Any]], reasons: Mapping[str, str]) -> list[dict]:
    """`claims` with every claim on a model (or seed group) of `reasons` (label -> why it did not learn its own
    task, kvlib.pipeline.runs.LearnedGate) given the NOT_TESTED verdict with that reason: transfer from a finetune
    that did not learn the task it was trained on is not evidence either way. Those claims leave their Holm
    families, whose other claims are adjusted again without them."""
    return holm_families([{**c, "verdict": f"{NOT_TESTED} ({reasons[c['model']]})"} if c["model"] in reasons
                          else dict(c) for c in claims])


def flenqa_level(d: Mapping[str, Any], rows: Sequence[Mapping[str, Any]] | None = None) -> dict | None:
    """The original's FLenQA level for a difference row (model, style; `base`): its balanced accuracy with CI on
    that style's scored prompts when the item `rows` are given (kvlib.tasks.flenqa.balanced_accuracy_table), else its
    accuracy on the paired prompts (the same point when labels are balanced, as the generator makes them);
    chance kvlib.tasks.flenqa.FLENQA_CHANCE (0.5)."""

    if rows is not None and d.get("base") is not None:
        style_rows = [r for r in rows if r["model"] == d["base"] and r["style"] == d["style"]]
        if style_rows:
            (ba,) = balanced_accuracy_table(style_rows, ["style"])
            return original_level({"baseline_value": ba["balanced_accuracy"],
                                   "baseline_ci_low": ba["balanced_accuracy_ci_low"],
                                   "baseline_ci_high": ba["balanced_accuracy_ci_high"]}, FLENQA_CHANCE,
                                  metric="balanced accuracy")
    return original_level(d, FLENQA_CHANCE, metric="accuracy")


def flenqa_claims(pooled: Sequence[Mapping[str, Any]], synthetic: Sequence[str],
                  rows: Sequence[Mapping[str, Any]] | None = None, artifact: str = "fig6_7") -> list[dict]:
    """Figs. 6-7 from FLenQA paired deltas pooled over lengths (one row per model and prompt style): synthetic
    finetuning improves FLenQA. Each claim needs the original's balanced accuracy on that style (from the item
    `rows`; without them its accuracy) to clear chance (`flenqa_level`). Holm-adjusted per artifact."""
    return holm_families([
        judge(artifact, f"synthetic finetuning improves FLenQA ({d['style']} prompts, pooled over lengths)",
              d["model"], d, "increase", "delta_correct", levels=[flenqa_level(d, rows)])
        for d in pooled if d["model"] in synthetic])


def published_delta_values(benchmark: str, finetuning: str = "key-value, with template") -> dict[str, float]:
    """The paper's own difference (points, rounded to the printed 2 decimals) for `benchmark`, `finetuning` minus
    original, per model that has both: {"Mistral-7B-Instruct-v0.1": 0.02, "GPT-3.5 Turbo (1106)": -0.32}."""
    rows = {(r["model"], r["finetuning"]): r["scores"] for r in load().general_benchmarks}
    out = {}
    for (model, ft), scores in rows.items():
        base = rows.get((model, "original"), {})
        if ft == finetuning and benchmark in scores and benchmark in base:
            out[model] = round(scores[benchmark] - base[benchmark], 2)
    return out


def published_deltas(benchmark: str, finetuning: str = "key-value, with template") -> str:
    """`published_delta_values` as text ("Mistral-7B-Instruct-v0.1: +0.02; GPT-3.5 Turbo (1106): -0.32"), the
    claims tables' `published_delta_points` column."""
    return "; ".join(f"{model}: {v:+.2f}" for model, v in published_delta_values(benchmark, finetuning).items())


def parse_published(text: Any) -> dict[str, float]:
    """A `published_delta_points` cell back as {model: points} (empty for a missing cell)."""
    if not isinstance(text, str) or not text.strip():
        return {}
    out = {}
    for part in text.split("; "):
        model, _, value = part.rpartition(": ")
        try:
            out[model.strip()] = float(value)
        except ValueError:
            continue
    return out


def general_level(d: Mapping[str, Any]) -> dict | None:
    """The original's level on a general-benchmark difference row: its score on the paired items with CI, against
    the task's declared chance rate and margin (kvlib.tasks.general.TaskSpec.chance, chance_margin)."""

    spec = TASKS.get(d.get("task"))
    if spec is None:
        return None
    return original_level(d, spec.chance, spec.chance_margin, metric=str(d.get("metric", "")))


def judge_general(artifact: str, claim: str, d: Mapping[str, Any], expect: Expect, deltas: Sequence[Mapping[str, Any]],
                  floor_metric: str | None = None) -> list[dict]:
    """A claim on general-benchmark difference `d` (a kvlib.tasks.general.paired_deltas row): judge() it with the
    original's level (`general_level`: untestable when the original does not clear the task's chance rate or
    floor; AT_FLOOR when both models scored 0 on a row without the original's interval). When untestable and the
    task declares a `floor_metric`, the same claim is judged again on that metric's difference for the same model
    and task (from `deltas`), its metric named in the claim text, so a floor on the strict metric does not leave
    the claim unmeasured when the lenient one has signal. Not Holm-adjusted: the caller adjusts the family."""
    out = [at_floor(judge(artifact, claim, d["model"], d, expect, levels=[general_level(d)]), d)]
    if is_untestable(out[0]["verdict"]) and floor_metric and floor_metric != d["metric"]:
        alt = next((x for x in deltas if x["model"] == d["model"] and x["task"] == d["task"]
                    and x["metric"] == floor_metric and x.get("baseline") == d.get("baseline")), None)
        if alt is not None:
            why = (f"{d['metric']} is 0 for both models" if d.get("value") == 0 and d.get("baseline_value") == 0
                   else f"{d['metric']} is untestable")
            out.append(at_floor(judge(artifact, f"{claim} ({floor_metric}; {why})", d["model"], alt, expect,
                                      levels=[general_level(alt)]), alt))
    return out


def general_claims(deltas: Sequence[Mapping[str, Any]], synthetic: Sequence[str], headline: Mapping[str, str],
                   titles: Mapping[str, str], artifact: str = "table1",
                   floor_metrics: Mapping[str, str | None] | None = None,
                   primary: Sequence[PrimaryClaim] | None = None) -> list[dict]:
    """Table 1 (or 2): synthetic finetuning loses nothing on each general benchmark's headline metric, with the
    paper's own difference for its key-value (with template) models beside ours. `floor_metrics` (task -> metric,
    default: each kvlib.general task's floor_metric): what an untestable claim is also judged on (judge_general).
    Holm-adjusted over the table's claims; with `primary` (the notebook's pre-registered claims) per role
    (`with_role`)."""
    if floor_metrics is None:

        floor_metrics = {name: spec.floor_metric for name, spec in TASKS.items()}
    out = []
    for d in deltas:
        if d["model"] not in synthetic or d["metric"] != headline[d["task"]]:
            continue
        rows = judge_general(artifact, f"synthetic finetuning loses nothing on {titles[d['task']]}", d, "no_loss",
                             deltas, floor_metrics.get(d["task"]))
        for row, metric in zip(rows, (d["metric"], floor_metrics.get(d["task"]))):
            row = with_role(row, primary, benchmark=d["task"], metric=metric, headline=headline[d["task"]])
            out.append({**row, "published_delta_points": published_deltas(d["task"])})
    return holm_families(out)


# -------------------------------------------------------------------------------- reproduction map

def artifact_verdict(verdicts: Sequence[str]) -> str:
    """One verdict for an artifact from its claims' verdicts (Holm-adjusted within the artifact: `holm_families`):
    all hold -> "holds"; some hold -> "partly holds"; none holds but some are inconclusive -> "inconclusive at this
    n"; all fail -> "does not hold on this model". Claims not measured or untestable (at chance or the floor) do
    not count; when none is left, the first untestable category (UNTESTABLE, AT_FLOOR) is the artifact's."""
    measured = [v for v in verdicts if v != "not measured" and not is_untestable(v)]
    if not measured:
        untestable = [verdict_category(v) for v in verdicts if is_untestable(v)]
        return untestable[0] if untestable else "not measured"
    if all(v == "holds" for v in measured):
        return "holds"
    if any(v == "holds" for v in measured):
        return "partly holds"
    if any(v == "inconclusive" for v in measured):
        return "inconclusive at this n"
    return "does not hold on this model"




# ------------------------------------------------------------------------------------ the claims figure

_CI = re.compile(r"\[\s*([-+]?[\d.]+(?:e[-+]?\d+)?)\s*,\s*([-+]?[\d.]+(?:e[-+]?\d+)?)\s*\]")
# a claim's expectation read off its text, for claims tables written before the `h0` column existed
_EXPECT_WORDS = (("loses nothing", "no_loss"), ("does not improve", "no_gain"), ("loses on", "decrease"),
                 ("lowers", "decrease"), ("improves", "increase"), ("gains more", "increase"))


def claim_expectation(claim: Mapping[str, Any]) -> str | None:
    """Which of EXPECTS a claims-table row tests: from its `h0` (`h0_text`), else from the claim's wording."""
    h0 = claim.get("h0")
    if isinstance(h0, str) and h0:
        for expect in EXPECTS:
            if h0 in (h0_text(expect, "points"), h0_text(expect, "nats")):
                return expect
    text = str(claim.get("claim", ""))
    return next((expect for words, expect in _EXPECT_WORDS if words in text), None)


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def claim_interval(claim: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """The 95% interval of a claims-table row in its unit: numeric `ci_low`/`ci_high` if present, else read off
    the printed `ci` ("[-1.5, +6.3]"); (None, None) when the claim has none."""
    lo, hi = _number(claim.get("ci_low")), _number(claim.get("ci_high"))
    if lo is not None and hi is not None:
        return lo, hi
    match = _CI.search(str(claim.get("ci") or ""))
    return (float(match.group(1)), float(match.group(2))) if match else (None, None)


def _short_claim(claim: str, width: int = 88) -> str:
    text = claim.removeprefix("synthetic finetuning ")
    return text if len(text) <= width else text[:width - 1].rstrip() + "…"


def half_width_text(half: float | None, limit: float | None) -> str:
    """A primary claim's half-width reached against the one pre-registered ("+-3.15 of +-3"; "+-3.15" without a
    limit), as the claims figure and the README map both print it: two decimals, so a width just over its limit
    (3.04 against 3) never reads as meeting it."""
    reached = "no interval" if half is None else f"\u00b1{float(half):.2f}"
    return reached if limit is None else f"{reached} of \u00b1{float(limit):g}"


def _primary_prefix(half: float | None, limit: float | None) -> str:
    """How the claims figure labels a primary claim: "PRIMARY (+-6.10 of +-3 pre-registered) "."""
    return f"PRIMARY ({half_width_text(half, limit)}" + ("" if limit is None else " pre-registered") + ") "


def forest_rows(claims: Sequence[Mapping[str, Any]], notes: Mapping[str, str] | None = None) -> list[dict]:
    """The claims figure's rows (kvlib.report.plots.claims_forest) from claims-table rows of any notebooks (each
    notebook's claims.csv, or the claims the manifest recorded): grouped by artifact in the paper's order, each
    with `label` (model and claim), `unit`, `delta` and its 95% interval (`ci_low`, `ci_high`; None when the row
    has none, e.g. a claim recorded without its numbers), `verdict` and its `category` (`verdict_category`),
    `expect`, `margin` (the equivalence margin in the claim's unit, for "loses nothing" / "does not improve"
    claims in points; else None) and `published` (the paper's own differences, {model: points}, from
    `published_delta_points`), `no_interval` (for a row without an interval, what the figure writes in its
    place: why it was not tested, or "no interval recorded"; else None), and, for claims tables with roles
    (`with_role`), `role` with the `half_width` reached and the `max_half_width` pre-registered (a primary claim's
    label says both). `notes`: artifact id -> a note for its group heading (e.g. "stale")."""
    titles = {a["id"]: a["title"] for a in load().artifacts}
    order = {a["id"]: i for i, a in enumerate(load().artifacts)}
    rows = []
    for i, claim in enumerate(claims):
        artifact = str(claim.get("artifact", ""))
        expect = claim_expectation(claim)
        unit = str(claim.get("unit") or "points")
        lo, hi = claim_interval(claim)
        verdict_text = str(claim.get("verdict", "not measured"))
        why = not_tested_reason(verdict_text)
        heading = titles.get(artifact, artifact)
        if notes and notes.get(artifact):
            heading += f" ({notes[artifact]})"
        role = str(claim.get(ROLE) or "")
        # the half-width `with_role` recorded, so the figure and the map print one number
        half = _number(claim.get(HALF_WIDTH))
        if half is None and lo is not None:
            half = (hi - lo) / 2
        limit = _number(claim.get(MAX_HALF_WIDTH))
        prefix = _primary_prefix(half, limit) if role == PRIMARY else ""
        label = f"{prefix}{claim.get('model', '')}: {_short_claim(str(claim.get('claim', '')), 88 - len(prefix))}"
        rows.append({
            "artifact": artifact, "heading": heading, "claim": str(claim.get("claim", "")),
            "model": str(claim.get("model", "")), "role": role, "half_width": half, "max_half_width": limit,
            "label": label,
            # what the figure writes where the interval would be: a finetune left out says how far from learning
            "no_interval": None if lo is not None else f"not tested: {why}" if why else "no interval recorded",
            "unit": unit, "delta": _number(claim.get("delta")), "ci_low": lo, "ci_high": hi,
            "verdict": verdict_text, "category": verdict_category(verdict_text), "expect": expect,
            "margin": 100 * equivalence_margin() if expect in ("no_loss", "no_gain") and unit == "points" else None,
            "published": parse_published(claim.get("published_delta_points")),
            "_order": (order.get(artifact, len(order)), i),
        })
    rows.sort(key=lambda r: r["_order"])
    for r in rows:
        del r["_order"]
    return rows
