"""The finetuning runs of a profile as models: a notebook's `run:` model entry is resolved here to the trained
model (trained first if it has not finished), so the engine only ever opens models. Here too: notebook 02's
held-out check of a run (has it learned its own task?), its sweep, and the gate that lets only the finetunes that
learned into the evaluation notebooks.
"""
from __future__ import annotations

import csv
import dataclasses
import gc
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import yaml

from kvlib.engine import train as training
from kvlib.engine.backends import BackendConfig, HFBackend
from kvlib.engine.config import ParamError, to_mapping
from kvlib.engine.evaluate import open_backend, summarize
from kvlib.engine.io import atomic_write_text, dumps_json
from kvlib.engine.models import model_identity
from kvlib.engine.openai_ft import STATE_FILE
from kvlib.engine.stats import mean_ci
from kvlib.engine.train import LauncherConfig, TrainConfig
from kvlib.pipeline import manifest, sweep
from kvlib.pipeline.notebooks import FinetuneJob, FinetuneNotebookParams, profile_finetune_params, synthetic_models
from kvlib.report import paper
from kvlib.report.tables import notebook_output_dir, save_table
from kvlib.tasks.mdqa import evaluate_mdqa
from kvlib.tasks.synthetic import ensure_dataset, evaluate_kv, load_dataset


def ready_job(params: FinetuneNotebookParams, run: str) -> FinetuneJob:
    """Run `run` of notebook 02's params as it trains: with the sweep's values when it takes them (the sweep is
    trained and judged first when it has not run: `run_sweep`)."""
    job = params.jobs()[run]
    if job.awaiting_sweep:
        run_sweep(params)
        job = params.jobs()[run]
    return job


def ensure_run_model(profile: str, run: str, params_root: str | Path = "params") -> str:
    """The model a finetuning run of the profile produced: an HF run's saved model directory (trained now,
    from its dataset, if it has not finished: finished runs are reused, interrupted ones resume), or an
    OpenAI run's fine-tuned model name (which needs notebook 02 with openai_submit)."""

    params = profile_finetune_params(profile, params_root)
    jobs, openai_jobs = params.jobs(), params.openai_jobs()
    if run in jobs:  # its dataset is written first if missing
        return train_job(ready_job(params, run), params.launcher)["model_dir"]
    if run in openai_jobs:
        state_file = Path(openai_jobs[run].train_config.job_dir) / STATE_FILE
        state = json.loads(state_file.read_text()) if state_file.is_file() else {}
        if not state.get("fine_tuned_model"):
            raise ParamError(f"run {run!r}: no fine-tuned model yet ({state_file}); run notebook 02 with "
                             f"openai_submit: true and OPENAI_API_KEY set first")
        return state["fine_tuned_model"]
    known = ", ".join([*jobs, *openai_jobs]) or "none"
    raise ParamError(f"run: {run!r} is not a run of params/{profile}/02_finetune.yaml (runs: {known})")


LAUNCH_PARAMS = "launch_params.yaml"  # a launched run's `kvlib train` params, in its out_dir


