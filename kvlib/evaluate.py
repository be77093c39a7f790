"""Running evaluations: a backend answers a task's prompts, kvlib.scoring scores them, and the result is
one row per item (so every table and CI is computed from the same rows).

Every evaluation notebook declares the models it compares the same way (`EvalModelsParams`): a label per
model, each a `kvlib.backends.BackendConfig` mapping (a model spec, or `run:` naming a finetuning run of the
profile) over shared `backend:` defaults. `open_backend` turns one into a ready backend behind the on-disk
response cache; `answer_requests` asks it, reporting over-length prompts as None instead of dropping them;
`result_fields` are the columns that say what produced each row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from kvlib.backends import BackendConfig, ContextLengthError, build_backend
from kvlib.config import ParamError, fail, from_mapping
from kvlib.generate import Sample
from kvlib.scoring import score_kv_answer


# ------------------------------------------------------------------------------------------- models


def model_configs(models: Mapping[str, Any], backend: Mapping[str, Any] | None, profile: str,
                  params_root: str | Path = "params") -> dict[str, BackendConfig]:
    """label -> BackendConfig of each entry of `models` laid over the `backend` defaults, validated; a `run`
    must be a run of the profile's 02_finetune params (checked here, trained only when opened)."""
    from kvlib.train import run_names

    if not isinstance(models, Mapping) or not models:
        fail("models", "at least one model is required: label -> {model: <spec>} or {run: <02_finetune run>}")
    backend = dict(backend or {})
    if "model" in backend or "run" in backend:
        fail("backend", "holds defaults shared by all models; set model/run per entry of models")
    configs, runs = {}, None
    for label, entry in models.items():
        if not isinstance(label, str) or not label.strip():
            fail("models", f"labels must be non-empty strings, got {label!r}")
        if entry is None:
            entry = {}
        if not isinstance(entry, Mapping):
            fail(f"models.{label}", f"expected a mapping like {{model: ...}} or {{run: ...}}, got {entry!r}")
        config = from_mapping(BackendConfig, {**backend, **entry}, f"models.{label}")
        if config.run is not None:
            if runs is None:
                hf_runs, openai_runs = run_names(profile, params_root)
                runs = {**{r: "hf" for r in hf_runs}, **{r: "openai" for r in openai_runs}}
            if config.run not in runs:
                fail(f"models.{label}.run", f"{config.run!r} is not a run of params/{profile}/02_finetune.yaml "
                                            f"(runs: {', '.join(runs) or 'none'})")
            if (runs[config.run] == "openai") != (config.kind == "openai"):
                fail(f"models.{label}.kind", f"run {config.run!r} is an {runs[config.run]} run: set kind: "
                                             f"{'openai' if runs[config.run] == 'openai' else 'hf, vllm or auto'}")
        configs[label] = config
    return configs


@dataclass
class EvalModelsParams:
    """The params every evaluation notebook shares (subclass it and add the task's own fields)."""

    profile: str = "quick"
    results_dir: str = "results/quick"
    params_root: str = "params"
    models: dict[str, Any] = field(default_factory=lambda: {"original": {}})
    backend: dict[str, Any] = field(default_factory=dict)  # BackendConfig defaults for every model
    cache_dir: str | None = "runs/cache"  # on-disk response cache; None: off
    # group label -> model labels trained alike on datasets of different seeds (the paper averages seeds
    # 0/1/2): reported as the mean over seeds with a CI across seeds beside the per-item bootstrap CI
    seed_groups: dict[str, list[str]] = field(default_factory=dict)

    def model_configs(self) -> dict[str, BackendConfig]:
        return model_configs(self.models, self.backend, self.profile, self.params_root)

    def validate(self) -> None:
        configs = self.model_configs()
        check_seed_groups(self.seed_groups, list(configs))


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
def open_backend(config: BackendConfig, cache_dir: str | Path | None = "runs/cache", profile: str | None = None,
                 params_root: str | Path = "params", progress: bool = True) -> Iterator[Any]:
    """The backend of `config`, behind the response cache in `cache_dir` (None: uncached). A `run` is resolved
    first (kvlib.train.ensure_run_model: trained now if it has not finished). The model is freed on exit."""
    from kvlib.cache import CachedBackend, ResponseCache

    if config.run is not None:
        from kvlib.train import ensure_run_model

        if profile is None:
            raise ParamError(f"run {config.run!r}: open_backend needs the profile the run belongs to")
        config = dataclasses.replace(config, model=ensure_run_model(profile, config.run, params_root), run=None)
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


