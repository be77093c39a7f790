"""Notebook 06's study (Fig. 8, Table 2): build the baseline sets of kvlib.tasks.baseline_sets token-matched to
a synthetic run, check them for contamination, train them with that run's recipe, evaluate them with the
runners of notebooks 03-05, and judge the paper's baseline claims.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from kvlib.engine import evaluate
from kvlib.engine.evaluate import group_rows
from kvlib.engine.config import ParamError
from kvlib.engine.io import file_sha256
from kvlib.engine.train import LauncherConfig
from kvlib.pipeline.notebooks import (
    PAPER_MODEL,
    PAPER_ROWS,
    BaselinesNotebookParams,
    baseline_slug,
    profile_finetune_params,
    synthetic_models,
    table2_reference_rows,
)
from kvlib.pipeline.runs import LearnedGate, open_model, ready_job, train_run
from kvlib.report import paper
from kvlib.tasks import flenqa, general, mdqa
from kvlib.tasks.baseline_sets import BaselineConfig, ensure_baseline, matched_config, sample_lengths, token_counter_for
from kvlib.tasks.contamination import check_contamination, load_eval_reference
from kvlib.tasks.flenqa import FLenQAConfig
from kvlib.tasks.general import HEADLINES, TASKS, TITLES, headline_keys
from kvlib.tasks.mdqa import MDQA_CHANCE, SETTING_RANDOM
from kvlib.tasks.synthetic import ensure_dataset, load_dataset, load_template


@dataclass
class PreparedBaseline:
    """A baseline set on disk, token-matched and checked, with the training run that learns it."""

    label: str
    config: BaselineConfig  # matched (token_total and sample_tokens from the synthetic set)
    data_dir: Path
    tokens: dict  # token_report
    contamination: Any  # kvlib.tasks.contamination.ContaminationReport
    train_config: Any  # kvlib.engine.train.TrainConfig: the matched run's recipe on this set



def evaluation_reference(P: BaselinesNotebookParams, mdqa_sets: Mapping | None = None, flenqa_config=None):
    """Every evaluation set the guard compares with: the default reference (kvlib.tasks.contamination) plus the
    MDQA sets this notebook evaluates, and FLenQA drawn at the evaluated seed for at least the release's
    100 problems per task (a superset of the evaluated problems)."""

    if flenqa_config is not None:
        flenqa_config = dataclasses.replace(
            flenqa_config, samples_per_task=max(flenqa_config.samples_per_task, FLenQAConfig().samples_per_task))
    return load_eval_reference(P.source_data_dir, mdqa_sets=mdqa_sets, flenqa=flenqa_config)



def synthetic_lengths(P: BaselinesNotebookParams, count_tokens=None) -> tuple[Path, list[int]]:
    """The matched synthetic set (written now if missing) and its per-sample prompt + answer tokens."""

    job = P.match_job()
    ensure_dataset(job.data_config, job.data_dir)
    count_tokens = count_tokens or token_counter_for(P.baseline_config(next(iter(P.baselines))))
    return job.data_dir, sample_lengths(load_dataset(job.data_dir, "train"), count_tokens)



def prepare_baselines(P: BaselinesNotebookParams, reference, count_tokens=None) -> dict[str, PreparedBaseline]:
    """Every baseline set of P: matched to the synthetic set of `match` (matched_config), built (or read back
    when its directory holds the same config), checked against `reference` (kvlib.tasks.contamination: raises on any
    overlap), with its training config (the match run's recipe; out_dir keyed by the data's sha256)."""

    job = ready_job(profile_finetune_params(P.profile, P.params_root), P.match_job().name)  # the sweep's values
    if job.not_trained is not None:
        raise ParamError(f"match: run {P.match!r} has no recipe for the baselines to reuse: {job.not_trained}")
    ensure_dataset(job.data_config, job.data_dir)
    counters: dict[str, Callable] = {}
    out = {}
    for label in P.baselines:
        raw = P.baseline_config(label)
        if count_tokens is None and raw.tokenizer not in counters:
            counters[raw.tokenizer] = token_counter_for(raw)
        count = count_tokens or counters[raw.tokenizer]
        cfg = matched_config(raw, job.data_dir, count)
        where = P.baseline_dir(label)
        tokens = ensure_baseline(cfg, where, count, reference)["tokens"]
        guard = check_contamination(where, reference, name=label)  # again on the files as written
        train_file = where / "train.jsonl"
        train_config = dataclasses.replace(
            job.train_config, train_file=str(train_file),
            out_dir=str(Path(P.models_dir) / P.profile / "baselines" / f"{baseline_slug(label)}-{file_sha256(train_file)[:8]}"))
        train_config.validate()
        out[label] = PreparedBaseline(label, cfg, where, tokens, guard, train_config)
    return out



def token_matching_table(synthetic_name: str, synthetic: Sequence[int], prepared: Mapping[str, PreparedBaseline],
                         tolerance: float | None = None) -> list[dict]:
    """One row per training set: samples, total tokens and its ratio to the synthetic set's, per-sample
    min/mean/max, and whether the total is within tolerance and every sample within the synthetic range."""
    total, lo, hi = sum(synthetic), min(synthetic), max(synthetic)
    rows = [{"set": synthetic_name, "kind": "synthetic", "n": len(synthetic), "total_tokens": total,
             "ratio_to_synthetic": 1.0, "min": lo, "mean": round(statistics.fmean(synthetic), 1), "max": hi,
             "within_tolerance": True, "in_synthetic_range": True}]
    for label, b in prepared.items():
        t = b.tokens
        tol = b.config.token_tolerance if tolerance is None else tolerance
        rows.append({"set": label, "kind": b.config.kind, "n": t["n"], "total_tokens": t["total_tokens"],
                     "ratio_to_synthetic": round(t["total_tokens"] / total, 4), "min": t["min"], "mean": t["mean"],
                     "max": t["max"], "within_tolerance": abs(t["total_tokens"] - total) <= tol * total,
                     "in_synthetic_range": lo <= t["min"] and t["max"] <= hi})
    return rows



def contamination_table(prepared: Mapping[str, PreparedBaseline], synthetic=None) -> list[dict]:
    """One row per checked training set: what the guard compared and the NQ-Open questions to exclude."""
    reports = ([synthetic] if synthetic is not None else []) + [b.contamination for b in prepared.values()]
    return [{"set": r.name, "samples": r.samples, "questions_checked": r.questions_checked,
             "gold_passages_checked": r.passages_checked, "overlaps": 0,
             "nq_open_questions_to_exclude": len(r.nq_open_overlap),
             "evaluation_sets": ", ".join(f"{k} ({v})" for k, v in r.reference_sizes.items())} for r in reports]



def train_baselines(prepared: Mapping[str, PreparedBaseline], launcher: LauncherConfig | None = None) -> dict[str, dict]:
    """Train every baseline the way the profile's runs train (`launcher`: kvlib.pipeline.runs.train_run; a finished
    run is reused, an interrupted one resumes); label -> the run summary (model_dir, steps, tokens, loss)."""

    return {label: train_run(b.train_config, launcher, where=f"baseline {label}") for label, b in prepared.items()}



@dataclass(frozen=True)
class AnswerFormat:
    """The reply a baseline was trained to give when it writes something before its answer (MultidocQA first
    restates the original text): `preamble` opens such a reply and `marker` introduces the answer. Its final
    answer is the text after the last marker; a reply that opened the preamble and never reached the marker was
    cut by the token budget and answered nothing (scored whole, the quoted gold sentence would count as an
    answer). Any other reply is its own answer."""

    preamble: str
    marker: str

    def final_answer(self, reply: str) -> str:
        if self.marker in reply:
            return reply.rsplit(self.marker, 1)[1].strip()
        return "" if reply.lstrip().startswith(self.preamble) else reply



def answer_format(kind: str) -> AnswerFormat | None:
    """The answer format a kind's training targets teach, read from its answer template; None: the target is
    the answer alone."""
    if kind != "multidocqa":
        return None
    head, rest = load_template("baseline_multidocqa.answer").split("{quotes}")
    return AnswerFormat(preamble=head.strip(), marker=rest.split("{answer}")[0].strip())



def mdqa_answer_rules(P: BaselinesNotebookParams) -> dict[str, tuple[AnswerFormat, int]]:
    """label -> (answer format, MDQA max_new_tokens) for each baseline whose targets put text before the answer:
    the profile's MDQA budget plus the longest target of its training set (tokens, recorded at generation), so
    the restatement it was trained to write cannot use up the tokens of its answer. With the plain budget the
    regenerated MultidocQA model is cut inside its quotes on nearly every question."""
    M = P.mdqa_params()
    out = {}
    for label, spec in P.baselines.items():
        fmt = answer_format(spec["kind"])
        if fmt is not None and M is not None:
            longest = max(s.meta["n_answer_tokens"] for s in load_dataset(P.baseline_dir(label), "train"))
            out[label] = (fmt, M.max_new_tokens + longest)
    return out



def answer_format_table(mdqa_rows: Sequence[dict], P: BaselinesNotebookParams) -> list[dict]:
    """Per model and MDQA setting: the token budget, how many replies opened a restatement (any baseline's
    preamble), how many of those reached the answer marker, and accuracy; so a budget that cuts answers off
    shows here instead of as a low score."""

    formats = [f for f in (answer_format(spec["kind"]) for spec in P.baselines.values()) if f is not None]
    out = []
    for (model, setting), rows in group_rows(mdqa_rows, ["model", "setting"]).items():
        replies = [r["response"] for r in rows if r["response"] is not None]
        opened = [x for x in replies if any(x.lstrip().startswith(f.preamble) for f in formats)]
        scored = [float(r["correct"]) for r in rows if r["correct"] is not None]
        out.append({"model": model, "setting": setting, "max_new_tokens": rows[0].get("max_new_tokens"),
                    "replies": len(replies), "opened_restatement": len(opened),
                    "reached_answer": sum(any(f.marker in x for f in formats) for x in opened),
                    "accuracy": sum(scored) / len(scored) if scored else None})
    return out



def evaluate_models(configs: Mapping[str, Any], P: BaselinesNotebookParams, mdqa_sets=None, flenqa_records=None,
                    general_tasks=None) -> dict[str, list[dict]]:
    """Each model loaded once and run through the sections' pipelines (those of notebooks 03, 04, 05);
    {"mdqa": rows, "flenqa": rows, "general": rows}. On MDQA a baseline that restates before answering gets
    the budget and final-answer scoring of `mdqa_answer_rules`; FLenQA and the general benchmarks keep their
    protocols (the harness cuts general replies at its stop strings)."""

    M, F, G = P.mdqa_params(), P.flenqa_params(), P.general_params()
    rules = mdqa_answer_rules(P) if mdqa_sets else {}
    rows: dict[str, list[dict]] = {"mdqa": [], "flenqa": [], "general": []}
    for label, config in configs.items():
        fmt, budget = rules.get(label, (None, M.max_new_tokens if M is not None else 0))
        with open_model(config, P.cache_dir, P.profile, P.params_root) as model:
            for s in (mdqa_sets or {}).values():
                rows["mdqa"] += mdqa.evaluate_mdqa(model, s, M.positions, budget, label,
                                                       None if fmt is None else fmt.final_answer)
            if flenqa_records:
                for style in F.styles:
                    answers = evaluate.answer_requests(model, flenqa.build_requests(flenqa_records, style),
                                                       F.new_tokens(style))
                    rows["flenqa"] += flenqa.result_rows(flenqa_records, answers, style, label,
                                                         evaluate.result_fields(model, F.new_tokens(style)))
            for task in general_tasks or ():
                rows["general"] += general.evaluate_task(model, task, label, G.fewshot_format)
    return rows



def table2_deltas(P: BaselinesNotebookParams, deltas: Sequence[dict]) -> list[dict]:
    """Our paired headline deltas (points, with CI) beside the paper's Table 2 delta for the same kind of model
    (its score minus the original's, Mistral-7B-Instruct-v0.1), one row per model x benchmark."""

    ref = table2_reference_rows()
    original = ref[f"{PAPER_MODEL}: original"]
    out = []
    for d in deltas:
        if d["metric"] != HEADLINES[d["task"]]:
            continue
        row = P.paper_row(d["model"])
        paper = ref.get(f"{PAPER_MODEL}: {row}", {}).get(d["task"]) if row else None
        out.append({"model": d["model"], "paper_row": row or "", "benchmark": TITLES[d["task"]],
                    "metric": d["metric"], "n": d["n"], "delta_points": 100 * d["delta"],
                    "ci_low_points": 100 * d["ci_low"], "ci_high_points": 100 * d["ci_high"],
                    "paper_delta_points": None if paper is None else round(paper - original[d["task"]], 2)})
    return out



def claims(P: BaselinesNotebookParams, mdqa_deltas: Sequence[dict] = (), flenqa_deltas: Sequence[dict] = (),
           general_deltas: Sequence[dict] = (), flenqa_rows: Sequence[dict] | None = None,
           gate: LearnedGate | None = None) -> list[dict]:
    """The paper's claims this notebook can check, each judged by kvlib.report.paper.judge from our paired deltas vs
    the original: synthetic finetuning improves MDQA with random distractors and FLenQA (Fig. 8, as in
    Figs. 5-7); the MDQA-finetuned baseline improves MDQA (Fig. 5's baseline curve); synthetic finetuning loses
    nothing on the general benchmarks while the baselines lose on TriviaQA and NQ-Open (Table 2). Each needs the
    original to clear the task's chance rate or floor (kvlib.report.paper.original_level; FLenQA on its balanced
    accuracy when `flenqa_rows`, the scored items, are given); the claims of each artifact are Holm-adjusted
    together (kvlib.report.paper.holm_families). `gate`: the synthetic finetunes that did not learn their own task
    were not evaluated; their claims are listed as not tested (kvlib.pipeline.runs.LearnedGate)."""

    synthetic = synthetic_models(P.models, P.original)  # other models are reported, not judged
    if gate is not None:  # a placeholder difference row for each claim a finetune left out would have had, keyed
        # like the rows of the models evaluated (so the same from the notebook and from its item files: rejudge)
        mdqa_deltas = [*mdqa_deltas, *gate.placeholders([{"setting": SETTING_RANDOM}])] if mdqa_deltas else []
        flenqa_deltas = [*flenqa_deltas, *gate.placeholders([{"style": s} for s in
                                                             dict.fromkeys(d["style"] for d in flenqa_deltas)])]
        general_deltas = [*general_deltas, *gate.placeholders(headline_keys(d["task"] for d in general_deltas))]
    kinds = {label: spec["kind"] for label, spec in P.baselines.items()}
    out = []
    for d in mdqa_deltas:
        if d.get("setting") != SETTING_RANDOM:
            continue
        level = [paper.original_level(d, MDQA_CHANCE, metric="accuracy")]
        if d["model"] in synthetic:
            out.append(paper.judge("fig8", "synthetic finetuning improves MDQA (random distractors, mean over "
                                           "positions)", d["model"], d, "increase", "delta_correct", levels=level))
        elif kinds.get(d["model"]) == "mdqa":
            out.append(paper.judge("fig5", "finetuning on MDQA itself improves MDQA (random distractors, mean over "
                                           "positions)", d["model"], d, "increase", "delta_correct", levels=level))
    out += paper.flenqa_claims([d for d in flenqa_deltas if d["model"] in synthetic], synthetic, flenqa_rows,
                               artifact="fig8")
    out += paper.general_claims(general_deltas, synthetic, HEADLINES, TITLES, artifact="table2")
    for d in general_deltas:
        kind = kinds.get(d["model"])
        if d["metric"] == HEADLINES[d["task"]] and d["task"] in ("triviaqa", "nq_open") and kind in PAPER_ROWS:
            out += [{**row, "published_delta_points": paper.published_deltas(d["task"], PAPER_ROWS[kind])}
                    for row in paper.judge_general("table2", f"the {PAPER_ROWS[kind]} baseline loses on "
                                                             f"{TITLES[d['task']]}", d, "decrease", general_deltas,
                                                   TASKS[d["task"]].floor_metric)]
    return paper.mark_not_tested(out, {} if gate is None else gate.reasons())