def train_run(cfg: TrainConfig, launcher: LauncherConfig | None = None, where: str = "",
              run: Callable[..., Any] = subprocess.run, gpus_gib: list[float] | None = None) -> dict:
    """Train (or reuse, or resume) one run the way `launcher` says, returning its summary
    (kvlib.engine.train.train's). A finished run is reused without launching anything. In process (no launcher,
    or kind inprocess) it trains here, after checking on a CUDA machine that the run fits one GPU. With kind
    accelerate it writes the run's config to <out_dir>/launch_params.yaml and runs `accelerate launch ... -m kvlib
    train --params <that file> --resume-auto` as its own process, after checking that the memory estimate fits the
    visible GPUs (kvlib.engine.train.check_fits_gpus: a run that cannot fit stops here, with the numbers and the
    fix). `run` and `gpus_gib` stand in for subprocess.run and the visible GPUs in tests."""
    import torch

    if training.is_finished(cfg):
        return training.train(cfg, resume="auto")  # reads the summary back, trains nothing
    launcher = launcher or LauncherConfig()
    where = where or cfg.out_dir
    if launcher.kind == "inprocess":
        if gpus_gib is not None or torch.cuda.is_available():
            _check_fits(cfg, 1, gpus_gib, where)
        return training.train(cfg, resume="auto")
    _check_fits(cfg, launcher.num_processes, gpus_gib, where)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / LAUNCH_PARAMS
    atomic_write_text(params_file, yaml.safe_dump({"train": to_mapping(cfg)}, sort_keys=False))
    accelerate = Path(sys.executable).with_name("accelerate")
    argv = launcher.command(params_file, str(accelerate) if accelerate.is_file() else "accelerate")
    print(f"{where}: launching {' '.join(argv)}", flush=True)
    done = run(argv, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{where}: `{' '.join(argv)}` exited with status {done.returncode} (its output is above); "
                           f"running the same command again resumes from the run's last checkpoint")
    if not training.is_finished(cfg):
        raise RuntimeError(f"{where}: `{' '.join(argv)}` ended without a finished run in {cfg.out_dir} "
                           f"({training.SUMMARY_FILE} missing or of another config)")
    return training.read_summary(out)


def _check_fits(cfg: TrainConfig, processes: int, gpus_gib: list[float] | None, where: str) -> None:
    """check_fits_gpus, except that a run whose memory cannot be estimated here (its architecture unreadable
    offline) is only reported: nothing is known to be wrong with it."""
    try:
        plan = training.plan_training(cfg, world=processes)
    except (ParamError, OSError, ValueError) as exc:
        print(f"{where}: no memory estimate before training ({exc}); training anyway", flush=True)
        return
    training.check_fits_gpus(cfg, processes, gpus_gib, where, plan=plan)


def train_job(job: FinetuneJob, launcher: LauncherConfig | None = None, **kwargs: Any) -> dict:
    """`train_run` for a run of notebook 02 (its dataset written first if missing). A run that takes the sweep's
    values trains only with them (`ready_job`)."""
    if job.not_trained is not None:
        raise ParamError(f"run {job.name}: not trained: {job.not_trained}")
    if job.awaiting_sweep:
        raise ParamError(f"run {job.name}: takes {' and '.join(job.from_sweep)} from the sweep, which has not run "
                         f"(kvlib.pipeline.runs.ready_job runs it first)")
    ensure_dataset(job.data_config, job.data_dir)
    return train_run(job.train_config, launcher, where=f"run {job.name}", **kwargs)


def record_job_data(results_dir: str | Path, notebook: str, job: FinetuneJob) -> list[dict]:
    """Write `job`'s dataset if missing, then record its train and eval files as inputs of `notebook`. In this
    order because a run that takes its dataset from the sweep has none on a fresh runs/ until the sweep has picked
    it (notebook 01 may be up to date and skipped there). Returns the inputs now recorded."""
    ensure_dataset(job.data_config, job.data_dir)
    return manifest.record_inputs(results_dir, notebook, [job.data_dir / "train.jsonl", job.data_dir / "eval.jsonl"])


def open_model(config: BackendConfig, cache_dir: str | Path | None, profile: str,
               params_root: str | Path = "params", progress: bool = True) -> ContextManager[Any]:
    """kvlib.engine.evaluate.open_backend for a model entry of a notebook's params: a `run` of the profile is
    resolved to its trained model first (trained now if it has not finished: `ensure_run_model`)."""
    if config.run is not None:
        config = dataclasses.replace(config, model=ensure_run_model(profile, config.run, params_root), run=None)
    return open_backend(config, cache_dir, progress=progress)


# ------------------------------------------------------------------ notebook 02's held-out check and sweep

HELDOUT_FILE = "heldout.json"  # in a run's (or sweep trial's) out_dir: its held-out answers and check
HELDOUT_FINETUNED = "finetuned"  # the model label of a run's own rows in its held-out check (02's held-out items)