def answer_requests(backend: Any, requests: Sequence[Any], max_new_tokens: int) -> list[str | None]:
    """The backend's answer to each request, None for one that does not fit the model's context window
    (checked up front where the backend can count, else reported by the server). Callers count the Nones per
    setting: an over-length prompt is never silently skipped, truncated or left out of a denominator."""
    fits = backend.fits(requests, max_new_tokens)
    keep = [i for i, ok in enumerate(fits) if ok]
    answers: list[str | None] = [None] * len(requests)
    try:
        got = backend.generate([requests[i] for i in keep], max_new_tokens)
    except ContextLengthError as exc:
        if exc.results is None:
            raise
        got = exc.results  # the server rejected some: the rest came back, the rejected stay None
    for i, answer in zip(keep, got):
        answers[i] = answer
    return answers


def result_fields(backend: Any, max_new_tokens: int | None) -> dict:
    """Columns recorded with every result row: which backend and model (weights hash or API model name),
    chat template, dtype and generation params produced it."""
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
    }


# ---------------------------------------------------------------------------------------- key-value


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


def group_rows(rows: Sequence[dict], by: Sequence[str]) -> dict[tuple, list[dict]]:
    """Rows by their values of the `by` columns (key: that tuple), groups in order of first appearance."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in by), []).append(r)
    return groups


def summarize(rows: list[dict], by: list[str], metrics: list[str], seed: int = 0) -> list[dict]:
    """Mean and 95% CI of each metric per group of rows (one row per item in, one per group out; Wilson for 0/1
    metrics: kvlib.stats.mean_ci). `n` counts the group's items; a metric's mean is over the items it was scored
    on (not None)."""
    from kvlib.stats import mean_ci

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


def _margin() -> float:
    from kvlib.paper import equivalence_margin

    return equivalence_margin()


def _baseline_level(values: Sequence[float]) -> dict:
    """The base model's mean on the paired items with its 95% CI (kvlib.stats.mean_ci), so a claim can tell
    whether the original scores clear chance (kvlib.paper)."""
    from kvlib.stats import mean_ci

    value, lo, hi = mean_ci(values)
    return {"baseline_value": value, "baseline_ci_low": lo, "baseline_ci_high": hi}


def paired_deltas(rows: list[dict], base: str, by: list[str], metric: str, item_key: str,
                  model_key: str = "model", seed: int = 0) -> list[dict]:
    """Each other model minus `base` on the same items, per group: mean of the per-item differences with a
    paired 95% CI and the one-sided p-values of the claims' nulls from the same method
    (kvlib.stats.paired_difference_test: Newcombe's paired score interval for 0/1 metrics; for other scores in
    [0, 1], e.g. a question's mean over gold positions, the paired t interval floored by Newcombe; paired
    either way, so question difficulty cancels out). Columns: n_pairs, n_unpaired, delta_<metric>, ci_low,
    ci_high, ci_method, p_increase, p_decrease, p_no_loss, p_no_gain (H0: diff <= 0, >= 0, <= -margin, >= margin;
    margin kvlib.paper.equivalence_margin), and the base's baseline_value with its CI. Items either model did
    not score (None) are left out of that pair and counted in `n_unpaired`. `seed` is kept for compatibility."""
    from kvlib.stats import paired_difference_test

    margin = _margin()
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
                      item_key: str, model_key: str = "model", seed: int = 0, n_boot: int = 2000) -> list[dict]:
    """Seed-averaged differences from `base`, per group of models trained alike on datasets of different seeds
    and per `by` group, on the items every seed and the base scored: `delta`, the mean over seeds and items of
    the paired differences, with the interval claims are judged on (`ci_low`, `ci_high`; kvlib.stats.
    seed_item_test: a two-stage bootstrap resampling seeds, then items, never narrower than Newcombe's paired
    interval of the seed-averaged scores at that many items) and its p-values (as in `paired_deltas`). Shown
    beside it, not judged: `seed_ci_low`/`seed_ci_high`, the t interval over the per-seed means (n_seeds - 1
    degrees of freedom: training variability alone; it collapses when the seeds agree) and the per-seed means
    (`per_seed`), so nothing is hidden behind the average; `value`, `baseline_value` (with its CI) are the
    group's and base's mean scores on the shared items."""
    import numpy as np
    import statistics

    from scipy import stats

    from kvlib.stats import seed_item_test

    margin = _margin()
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


def compared_labels(labels: Sequence[str], base: str | None, groups: Mapping[str, Sequence[str]]) -> list[str]:
    """The labels compared with `base` once seed groups stand in for their members (base None: every label
    that is not a member, then the groups, e.g. the series a figure shows)."""
    members = {m for ms in groups.values() for m in ms}
    return [label for label in labels if label != base and label not in members] + list(groups)


# -------------------------------------------------------------------------------------------- MDQA


def evaluate_mdqa(backend: Any, eval_set: Any, positions: Sequence[int], max_new_tokens: int,
                  label: str, final_answer: Callable[[str], str] | None = None) -> list[dict]:
    """Every question of a kvlib.mdqa.MDQAEvalSet with its gold at each 1-based position, answered through the
    chat template (LitM's prompt as the user turn) and scored with LitM's metric. One row per (question,
    position); a prompt over the model's context gets `over_length=True`, `correct=None` (counted, not scored).
    `final_answer`: what of a reply is scored, for a model trained to write something before its answer (its
    result goes in the row's `final_answer`); default the whole reply."""
    from kvlib.mdqa import position_prompts
    from kvlib.scoring import score_mdqa_answer

    keys, requests = [], []
    for example in eval_set.examples:
        for position, prompt in position_prompts(example, positions):
            keys.append((example, position))
            requests.append([{"role": "user", "content": prompt}])
    answers = answer_requests(backend, requests, max_new_tokens)
    fields = result_fields(backend, max_new_tokens)
    rows = []
    for (example, position), answer in zip(keys, answers):
        scored = answer if answer is None or final_answer is None else final_answer(answer)
        rows.append({"model": label, "setting": eval_set.label, "position": position,
                     "num_documents": len(example.documents), "qid": example.qid, "question": example.question,
                     "answers": " | ".join(example.answers), "response": answer, "over_length": answer is None,
                     "correct": None if answer is None else score_mdqa_answer(scored, example.answers), **fields,
                     **({} if final_answer is None else {"final_answer": scored})})
    return rows


def mdqa_question_means(rows: Sequence[dict]) -> list[dict]:
    """MDQA rows pooled over gold positions: per (model, setting, question) the mean correctness over the
    positions it was scored at (None when none was), so paired CIs resample questions, not prompts."""
    import statistics

    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["model"], r["setting"], r["qid"]), []).append(r["correct"])
    return [{"model": m, "setting": s, "qid": q,
             "correct": (statistics.fmean(float(v) for v in vals if v is not None)
                         if any(v is not None for v in vals) else None)}
            for (m, s, q), vals in groups.items()]


