"""Running evaluations: a backend answers a task's prompts, kvlib.engine.scoring scores them, and the result is
one row per item (so every table and CI is computed from the same rows).

Every evaluation notebook declares the models it compares the same way (`EvalModelsParams`): a label per
model, each a `kvlib.engine.backends.BackendConfig` mapping (a model spec, or `run:` naming a finetuning run of the
profile) over shared `backend:` defaults. `open_backend` turns one into a ready backend behind the on-disk
response cache; `answer_requests` asks it, reporting over-length prompts as None instead of dropping them;
`result_fields` are the columns that say what produced each row.
"""
from __future__ import annotations

import contextlib
import gc
import statistics
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kvlib.engine.backends import BackendConfig, ContextLengthError, StopRule, build_backend, generate_until
from kvlib.engine.cache import CachedBackend, ResponseCache
from kvlib.engine.config import ParamError, fail
from kvlib.engine.stats import mean_ci, paired_difference_test, seed_item_test

# ------------------------------------------------------------------------------------------- models


def check_seed_groups(groups: Mapping[str, Sequence[str]], labels: Sequence[str], base: str | None = None) -> None:
    """Each group names >= 2 distinct models other than `base` (default: the first model, the baseline every
    delta is taken against), no model in two groups, and no group label that is also a model label."""
    base = base if base is not None else (labels[0] if labels else None)
    seen: dict[str, str] = {}
    for group, members in groups.items():
        where = f"seed_groups.{group}"
        if group in labels:
            fail(where, f"a group label must differ from the model labels {list(labels)}")
        if not isinstance(members, (list, tuple)) or len(set(members)) < 2 or len(set(members)) != len(members):
            fail(where, f"expected a list of at least two distinct model labels, got {members!r}")
        for m in members:
            if m not in labels:
                fail(where, f"{m!r} is not one of the models {list(labels)}")
            if m == base:
                fail(where, f"{m!r} is the baseline every difference is taken against; it cannot be in a group")
            if m in seen:
                fail(where, f"{m!r} is already in seed group {seen[m]!r}")
            seen[m] = group


@contextlib.contextmanager
def open_backend(config: BackendConfig, cache_dir: str | Path | None = "runs/cache",
                 progress: bool = True) -> Iterator[Any]:
    """The backend of `config` (a model, not a `run`: the pipeline resolves runs, kvlib.pipeline.runs.open_model),
    behind the response cache in `cache_dir` (None: uncached). The model is freed on exit."""
    if config.run is not None:
        raise ParamError(f"run {config.run!r}: resolve it to a model first (kvlib.pipeline.runs.open_model)")
    backend = build_backend(config, progress=progress)
    cache = ResponseCache(cache_dir) if cache_dir is not None else None
    try:
        yield CachedBackend(backend, cache) if cache is not None else backend
    finally:
        if cache is not None:
            cache.close()
        del backend
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass


def answer_requests(backend: Any, requests: Sequence[Any], max_new_tokens: int,
                    stop: StopRule | None = None) -> list[str | None]:
    """The backend's answer to each request, None for one that does not fit the model's context window
    (checked up front where the backend can count, else reported by the server). Callers count the Nones per
    setting: an over-length prompt is never silently skipped, truncated or left out of a denominator. `stop`:
    where the task's answer ends (decoding stops there; kvlib.engine.backends.generate_until)."""
    fits = backend.fits(requests, max_new_tokens)
    keep = [i for i, ok in enumerate(fits) if ok]
    answers: list[str | None] = [None] * len(requests)
    try:
        got = generate_until(backend, [requests[i] for i in keep], max_new_tokens, stop)
    except ContextLengthError as exc:
        if exc.results is None:
            raise
        got = exc.results  # the server rejected some: the rest came back, the rejected stay None
    for i, answer in zip(keep, got):
        answers[i] = answer
    return answers


def result_fields(backend: Any, max_new_tokens: int | None, stop: StopRule | None = None) -> dict:
    """Columns recorded with every result row: which backend and model (weights hash or API model name),
    chat template, dtype (as resolved: "auto" is never recorded) and generation params (with the stop rule
    that ended answers, if any) produced it."""
    identity = backend.identity()
    model = identity.get("model")
    return {
        "backend": identity.get("backend"),
        "model_spec": model.get("spec") if isinstance(model, dict) else model,
        "weights_sha256": model.get("weights_sha256") if isinstance(model, dict) else None,
        "base_url": identity.get("base_url"),
        "chat_template": identity.get("chat_template_sha256") or identity.get("chat_template"),
        "dtype": identity.get("dtype"),
        "decoding": "greedy",
        "max_new_tokens": max_new_tokens,
        "stop_rule": None if stop is None else stop.describe(),
    }


# ---------------------------------------------------------------------------------------- key-value