def heldout_samples(params: FinetuneNotebookParams, job: FinetuneJob) -> list:
    """The held-out prompts a run is checked on: the first `eval_samples` of its dataset's eval split (never trained
    on; the dataset is written first if missing)."""
    ensure_dataset(job.data_config, job.data_dir)
    return load_dataset(job.data_dir, "eval")[:params.eval_samples]


def score_heldout(params: FinetuneNotebookParams, model_spec: str, samples: Sequence, label: str
                  ) -> tuple[list[dict], dict]:
    """(rows, the backend's identity): `model_spec`'s answers to key-value `samples`, scored by
    kvlib.tasks.synthetic.evaluate_kv, with notebook 02's numerics (eval_dtype, eval_batch_size, max_new_tokens).
    The one scoring behind 02's held-out table, its sweep and the gate of the evaluation notebooks."""
    backend = HFBackend(model_spec, dtype=params.eval_dtype, batch_size=params.eval_batch_size)
    try:
        return evaluate_kv(backend, samples, params.max_new_tokens, label), backend.identity()
    finally:
        del backend
        gc.collect()  # the next model is loaded beside nothing


def not_learned_reason(value: float | None, n: int, threshold: float) -> str | None:
    """Why a finetune did not learn its own task, or None when it did: its value accuracy on notebook 02's held-out
    prompts (its dataset's eval split) reaches `threshold` (02's learned_threshold). The one rule of every gate."""
    if value is None:
        return "no held-out prompt scored"
    return None if value >= threshold else f"held-out value accuracy {value:.1%} of {n} < {100 * threshold:g}%"


def learned_check(run: str, rows: Sequence[Mapping[str, Any]], threshold: float) -> dict:
    """A finetune's held-out check from its scored rows: {run, n, value (its value accuracy), ci_low, ci_high
    (Wilson 95%), threshold, learned, reason (`not_learned_reason`; None when it learned)}."""
    value, low, high = mean_ci([float(r["value"]) for r in rows]) if rows else (None, None, None)
    reason = not_learned_reason(value, len(rows), threshold)
    return {"run": run, "n": len(rows), "value": value, "ci_low": low, "ci_high": high, "threshold": threshold,
            "learned": reason is None, "reason": reason}


def heldout_check(params: FinetuneNotebookParams, job: FinetuneJob) -> dict:
    """Notebook 02's held-out check of a run or sweep trial, trained first if it has not finished: {rows (its
    answers to `heldout_samples`, scored by `score_heldout`), identity (the backend's), check (`learned_check` at
    params.learned_threshold), file}. Kept in <out_dir>/heldout.json for the weights it scored (their sha256) and
    the scoring settings, so the evaluation notebooks read what 02 measured; a new threshold
    rewrites it (and so makes the notebooks it gates run again). A run the sweep left without a recipe has no rows
    and a check that says why (its file: the sweep's record)."""
    if job.awaiting_sweep:
        job = ready_job(params, job.name)
    if job.not_trained is not None:
        check = {**learned_check(job.name, [], params.learned_threshold), "reason": f"not trained: {job.not_trained}"}
        return {"rows": [], "identity": {}, "check": check, "file": params.sweep_dir / sweep.RECORD_FILE}
    summary = train_job(job, params.launcher)
    out = Path(job.train_config.out_dir)
    path = out / HELDOUT_FILE
    # Keyed by the weights it scored, not by train_summary.json (which holds the wall time): a retraining that gives
    # the same weights keeps this file, so the notebooks that recorded it as an input do not go stale. The hash is the
    # one the scoring backend's identity records (model_identity).
    key = {"weights_sha256": model_identity(summary["model_dir"])["weights_sha256"], **params.heldout_settings()}
    record = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    if record.get("key") != key:
        rows, identity = score_heldout(params, summary["model_dir"], heldout_samples(params, job), HELDOUT_FINETUNED)
        record = {"key": key, "identity": _without_model_path(identity), "rows": [dict(r, run=job.name) for r in rows]}
    check = learned_check(job.name, record["rows"], params.learned_threshold)
    if record.get("check") != check:
        record["check"] = check
        atomic_write_text(path, dumps_json(record))
    return {**record, "file": path}