def evaluate_mdqa_sets(configs: Mapping[str, BackendConfig], sets: Mapping[str, Any], positions: Sequence[int],
                       max_new_tokens: int, cache_dir: str | Path | None, profile: str,
                       params_root: str | Path = "params") -> list[dict]:
    """Every model (label -> BackendConfig, opened one at a time) on every MDQA set at every gold position:
    the rows of `evaluate_mdqa` (notebooks 03 and 08)."""
    rows = []
    for label, config in configs.items():
        with open_backend(config, cache_dir, profile, params_root) as model:
            for eval_set in sets.values():
                rows += evaluate_mdqa(model, eval_set, positions, max_new_tokens, label)
    return rows


def mdqa_pooled_deltas(rows: list[dict], base: str, seed_groups: Mapping[str, Sequence[str]]
                       ) -> tuple[list[dict], list[dict]]:
    """MDQA differences from `base` pooled over gold positions (per question, its mean over positions, so the
    intervals treat questions as the items), per setting; with seed groups, each group's seed-averaged row
    replaces its members (`with_seed_groups`). When both of the paper's settings were run, the pooled rows also
    hold each model's gain contrast between them (`mdqa_contrast_deltas`, setting kvlib.mdqa.SETTING_CONTRAST).
    Returns (pooled rows, seed-group rows)."""
    from kvlib.mdqa import SETTING_RANDOM, SETTING_RETRIEVED

    means = mdqa_question_means(rows)
    pooled = paired_deltas(means, base, ["setting"], "correct", "qid")
    seed_rows = seed_group_deltas(means, base, seed_groups, ["setting"], "correct", "qid") if seed_groups else []
    if seed_groups:
        pooled = with_seed_groups(pooled, seed_rows, seed_groups)
    if {SETTING_RANDOM, SETTING_RETRIEVED} <= {r["setting"] for r in rows}:
        pooled += mdqa_contrast_deltas(rows, base, seed_groups, SETTING_RANDOM, SETTING_RETRIEVED)
    return pooled, seed_rows