def group_rows(rows: Sequence[dict], by: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows by their values of the `by` columns (key: that tuple), groups in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return groups


def summarize(rows: list[dict], by: list[str], metrics: list[str], seed: int = 0) -> list[dict]:
    """Mean and 95% CI of each metric per group of rows (one row per item in, one per group out; Wilson for 0/1
    metrics, else bootstrap: kvlib.engine.scoring.mean_ci). `n` counts the group's items; a metric's mean is over the
    items it was scored on (not None)."""

    out = []
    for key, items in group_rows(rows, by).items():
        row = dict(zip(by, key), n=len(items))
        for m in metrics:
            # None: not scored (an over-length prompt; count_over_length reports how many)
            values = [float(i[m]) for i in items if i[m] is not None]
            if not values:
                row.update({m: None, f"{m}_ci_low": None, f"{m}_ci_high": None})
                continue
            mean, lo, hi = mean_ci(values, seed=seed)
            row.update({m: mean, f"{m}_ci_low": lo, f"{m}_ci_high": hi})
        out.append(row)
    return out


def _scores_by_group(rows: Sequence[dict], by: Sequence[str], model_key: str, item_key: str, metric: str
                     ) -> dict[tuple, dict[str, dict]]:
    """(values of `by`) -> model -> item -> metric value (None: not scored)."""
    scores: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        scores.setdefault(tuple(r[k] for k in by), {}).setdefault(r[model_key], {})[r[item_key]] = r[metric]
    return scores


def paired_with_base(rows: Sequence[dict], base: str, by: Sequence[str], metric: str, item_key: str,
                     model_key: str = "model") -> dict[tuple, dict[str, tuple[list[tuple], int]]]:
    """The one pairing of items behind every paired difference: (values of `by`) -> each model but `base` ->
    (pairs, n_unpaired). `pairs` lists (item, value, base value) for the items both scored (neither None), in
    the model's row order; `n_unpaired` counts the items only one of them scored."""
    out: dict[tuple, dict[str, tuple[list[tuple], int]]] = {}
    for key, by_model in _scores_by_group(rows, by, model_key, item_key, metric).items():
        reference = by_model.get(base, {})
        for model, values in by_model.items():
            if model == base:
                continue
            pairs = [(i, v, reference[i]) for i, v in values.items()
                     if v is not None and reference.get(i) is not None]
            out.setdefault(key, {})[model] = (pairs, len(set(values) | set(reference)) - len(pairs))
    return out


def paired_deltas(rows: list[dict], base: str, by: list[str], metric: str, item_key: str,
                  model_key: str = "model", seed: int = 0, margin: float | None = None) -> list[dict]:
    """Each other model minus `base` on the same items, per group: mean of the per-item differences with a
    paired 95% CI and the one-sided p-values of the claims' nulls from the same method
    (kvlib.stats.paired_difference_test: Newcombe's paired score interval for 0/1 metrics; for other scores in
    [0, 1], e.g. a question's mean over gold positions, the paired t interval floored by Newcombe; paired
    either way, so question difficulty cancels out). Columns: n_pairs, n_unpaired, delta_<metric>, ci_low,
    ci_high, ci_method, p_increase, p_decrease, p_no_loss, p_no_gain (H0: diff <= 0, >= 0, <= -margin, >= margin;
    `margin`: the equivalence margin, kvlib.report.paper.equivalence_margin; None: no equivalence p-values), and the base's baseline_value with its CI. Items either model did
    not score (None) are left out of that pair and counted in `n_unpaired`. `seed` is kept for compatibility."""

    out = []
    for key, by_model in paired_with_base(rows, base, by, metric, item_key, model_key).items():
        for model, (pairs, n_unpaired) in by_model.items():
            row = dict(zip(by, key), model=model, base=base, n_pairs=len(pairs), n_unpaired=n_unpaired)
            if pairs:
                a, b = [float(v) for _, v, _ in pairs], [float(v) for _, _, v in pairs]
                test = paired_difference_test(a, b)
                row.update({f"delta_{metric}": test.estimate, **test.row(margin), **_baseline_level(b)})
            out.append(row)
    return out


def seed_group_deltas(rows: list[dict], base: str, groups: Mapping[str, Sequence[str]], by: list[str], metric: str,
                      item_key: str, model_key: str = "model", seed: int = 0, n_boot: int = 2000,
                      margin: float | None = None) -> list[dict]:
    """Seed-averaged differences from `base`, per group of models trained alike on datasets of different seeds
    and per `by` group, on the items every seed and the base scored: `delta`, the mean over seeds and items of
    the paired differences, with the interval claims are judged on (`ci_low`, `ci_high`; kvlib.stats.
    seed_item_test: a two-stage bootstrap resampling seeds, then items, never narrower than Newcombe's paired
    interval of the seed-averaged scores at that many items) and its p-values (as in `paired_deltas`). Shown
    beside it, not judged: `seed_ci_low`/`seed_ci_high`, the t interval over the per-seed means (n_seeds - 1
    degrees of freedom: training variability alone; it collapses when the seeds agree) and the per-seed means
    (`per_seed`), so nothing is hidden behind the average; `value`, `baseline_value` (with its CI) are the
    group's and base's mean scores on the shared items."""
    from scipy import stats


    out = []
    for key, by_model in paired_with_base(rows, base, by, metric, item_key, model_key).items():
        for group, members in groups.items():
            # member -> item -> (score, base score) on the items both scored
            paired = {m: {i: (float(v), float(b)) for i, v, b in by_model.get(m, ([], 0))[0]} for m in members}
            if not all(paired.values()):
                continue
            seed_means = [statistics.fmean(v - b for v, b in p.values()) for p in paired.values()]
            shared = sorted(set.intersection(*(set(p) for p in paired.values())), key=str)
            mean = statistics.fmean(seed_means)
            spread = statistics.stdev(seed_means)
            half = stats.t.ppf(0.975, len(seed_means) - 1) * spread / len(seed_means) ** 0.5
            row = dict(zip(by, key), group=group, base=base, metric=metric, n_seeds=len(members),
                       n_items=len(shared), delta=mean, seed_ci_low=mean - half, seed_ci_high=mean + half,
                       per_seed=", ".join(f"{m}: {v:+.4f}" for m, v in zip(members, seed_means)))
            if shared:
                scores = np.array([[paired[m][i][0] for i in shared] for m in members])
                baseline = np.array([paired[members[0]][i][1] for i in shared])
                test = seed_item_test(scores, baseline, n_boot=n_boot, seed=seed)
                # the scores themselves (seed-averaged, on the shared items), so a claim can tell "both at 0"
                # or "the original at chance" (kvlib.paper) from "no change"
                row.update(delta=test.estimate, **test.row(margin), value=float(scores.mean()),
                           **_baseline_level(baseline))
            out.append(row)
    return out


def with_seed_groups(deltas: Sequence[dict], seed_rows: Sequence[dict], groups: Mapping[str, Sequence[str]]) -> list[dict]:
    """Paired-delta rows with each seed group's members replaced by the group's seed-averaged row (model = the
    group label, its seeds-and-items interval and p-values, `delta_<metric>` and `delta` both set), so claims are
    judged on the average over seeds as the paper reports them."""
    members = {m for ms in groups.values() for m in ms}
    grouped = [{**g, "model": g["group"], "n_pairs": g["n_items"], f"delta_{g['metric']}": g["delta"]}
               for g in seed_rows]
    return [d for d in deltas if d["model"] not in members] + grouped


def seed_group_means(rows: Sequence[dict], groups: Mapping[str, Sequence[str]], item_keys: Sequence[str],
                     metrics: Sequence[str], model_key: str = "model") -> list[dict]:
    """For notebooks that describe accuracies rather than differences (07): per seed group, one row per item
    (same `item_keys` values) whose metrics are the mean over the group's models that scored it (None when
    none did), so `summarize` gives the seed-averaged accuracy with a CI across items. Other fields come from
    the first member's row (they describe the item); `response` is dropped and `n_seeds` added."""
    out = []
    for group, members in groups.items():
        by_item = group_rows([r for r in rows if r[model_key] in members], item_keys)
        for items in by_item.values():
            row = {k: v for k, v in items[0].items() if k != "response"}
            row.update({model_key: group, "n_seeds": len(items)})
            for m in metrics:
                values = [float(i[m]) for i in items if i[m] is not None]
                row[m] = sum(values) / len(values) if values else None
            out.append(row)
    return out


def engines_used(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    """Model label -> the engine(s) that answered it (the rows' `backend`: hf, vllm, openai), for the manifest's
    facts: with backend kind auto it is vLLM or transformers depending on the machine. `rows`: result rows, or
    sections of them (a mapping of lists)."""
    if isinstance(rows, Mapping):
        rows = [r for section in rows.values() for r in section]
    found: dict[str, set] = {}
    for r in rows:
        if r.get("backend"):
            found.setdefault(str(r["model"]), set()).add(str(r["backend"]))
    return {label: ", ".join(sorted(engines)) for label, engines in found.items()}


def compared_labels(labels: Sequence[str], base: str | None, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The labels compared with `base` once seed groups stand in for their members (base None: every label
    that is not a member, then the groups, e.g. the series a figure shows)."""
    members = {m for ms in groups.values() for m in ms}
    return [label for label in labels if label != base and label not in members] + list(groups)


# -------------------------------------------------------------------------------------------- MDQA


def count_over_length(rows: list[dict], by: list[str]) -> list[dict]:
    """Per group: how many items were evaluated and how many did not fit the context (never dropped silently)."""
    return [dict(zip(by, key), n_items=len(items), n_over_length=sum(bool(r.get("over_length")) for r in items))
            for key, items in group_rows(rows, by).items()]


# -------------------------------------------------------------------------- key-value retrieval (07)


def _baseline_level(values: Sequence[float]) -> dict:
    """The base model's mean on the paired items with its 95% CI (kvlib.stats.mean_ci), so a claim can tell
    whether the original scores clear chance (kvlib.paper)."""

    value, lo, hi = mean_ci(values)
    return {"baseline_value": value, "baseline_ci_low": lo, "baseline_ci_high": hi}