def _without_model_path(identity: Mapping[str, Any]) -> dict:
    """A backend identity without the model's absolute path (its spec and weights hash stay). Why: heldout.json is an
    input of the evaluation notebooks, compared by its hash, so the same weights must give the same bytes in every
    checkout; with the path, a clone elsewhere that scored the same weights would find them all stale."""
    model = identity.get("model")
    if not isinstance(model, Mapping):
        return dict(identity)
    return {**identity, "model": {k: v for k, v in model.items() if k != "path"}}


def heldout_table(rows: Sequence[Mapping[str, Any]], threshold: float) -> list[dict]:
    """Notebook 02's held-out table: exact, value and dictionary accuracy with Wilson CIs per run and model
    (original, finetuned), and for each finetuned row whether it `learned` its task (`not_learned_reason`)."""
    table = summarize(list(rows), ["run", "model"], ["exact", "value", "dictionary"])
    for row in table:
        row["learned"] = (not_learned_reason(row["value"], row["n"], threshold) is None
                          if row["model"] == HELDOUT_FINETUNED else None)
    return table


def training_table(params: FinetuneNotebookParams) -> list[dict]:
    """One row per training run of notebook 02, in its order (`training_jobs`: the sweep's trials, then the runs):
    dataset, method, epochs and learning rate ("sweep" while a run waits for the sweep's), global batch (per device
    x accumulation x processes), processes, precision, seed."""
    processes = params.launcher.num_processes if params.launcher is not None else 1
    trials = params.sweep_jobs()

    def row(label: str, job: FinetuneJob) -> dict:
        cfg, waiting = job.train_config, job.from_sweep if job.awaiting_sweep else ()

        def shown(field: str, value: Any) -> Any:  # a value still waiting for the sweep reads "sweep"
            return sweep.SWEEP if field in waiting else value

        return {"run": label, "dataset": shown(sweep.DATASET, job.dataset),
                "num_dicts": shown(sweep.DATASET, job.data_config.num_dicts),
                "n_train": shown(sweep.DATASET, job.data_config.n_train), "method": cfg.method,
                "epochs": shown("epochs", cfg.epochs), "learning_rate": shown("learning_rate", cfg.learning_rate),
                "global_batch": cfg.global_batch_size * processes, "processes": processes,
                "precision": cfg.precision, "seed": cfg.seed}

    return ([row(f"sweep trial {name}", job) for name, job in trials.items()]
            + [row(job.name, job) for job in params.training_jobs()[len(trials):]])


def run_sweep(params: FinetuneNotebookParams) -> tuple[list[dict], dict | None]:
    """Notebook 02's sweep over training length x learning rate x epochs: every trial trained (or reused) and checked
    on its held-out prompts (`heldout_check`), the recipe picked by kvlib.pipeline.sweep.select and recorded where the
    runs read it (FinetuneNotebookParams.sweep_outcome). Returns (one row per trial: dataset, dictionaries, learning
    rate, epochs, optimizer steps, lr x steps, held-out value accuracy with its Wilson CI, learned, chosen; a trial
    at a length shorter than one that learned is not trained, and its row says so in not_trained; the outcome), or
    ([], None) without a sweep."""
    trials, skipped, learned_at = [], [], 0
    for name, job in params.sweep_jobs().items():  # longest first
        cfg = job.train_config
        if job.data_config.num_dicts < learned_at:  # cannot win: a longer length learned (sweep.RULE)
            skipped.append({"trial": name, "dataset": job.dataset, "num_dicts": job.data_config.num_dicts,
                            "learning_rate": cfg.learning_rate, "epochs": cfg.epochs,
                            "not_trained": f"a trial at {learned_at} dictionaries learned"})
            continue
        check = heldout_check(params, job)["check"]
        summary = training.read_summary(cfg.out_dir)
        steps = summary["global_steps"]
        trials.append({"trial": name, "dataset": job.dataset, "num_dicts": job.data_config.num_dicts,
                       "learning_rate": cfg.learning_rate, "epochs": cfg.epochs, "steps": steps,
                       "lr_x_steps": cfg.learning_rate * steps, **{k: check[k] for k in ("n", "value", "ci_low",
                                                                                           "ci_high", "learned")}})
        if sweep.has_learned(check["value"], params.learned_threshold):
            learned_at = max(learned_at, job.data_config.num_dicts)
    if not trials:
        return [], None
    outcome = sweep.select(trials, params.learned_threshold)
    sweep.write_record(params.sweep_dir / sweep.RECORD_FILE, params.sweep_key(), [*trials, *skipped], outcome)
    return [*(dict(t, chosen=t["trial"] == outcome["winner"]) for t in trials),
            *(dict(t, chosen=False) for t in skipped)], outcome