def mdqa_contrast_deltas(rows: Sequence[dict], base: str, seed_groups: Mapping[str, Sequence[str]], first: str,
                         second: str, seed: int = 0, n_boot: int = 2000) -> list[dict]:
    """Per model (seed groups in place of their members): its gain over `base` in setting `first` minus its gain
    in setting `second`, paired by question (each question's mean over gold positions, on the questions every
    model involved scored in both settings): the paper's Fig. 10 contrast, finetuning helps with random
    distractors and not with retrieved ones. Interval and p-values: kvlib.stats.contrast_test (paired t floored
    by MOVER of the two Newcombe intervals), seed groups kvlib.stats.seed_contrast_test (two-stage bootstrap,
    same floor). One row per model: setting = kvlib.mdqa.SETTING_CONTRAST, n_pairs, delta_correct, ci_low,
    ci_high, ci_method and the p-values of `paired_deltas`."""
    import numpy as np

    from kvlib.mdqa import SETTING_CONTRAST
    from kvlib.stats import contrast_test, seed_contrast_test

    margin = _margin()
    score: dict[tuple[str, str], dict] = {}
    for r in mdqa_question_means(rows):
        if r["correct"] is not None:
            score.setdefault((r["model"], r["setting"]), {})[r["qid"]] = float(r["correct"])
    members = {m for ms in seed_groups.values() for m in ms}
    labels = [m for m in dict.fromkeys(r["model"] for r in rows) if m != base and m not in members]
    arms = {label: [label] for label in labels} | {g: list(ms) for g, ms in seed_groups.items()}
    out = []
    for label, models in arms.items():
        involved = [base, *models]
        qids = sorted(set.intersection(*(set(score.get((m, s), {})) for m in involved for s in (first, second))),
                      key=str)
        row = {"setting": SETTING_CONTRAST, "model": label, "base": base, "n_pairs": len(qids), "n_unpaired": None}
        if qids:
            x1 = np.array([[score[(m, first)][q] for q in qids] for m in models])
            x2 = np.array([[score[(m, second)][q] for q in qids] for m in models])
            y1 = np.array([score[(base, first)][q] for q in qids])
            y2 = np.array([score[(base, second)][q] for q in qids])
            test = (contrast_test(x1[0], y1, x2[0], y2) if len(models) == 1
                    else seed_contrast_test(x1, y1, x2, y2, n_boot=n_boot, seed=seed))
            row.update({"delta_correct": test.estimate, **test.row(margin)})
        out.append(row)
    return out


