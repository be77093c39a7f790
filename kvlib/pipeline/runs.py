"""The finetuning runs of a profile as models: a notebook's `run:` model entry is resolved here to the trained
model (trained first if it has not finished), so the engine only ever opens models.
"""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, ContextManager, Mapping, Sequence

import yaml

from kvlib.engine import train as training
from kvlib.engine.backends import BackendConfig
from kvlib.engine.config import ParamError, to_mapping
from kvlib.engine.evaluate import open_backend
from kvlib.engine.io import atomic_write_text
from kvlib.engine.openai_ft import STATE_FILE
from kvlib.engine.train import LauncherConfig, TrainConfig
from kvlib.pipeline.notebooks import FinetuneJob, profile_finetune_params
from kvlib.tasks.mdqa import evaluate_mdqa
from kvlib.engine.stats import mean_ci
from kvlib.tasks.synthetic import ensure_dataset, evaluate_kv, load_dataset


def ensure_run_model(profile: str, run: str, params_root: str | Path = "params") -> str:
    """The model a finetuning run of the profile produced: an HF run's saved model directory (trained now,
    from its dataset, if it has not finished: finished runs are reused, interrupted ones resume), or an
    OpenAI run's fine-tuned model name (which needs notebook 02 with openai_submit)."""

    params = profile_finetune_params(profile, params_root)
    jobs, openai_jobs = params.jobs(), params.openai_jobs()
    if run in jobs:  # its dataset is written first if missing
        return train_job(jobs[run], params.launcher)["model_dir"]
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
    return json.loads((out / training.SUMMARY_FILE).read_text())


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
    """`train_run` for a run of notebook 02 (its dataset written first if missing)."""
    ensure_dataset(job.data_config, job.data_dir)
    return train_run(job.train_config, launcher, where=f"run {job.name}", **kwargs)


def open_model(config: BackendConfig, cache_dir: str | Path | None, profile: str,
               params_root: str | Path = "params", progress: bool = True) -> ContextManager[Any]:
    """kvlib.engine.evaluate.open_backend for a model entry of a notebook's params: a `run` of the profile is
    resolved to its trained model first (trained now if it has not finished: `ensure_run_model`)."""
    if config.run is not None:
        config = dataclasses.replace(config, model=ensure_run_model(profile, config.run, params_root), run=None)
    return open_backend(config, cache_dir, progress=progress)


def heldout_value_accuracy(config: BackendConfig, label: str, profile: str, params_root: str | Path,
                           cache_dir: str | Path | None, samples: int, max_new_tokens: int) -> dict | None:
    """Did the finetuning run behind `config` learn its own task? Its value accuracy on the first `samples` held-out
    prompts (eval split) of its own dataset, with a Wilson 95% CI: {label, run, n, value, ci_low, ci_high}. None
    for a model that is not an HF run of the profile (nothing to check)."""
    if config.run is None:
        return None
    jobs = profile_finetune_params(profile, params_root).jobs()
    if config.run not in jobs:
        return None
    job = jobs[config.run]
    ensure_dataset(job.data_config, job.data_dir)
    held = load_dataset(job.data_dir, "eval")[:samples]
    with open_model(config, cache_dir, profile, params_root) as model:
        rows = evaluate_kv(model, held, max_new_tokens, label)
    value, lo, hi = mean_ci([float(r["value"]) for r in rows])
    return {"label": label, "run": config.run, "n": len(rows), "value": value, "ci_low": lo, "ci_high": hi}


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