# ------------------------------------------------------------------ only finetunes that learned are evaluated

LEARNED_TABLE = "learned_own_task"  # <notebook>/learned_own_task.csv: the gate an evaluation notebook applied


@dataclass
class LearnedGate:
    """Which models enter an evaluation notebook (03-08): every model that is not an HF run of notebook 02, and
    every run that learned its own task by 02's held-out check (`heldout_check`: its prompts, numerics and
    threshold, read from what 02 wrote). A run that did not learn is not evaluated; its claims, and those of any
    seed group holding it, say NOT_TESTED with the accuracy measured (`judge`)."""

    models: dict[str, Any]  # the notebook's models as its params give them
    seed_groups: dict[str, list[str]]  # its seed groups as its params give them
    checks: dict[str, dict]  # model label -> the held-out check of its run
    files: list[Path]  # where the checks were read from (recorded as the notebook's inputs)

    @property
    def failed(self) -> dict[str, str]:
        """Model label -> why, for each run that did not learn its task."""
        return {label: check["reason"] for label, check in self.checks.items() if not check["learned"]}

    @property
    def learned_seed_groups(self) -> dict[str, list[str]]:
        """The seed groups all of whose members learned: the ones averaged and judged (a group with a member left
        out is not tested; its other members are reported one by one, not judged)."""
        return {group: list(ms) for group, ms in self.seed_groups.items() if not any(m in self.failed for m in ms)}

    def reasons(self) -> dict[str, str]:
        """Each judged label (a model outside the seed groups, or a group) that is not tested -> why."""
        failed = self.failed
        members = {m for ms in self.seed_groups.values() for m in ms}
        out = {label: why for label, why in failed.items() if label not in members}
        for group, ms in self.seed_groups.items():
            if any(m in failed for m in ms):
                out[group] = "; ".join(f"{m}: {failed[m]}" for m in ms if m in failed)
        return out

    def evaluated(self, configs: Mapping[str, BackendConfig]) -> dict[str, BackendConfig]:
        """`configs` without the runs that did not learn: no compute is spent on them."""
        return {label: config for label, config in configs.items() if label not in self.failed}

    def judge(self, claims: Callable[..., list[dict]], deltas: Sequence[Mapping[str, Any]],
              keys: Sequence[Mapping[str, Any]], base: str, *args: Any, **kwargs: Any) -> list[dict]:
        """`claims(deltas, judged, *args, **kwargs)` (a claims function of kvlib.report.paper: difference rows, the labels judged
        against `base`) with the models and seed groups that are not tested in it too: each gets a placeholder row
        per key (`keys`: what this notebook's difference rows are keyed by, e.g. [{"setting": ...}]), so its claims
        are listed, marked NOT_TESTED with why (kvlib.report.paper.mark_not_tested)."""
        judged = synthetic_models(self.models, base, self.seed_groups)
        return paper.mark_not_tested(claims([*deltas, *self.placeholders(keys)], judged, *args, **kwargs), self.reasons())

    def placeholders(self, keys: Sequence[Mapping[str, Any]]) -> list[dict]:
        """A difference row without numbers per key for each label that is not tested (`reasons`): where its claims
        go, since it was not evaluated."""
        return [{"model": label, **key} for label in self.reasons() for key in keys]

    def table(self) -> list[dict]:
        """One row per model that is a run: its run, held-out value accuracy with CI, the threshold, learned, why not."""
        fields = ("run", "n", "value", "ci_low", "ci_high", "threshold", "learned", "reason")
        return [{"model": label, **{k: check[k] for k in fields}} for label, check in self.checks.items()]

    def report(self, results_dir: str | Path, notebook: str):
        """What an evaluation notebook keeps of its gate: the checks' files recorded as its inputs (a changed check
        runs it again) and `table` saved as <notebook>/learned_own_task; returns the table (a DataFrame)."""
        import pandas as pd

        manifest.record_inputs(results_dir, notebook, self.files)
        table = pd.DataFrame(self.table())
        if len(table):
            save_table(table, notebook_output_dir(results_dir, notebook) / LEARNED_TABLE)
        return table