def count_over_length(rows: list[dict], by: list[str]) -> list[dict]:
    """Per group: how many items were evaluated and how many did not fit the context (never dropped silently)."""
    return [dict(zip(by, key), n_items=len(items), n_over_length=sum(bool(r.get("over_length")) for r in items))
            for key, items in group_rows(rows, by).items()]


# -------------------------------------------------------------------------- key-value retrieval (07)


def evaluate_litm_kv(backend: Any, examples: Sequence[Any], positions: Sequence[int], num_pairs: int | None,
                     max_new_tokens: int, label: str) -> list[dict]:
    """LitM key-value retrieval (kvlib.litm_kv): each example with its gold pair at each 1-based position,
    LitM's prompt as the user turn, LitM's metric. Over-length prompts: `over_length=True`, `correct=None`."""
    from kvlib import litm_kv

    keys, requests = [], []
    for index, example in enumerate(examples):
        for position in positions:
            pairs = litm_kv.with_gold_at(example, position, num_pairs)
            keys.append((index, example, position, len(pairs)))
            requests.append([{"role": "user", "content": litm_kv.format_kv_prompt(pairs, example.key)}])
    answers = answer_requests(backend, requests, max_new_tokens)
    fields = result_fields(backend, max_new_tokens)
    return [{"model": label, "example": index, "num_pairs": n, "position": position, "key": example.key,
             "value": example.value, "response": answer, "over_length": answer is None,
             "correct": None if answer is None else litm_kv.score_kv_retrieval(answer, example.value), **fields}
            for (index, example, position, n), answer in zip(keys, answers)]


def evaluate_kv_grid(backend: Any, samples: Sequence[Sample], max_new_tokens: int, label: str) -> list[dict]:
    """Synthetic key-value samples of kvlib.generate.position_length_grid, scored like evaluate_kv, with the
    cell (number of dictionaries, relative gold position) and over-length prompts counted (correct None)."""
    requests = [[{"role": "user", "content": s.prompt}] for s in samples]
    answers = answer_requests(backend, requests, max_new_tokens)
    fields = result_fields(backend, max_new_tokens)
    rows = []
    for s, answer in zip(samples, answers):
        scores = score_kv_answer(answer, s.meta) if answer is not None else {
            k: None for k in score_kv_answer("", s.meta)}
        d, pos = s.meta["num_dicts"], s.meta["gold_position"]
        rows.append({"model": label, "id": s.meta["id"], "num_dicts": d, "gold_position": pos,
                     "relative_position": s.meta["grid_relative_position"],
                     "n_tokens": s.meta["n_tokens"], "response": answer, "over_length": answer is None,
                     **scores, **fields})
    return rows


@dataclass
class InDistributionParams:
    """Accuracy on a synthetic dataset's eval split by gold-dictionary position."""

    dataset: str = "simple-template"  # a dataset of the profile's 01_synthetic_data params
    eval_samples: int = 60
    position_bins: int = 5  # gold positions grouped into this many equal-width bins


@dataclass
class LitMKVParams:
    """LitM's key-value retrieval (UUID pairs), gold pair at each position."""

    num_keys: int = 75  # which LitM file: 75, 140 (or 300 if you have it)
    num_pairs: int | None = None  # gold + the first num_pairs-1 other pairs; None: all num_keys
    positions: list[int] = field(default_factory=lambda: [1, 25, 50, 75])
    num_examples: int = 20
    seed: int = 0
    max_new_tokens: int = 48


@dataclass
class KVGridParams:
    """Beyond the paper: synthetic task accuracy on a grid of context length x gold position."""

    dataset: str = "simple-template"  # whose task/template/value ranges (and seed) the grid reuses
    num_dicts: list[int] = field(default_factory=lambda: [10, 40, 80])
    relative_positions: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    samples_per_cell: int = 8
    max_tokens: int = 8000  # prompt budget of the grid (the embedded model's context is 8192)


