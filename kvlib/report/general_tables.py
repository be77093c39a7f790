"""Tables of notebook 05 (and 06's general benchmarks): headline scores and differences, the conventions used
per benchmark, and the paper's published numbers beside ours.
"""
from __future__ import annotations

import math
from typing import Sequence

from kvlib.report import paper
from kvlib.tasks.general import TASKS, TITLES, Item, PreparedTask, resolve_prompt_format


def _pct(value: float, lo: float | None = None, hi: float | None = None, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    fmt = "+.1f" if signed else ".1f"
    text = format(100 * value, fmt)
    if lo is not None and hi is not None and not math.isnan(lo):
        text += f" [{format(100 * lo, fmt)}, {format(100 * hi, fmt)}]"
    return text



def headline_table(summary: Sequence[dict], deltas: Sequence[dict], baseline: str):
    """The paper-style table (percent): one row per model with each task's headline metric and 95% CI,
    then one row per other model with its paired delta vs the baseline. Cells say `n/a` where a task did
    not run; the `variants` column says how each model ran (e.g. MMLU generate for a chat API) and, for
    generation, in which prompt format (raw text or chat template)."""
    import pandas as pd

    tasks = list(dict.fromkeys(s["task"] for s in summary))
    models = list(dict.fromkeys(s["model"] for s in summary))
    head = {(s["model"], s["task"]): s for s in summary if s["metric"] == TASKS[s["task"]].headline}
    dl = {(d["model"], d["task"]): d for d in deltas if d["metric"] == TASKS[d["task"]].headline}
    columns = {t: f"{TASKS[t].title} ({TASKS[t].headline})" for t in tasks}
    out = []
    for model in models:
        row = {"row": model}
        for t in tasks:
            s = head.get((model, t))
            row[columns[t]] = _pct(s["value"], s["ci_low"], s["ci_high"]) + f" (n={s['n']})" if s else "n/a"
        row["variants"] = ", ".join(f"{t}:{_variant_text(head[(model, t)])}" for t in tasks if (model, t) in head)
        out.append(row)
    for model in models:
        if model == baseline:
            continue
        row = {"row": f"{model} - {baseline}"}
        for t in tasks:
            d = dl.get((model, t))
            row[columns[t]] = _pct(d["delta"], d["ci_low"], d["ci_high"], signed=True) + f" (n={d['n']})" if d else "n/a"
        row["variants"] = "paired on the same items"
        out.append(row)
    return pd.DataFrame(out)



def _variant_text(summary_row: dict) -> str:
    variant, fmt = summary_row["variant"], summary_row.get("prompt_format")
    return f"{variant} ({fmt})" if variant == "generate" and fmt else variant


def headline_deltas(deltas: Sequence[dict]):
    """The paired deltas of each task's headline metric, with a `benchmark` label (for the bar chart)."""
    import pandas as pd

    rows = [dict(d, benchmark=f"{TASKS[d['task']].title} ({d['metric']})") for d in deltas
            if d["metric"] == TASKS[d["task"]].headline]
    return pd.DataFrame(rows)



def prompt_format_text(task: PreparedTask, fewshot_format: str = "multiturn", raw_text: bool | None = None) -> str:
    """How a task's generation prompt reaches the model (the conventions table's `prompt format`): raw text
    without the chat template, or the chat template with the few-shot format, and who decided. `raw_text`: whether
    the models evaluated can send raw text (True: local models; False: chat APIs; None: some of each)."""
    if "generate" not in task.spec.variants:
        return "raw text (log-likelihood)"
    chat = f"chat template, shots {fewshot_format}" if task.n_shot else "chat template"
    how = {"raw": "raw text, no chat template", "chat": chat}
    default = " (harness default)" if task.spec.prompt_format == "raw" else ""
    if task.prompt_format == "chat":
        text = f"{chat} (asked by the profile: prompt_format chat)"
    elif raw_text is None:
        local, api = resolve_prompt_format(task, True), resolve_prompt_format(task, False)
        text = (f"local models: {how[local]}{default if task.prompt_format == 'auto' else ''}; "
                f"chat APIs: {how[api] if api else 'not run (raw text asked for)'}")
    else:
        fmt = resolve_prompt_format(task, raw_text)
        text = (how[fmt] + (default if fmt == "raw" and task.prompt_format == "auto" else "")
                + (" (chat API: no raw text)" if fmt == "chat" else "")) if fmt else "not run (raw text asked for)"
    return ("generate variant: " + text) if task.spec.variants[0] != "generate" else text


def conventions_table(tasks: Sequence[PreparedTask], fewshot_format: str = "multiturn", raw_text: bool | None = None):
    """What each benchmark runs as, from the declarations (the notebook's 'conventions' table): data used,
    shots and their source, the prompt template of a test item, variants with their metrics, headline
    metric, generation settings, and the prompt format (`prompt_format_text`: raw text without the chat template,
    the harness's default, unless the profile asks for the chat template with `tasks.<name>.prompt_format: chat`
    or the model is a chat API; `raw_text` as there)."""
    import pandas as pd

    rows = []
    for task in tasks:
        spec = task.spec
        placeholder = Item("", "", spec.placeholder[0], spec.placeholder[1], 0, group="{subject}")
        prompt = spec.description(placeholder) + spec.doc_to_text(placeholder)
        if spec.choices is not None and spec.variants[0] == "loglikelihood":
            scored = " | ".join(dict.fromkeys(repr(spec.target_delimiter + c) for c in spec.choices(placeholder)))
            prompt += f"  [log-likelihood of: {scored}]"
        generation = "-"
        if "generate" in spec.variants:
            only = "" if spec.variants[0] == "generate" else "generate variant: "
            stops = f", cut at {list(spec.stop)}" if spec.stop else ""
            if spec.scorer == "multiple_choice" and spec.stop:
                stops += " (raw text; a chat reply is searched whole)"
            generation = f"{only}greedy, max {task.max_new_tokens} new tokens{stops}"
        rows.append({
            "benchmark": spec.title,
            "harness task": spec.harness,
            "data": f"{spec.data}; {len(task.items)} of {task.report.records} used",
            "shots": f"{task.n_shot}: {spec.shots_from}" if task.n_shot else "0",
            "prompt of a test item": prompt.replace("\n", "\\n"),
            "metrics by variant": "; ".join(f"{v}: {', '.join(spec.metrics[v])}" for v in spec.variants)
                                  + (" (+ macro over subjects)" if spec.macro else ""),
            "headline": spec.headline,
            "generation": generation,
            "prompt format": prompt_format_text(task, fewshot_format, raw_text),
            "notes": spec.notes,
        })
    return pd.DataFrame(rows)



def paper_reference_table():
    """The paper's published scores (kvlib.report.paper, params/paper_reference.yaml) under these tasks' titles."""

    return paper.general_table(TITLES)



PUBLISHED_FINETUNING = "key-value, with template"  # the paper's rows for its synthetic-data models


def figure_deltas(deltas: Sequence[dict], models: Sequence[str],
                  paper_rows: dict[str, str | None] | None = None):
    """What the general-benchmark difference figure (kvlib.report.plots.delta_bars) shows, as (ours, published,
    notes). `ours`: per benchmark, each of `models`' difference from the baseline on the headline metric (rows of
    kvlib.tasks.general.benchmark_deltas, or kvlib.engine.evaluate.with_seed_groups rows for seed groups), with a
    `benchmark` label naming the metric. Where every model and the baseline score 0 on the headline metric, its
    difference is no evidence of anything: the task's floor metric is shown instead when someone scores on it,
    else the benchmark is left out, and `notes` (for the caption) says which. `published`: the paper's own
    differences (points) for the same benchmarks and metrics' tasks, one row per paper model and finetuning that
    `paper_rows` (model label -> the paper's finetuning row; default: every model is the paper's key-value model
    with template) names. Both DataFrames have the columns the figure reads."""
    import pandas as pd

    paper_rows = paper_rows if paper_rows is not None else {m: PUBLISHED_FINETUNING for m in models}

    def all_zero(rows: list[dict]) -> bool:
        return all(d.get("value") == 0 and d.get("baseline_value") == 0 for d in rows)

    ours, published, notes = [], [], []
    finetunings = list(dict.fromkeys(f for m in models if (f := paper_rows.get(m))))
    for task in dict.fromkeys(d["task"] for d in deltas):
        spec = TASKS[task]
        rows = {metric: [d for d in deltas if d["task"] == task and d["metric"] == metric and d["model"] in models]
                for metric in (spec.headline, spec.floor_metric) if metric}
        chosen = rows[spec.headline]
        if not chosen:
            continue
        if all_zero(chosen):
            floor = rows.get(spec.floor_metric) or []
            if floor and not all_zero(floor):
                notes.append(f"{spec.title}: every model scores 0 on {spec.headline}, so {spec.floor_metric} is shown")
                chosen = floor
            else:
                metrics = " or ".join(rows)
                notes.append(f"{spec.title}: not plotted, every model scores 0 on {metrics}")
                continue
        label = f"{spec.title} ({chosen[0]['metric']})"
        ours += [dict(d, benchmark=label) for d in chosen]
        for finetuning in finetunings:
            for model, value in paper.published_delta_values(task, finetuning).items():
                source = model if len(finetunings) == 1 else f"{model}: {finetuning}"
                published.append({"benchmark": label, "source": f"paper: {source}", "delta_points": value})
    return pd.DataFrame(ours), pd.DataFrame(published, columns=["benchmark", "source", "delta_points"]), notes


def figure_caption(notes: Sequence[str] = ()) -> str:
    """The caption under the general-benchmark difference figure (`figure_deltas`' notes appended)."""
    margin = 100 * paper.equivalence_margin()
    text = (f"Paired differences from the original in points (bars; whiskers: 95% intervals; seed groups: the mean "
            f"over seeds), the paper's own differences (hatched) and the equivalence margin (grey, +-{margin:.2f} "
            f"points) that a \"loses nothing\" claim must rule out.")
    return text + "".join(f" {note}." for note in notes)