def learned_gate(P: Any) -> LearnedGate:
    """The LearnedGate of an evaluation notebook's params `P` (models, seed_groups, profile, params_root): notebook
    02's held-out check of each of its models that is an HF run of 02 (`heldout_check`, read from what 02 wrote; the
    same function measures it now where 02 has not run, training the run first as its first use would). OpenAI runs
    have no held-out check: they enter as they are."""
    finetune = profile_finetune_params(P.profile, P.params_root)
    jobs = finetune.jobs()
    checks, files = {}, []
    for label, config in P.model_configs().items():
        if config.run in jobs:
            record = heldout_check(finetune, jobs[config.run])
            checks[label] = record["check"]
            files.append(record["file"])
    return LearnedGate(dict(P.models), {g: list(ms) for g, ms in P.seed_groups.items()}, checks,
                       list(dict.fromkeys(files)))


def committed_gate(notebook_dir: str | Path, models: Mapping[str, Any], seed_groups: Mapping[str, Sequence[str]]
                   ) -> LearnedGate:
    """The LearnedGate an evaluation notebook applied, read back from the table it committed (`LearnedGate.report`
    in `notebook_dir`), so that its claims can be judged again from its item files as it judged them
    (kvlib.pipeline.rejudge). No table: the notebook evaluated every model (none of them was a run of 02)."""
    path = Path(notebook_dir) / f"{LEARNED_TABLE}.csv"
    checks: dict[str, dict] = {}
    if path.is_file():
        with path.open(newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh):
                learned = row["learned"].strip().lower()
                if learned not in ("true", "false"):
                    raise ValueError(f"{path}: learned must be True or False, not {row['learned']!r} "
                                     f"(model {row['model']!r})")
                checks[row["model"]] = {
                    "run": row["run"], "n": int(row["n"]), "threshold": float(row["threshold"]),
                    **{k: float(row[k]) if row[k] != "" else None for k in ("value", "ci_low", "ci_high")},
                    "learned": learned == "true", "reason": row["reason"] or None}
    return LearnedGate(dict(models), {g: list(ms) for g, ms in seed_groups.items()}, checks,
                       [path] if path.is_file() else [])


def evaluate_mdqa_sets(configs: Mapping[str, BackendConfig], sets: Mapping[str, Any], positions: Sequence[int],
                       max_new_tokens: int, cache_dir: str | Path | None, profile: str,
                       params_root: str | Path = "params") -> list[dict]:
    """Every model (label -> BackendConfig, opened one at a time) on every MDQA set at every gold position:
    the rows of `evaluate_mdqa` (notebooks 03 and 08)."""
    rows = []
    for label, config in configs.items():
        with open_model(config, cache_dir, profile, params_root) as model:
            for eval_set in sets.values():
                rows += evaluate_mdqa(model, eval_set, positions, max_new_tokens, label)
    return rows