@dataclass
class KVRetrievalNotebookParams(EvalModelsParams):
    """Parameters of notebooks/07_kv_retrieval.ipynb; a section set to null is skipped."""

    in_distribution: InDistributionParams | None = field(default_factory=InDistributionParams)
    litm: LitMKVParams | None = field(default_factory=LitMKVParams)
    grid: KVGridParams | None = field(default_factory=KVGridParams)
    max_new_tokens: int = 48  # synthetic answers ("The value of key K is V and it is in Dictionary [D].")
    data_dir: str | None = None

    def validate(self) -> None:
        from kvlib.config import check_positive
        from kvlib.generate import profile_dataset

        super().validate()
        check_positive("max_new_tokens", self.max_new_tokens)
        if self.in_distribution is not None:
            s = self.in_distribution
            _dataset_of(self.profile, self.params_root, "in_distribution.dataset", s.dataset, profile_dataset)
            check_positive("in_distribution.eval_samples", s.eval_samples)
            check_positive("in_distribution.position_bins", s.position_bins)
        if self.litm is not None:
            s = self.litm
            if s.num_keys not in (75, 140, 300):
                fail("litm.num_keys", f"LitM's files have 75, 140 or 300 keys, got {s.num_keys}")
            total = s.num_keys if s.num_pairs is None else s.num_pairs
            if not 2 <= total <= s.num_keys:
                fail("litm.num_pairs", f"must be in [2, {s.num_keys}], got {s.num_pairs}")
            if not s.positions or any(isinstance(p, bool) or not isinstance(p, int) or not 1 <= p <= total
                                      for p in s.positions):
                fail("litm.positions", f"1-based positions in [1, {total}] required, got {s.positions}")
            check_positive("litm.num_examples", s.num_examples)
            check_positive("litm.max_new_tokens", s.max_new_tokens)
        if self.grid is not None:
            s = self.grid
            _dataset_of(self.profile, self.params_root, "grid.dataset", s.dataset, profile_dataset)
            if not s.num_dicts or any(isinstance(d, bool) or not isinstance(d, int) or d < 2 for d in s.num_dicts):
                fail("grid.num_dicts", f"integers >= 2 required, got {s.num_dicts}")
            if not s.relative_positions or any(not 0 <= r <= 1 for r in s.relative_positions):
                fail("grid.relative_positions", f"fractions in [0, 1] required, got {s.relative_positions}")
            check_positive("grid.samples_per_cell", s.samples_per_cell)
            check_positive("grid.max_tokens", s.max_tokens)

    def grid_config(self):
        """The generation config of the grid: the dataset's, with the grid's prompt budget."""
        from kvlib.generate import profile_dataset

        cfg, _ = profile_dataset(self.profile, self.grid.dataset, Path(self.params_root))
        return dataclasses.replace(cfg, max_tokens=self.grid.max_tokens)


def _dataset_of(profile: str, params_root: str, where: str, name: str, profile_dataset) -> None:
    try:
        profile_dataset(profile, name, Path(params_root))
    except ParamError as exc:
        raise ParamError(f"{where}: {exc}") from None


def position_bin_index(position: int, num_dicts: int, bins: int) -> int:
    """1-based index of the equal-width bin that a 1-based gold position among num_dicts falls in."""
    return min(int((position - 1) / (num_dicts / bins)), bins - 1) + 1


def position_bin(position: int, num_dicts: int, bins: int) -> str:
    """Label of the equal-width bin of a 1-based gold position among num_dicts, e.g. "1-4"."""
    width = num_dicts / bins
    b = position_bin_index(position, num_dicts, bins) - 1
    low, high = int(b * width) + 1, int((b + 1) * width)
    return f"{low}-{high}" if high > low else str(low)
