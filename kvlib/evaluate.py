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
from typing import Any, Iterator, Mapping, Sequence

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
            if runs[config.run] != config.kind:
                fail(f"models.{label}.kind", f"run {config.run!r} is an {runs[config.run]} run: set kind: "
                                             f"{runs[config.run]}")
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

    def model_configs(self) -> dict[str, BackendConfig]:
        return model_configs(self.models, self.backend, self.profile, self.params_root)

    def validate(self) -> None:
        self.model_configs()


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
