"""Planning a profile run: discover the notebooks, validate each one's params file against its params class
(kvlib.pipeline.notebooks) before any compute, and describe what every job would run and what its models need.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from kvlib.engine import models
from kvlib.engine.config import ParamError, from_mapping, load_yaml, to_mapping
from kvlib.engine.io import file_sha256, sha256_text
from kvlib.pipeline.notebooks import INJECTED, NOTEBOOKS, STAGING

# Injected by the runner, never read from a params file: the profile name, the results directory (a staging
# folder) and the params directory (`--params-dir`: where `run:` models and datasets of the profile are looked up).
RESERVED_PARAMS = ("profile", "results_dir", "params_root")



# Where a run reads its params and writes its outputs on this machine: injected, but not part of what the run
# computes, so neither in its params hash nor in the manifest.
LOCAL_PARAMS = ("results_dir", "params_root")



# `skip: <why>` as the whole params file: the notebook does not apply to this profile (e.g. the longer-context
# experiment for GPT-3.5); recorded as skipped with the reason, never run.
SKIP_KEY = "skip"



_NOTEBOOK_RE = re.compile(r"^\d{2}_\w+$")



@dataclass(frozen=True)
class NotebookJob:
    """One validated notebook run: what to execute and the fingerprints that decide whether it is stale."""

    name: str
    notebook: Path
    params_file: Path
    injected: dict  # what papermill injects: {kvlib_params: YAML params + profile + results_dir (staging)}
    seeds: dict  # dotted path -> value, from the validated params (so defaults count too)
    params_sha256: str
    notebook_sha256: str
    config: Any = dataclasses.field(default=None, compare=False, repr=False)  # the validated params object
    skip: str | None = None  # the params file says this notebook does not apply to the profile, and why

    @property
    def params(self) -> dict:
        # where this run stages its outputs and reads its params: neither changes the hash or lands in the manifest
        return {k: v for k, v in self.injected.get(INJECTED, self.injected).items() if k not in LOCAL_PARAMS}



def discover_notebooks(notebooks_dir: Path) -> dict[str, Path]:
    """`NN_name` -> path for the notebooks in `notebooks_dir`, in run order (sorted by name)."""
    if not notebooks_dir.is_dir():
        raise ParamError(f"notebooks: directory {notebooks_dir} not found")
    found = {p.stem: p for p in sorted(notebooks_dir.glob("*.ipynb")) if _NOTEBOOK_RE.match(p.stem)}
    if not found:
        raise ParamError(f"notebooks: no NN_name.ipynb notebooks in {notebooks_dir}")
    return found



def profile_dir(profile: str, params_root: Path) -> Path:
    """`params_root/profile`, or ParamError naming the known profiles."""
    path = params_root / profile
    if not profile or Path(profile).name != profile or not path.is_dir():
        known = sorted(p.name for p in params_root.iterdir() if p.is_dir()) if params_root.is_dir() else []
        known_text = ", ".join(known) or "none"
        raise ParamError(f"profile: unknown profile {profile!r} (no directory {path}); known profiles: {known_text}")
    return path



def _select(notebooks: Mapping[str, Path], only: list[str] | None) -> list[str]:
    """Names to run, always in notebook order; `only` accepts `NN_name`, `NN_name.ipynb` or a path."""
    if not only:
        return list(notebooks)
    wanted = {Path(n).name.removesuffix(".ipynb") for n in only}
    unknown = sorted(wanted - set(notebooks))
    if unknown:
        raise ParamError(f"only: unknown notebook {unknown[0]!r}; known: {', '.join(notebooks)}")
    return [n for n in notebooks if n in wanted]



def params_class(name: str) -> type:
    """The params dataclass of notebook `name` (kvlib.pipeline.notebooks.NOTEBOOKS)."""
    spec = NOTEBOOKS.get(name)
    if spec is None:
        raise ParamError(f"{name}: no params class registered; every notebook must have one in "
                         f"kvlib.pipeline.notebooks.NOTEBOOKS")
    if not (isinstance(spec, type) and dataclasses.is_dataclass(spec)):
        raise ParamError(f"{name}: params class {spec!r} is not a dataclass")
    return spec


def find_seeds(data: Any, prefix: str = "") -> dict[str, Any]:
    """Every value under a key whose name ends with `seed` or `seeds` (`seed`, `question_seed`,
    `distractor_seed`), by dotted path (`datasets.train.seed`, `runs[0].seed`, `question_seed`)."""
    found: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if isinstance(key, str) and key.lower().endswith(("seed", "seeds")):
                found[path] = value
            found.update(find_seeds(value, path))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found.update(find_seeds(value, f"{prefix}[{i}]"))
    return found



def _relative_to(path: Path, root: Path) -> str:
    """`path` relative to `root` when it is inside it (POSIX spelling), else absolute."""
    try:
        return path.relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.as_posix()



def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)



def make_job(name: str, notebook: Path, profile: str, profile_dir: Path, results_dir: Path) -> NotebookJob:
    params_file = profile_dir / f"{name}.yaml"
    if not params_file.is_file():
        raise ParamError(f"{params_file}: params file not found (every notebook run in {profile!r} needs one)")
    data = load_yaml(params_file)
    if isinstance(data, dict) and SKIP_KEY in data:
        reason = data[SKIP_KEY]
        if set(data) != {SKIP_KEY} or not isinstance(reason, str) or not reason.strip():
            raise ParamError(f"{params_file}: {SKIP_KEY}: a notebook that does not apply to a profile has a params "
                             f"file holding only `{SKIP_KEY}: <why>`")
        return NotebookJob(name=name, notebook=notebook, params_file=params_file, injected={"profile": profile},
                           seeds={}, params_sha256=sha256_text(_canonical_json(data)),
                           notebook_sha256=file_sha256(notebook), skip=reason.strip())
    reserved = sorted(set(data) & set(RESERVED_PARAMS))
    if reserved:
        raise ParamError(f"{params_file}: {reserved[0]}: set by kvlib reproduce, remove it from the params file")
    if not data:
        raise ParamError(f"{params_file}: empty params file: set the notebook's params for this profile (or "
                         f"`{SKIP_KEY}: <why>` for a notebook that does not apply to it)")
    # The notebook writes into a staging folder that the runner moves into results/<profile>/ on success only, and
    # looks up the profile's runs and datasets in the params directory this profile came from (`--params-dir`):
    # validated here with its absolute path, injected relative to the repository root (the kernel's working
    # directory) when it is inside it, so no machine path lands in the executed notebook.
    params_root = profile_dir.parent.resolve()
    params = {**data, "profile": profile, "results_dir": str(results_dir / STAGING),
              "params_root": _relative_to(params_root, notebook.resolve().parent.parent)}
    cls = params_class(name)
    # The class sees the runner-injected values only if it declares them (notebooks may or may not use them).
    declared = {f.name for f in dataclasses.fields(cls)}
    try:
        obj = from_mapping(cls, {k: v for k, v in {**params, "params_root": str(params_root)}.items()
                                 if k in data or k in declared})
    except ParamError as exc:
        raise ParamError(f"{params_file}: {exc}") from None
    if "params_root" not in declared:  # a notebook that looks nothing up in the params directory
        del params["params_root"]
    injected = {INJECTED: params}
    job_params = {k: v for k, v in params.items() if k not in LOCAL_PARAMS}
    try:
        params_json = _canonical_json(job_params)
    except TypeError as exc:  # e.g. a YAML date: papermill could not inject it faithfully either
        raise ParamError(f"{params_file}: params must be plain YAML data (strings, numbers, lists, maps): {exc}")
    return NotebookJob(
        name=name,
        notebook=notebook,
        params_file=params_file,
        injected=injected,
        seeds=find_seeds(to_mapping(obj)),
        params_sha256=sha256_text(params_json),
        notebook_sha256=file_sha256(notebook),
        config=obj,
    )



def plan_profile(
    profile: str, only: list[str] | None, params_root: Path, notebooks_dir: Path, results_dir: Path
) -> list[NotebookJob]:
    """Validate everything a run needs and return its jobs; raises ParamError listing every problem found."""
    folder = profile_dir(profile, params_root)
    notebooks = discover_notebooks(notebooks_dir)
    jobs, errors = [], []
    for name in _select(notebooks, only):
        try:
            jobs.append(make_job(name, notebooks[name], profile, folder, results_dir))
        except ParamError as exc:
            errors.append(str(exc))
    if errors:
        raise ParamError("\n".join(errors))
    return jobs



RUN_REFERENCE_KEYS = ("run", "match")  # params keys whose value names a finetuning run of 02_finetune



def referenced_runs(data: Any) -> list[str]:
    """Names of the finetuning runs a notebook's params refer to (`{run: X}` models, `match: X`), sorted."""
    found: set[str] = set()
    if isinstance(data, Mapping):
        for key, value in data.items():
            if key in RUN_REFERENCE_KEYS and isinstance(value, str):
                found.add(value)
            else:
                found.update(referenced_runs(value))
    elif isinstance(data, (list, tuple)):
        for value in data:
            found.update(referenced_runs(value))
    return sorted(found)



def _describe_model(spec: str | None) -> str:

    spec = spec or models.DEFAULT_MODEL
    if models._gguf_source(spec) is not None:
        return f"{spec} (embedded, ready offline)"
    if Path(spec).expanduser().is_dir():
        return f"{spec} (local directory)"
    return f"{spec} (Hugging Face hub: weights downloaded on first use)"



def _describe_api(model: str | None, base_url: str | None, key_env: str) -> str:
    if str(base_url or "").startswith(("http://127.", "http://localhost")):
        return f"{model} via the OpenAI-compatible server at {base_url} (loopback, no key)"
    where = base_url or "api.openai.com"
    return f"{model} via {where} (${key_env} {'set' if os.environ.get(key_env) else 'unset'})"



def model_requirements(config: Any) -> list[str]:
    """What a notebook's models need before it can run, from its validated params object: an embedded or local
    model is ready; a hub id needs its weights (downloaded on first use); an API model needs its key's
    environment variable (reported as set or unset, never the value); a `run` is trained by 02_finetune."""
    needs: list[str] = []
    if hasattr(config, "model_configs"):
        for label, cfg in config.model_configs().items():
            if cfg.kind == "openai":
                needs.append(f"{label}: " + _describe_api(cfg.model or f"run {cfg.run}", cfg.base_url, cfg.api_key_env))
            elif cfg.run is not None:
                needs.append(f"{label}: run {cfg.run} of 02_finetune (trained there, or on first use)")
            else:
                needs.append(f"{label}: {_describe_model(cfg.model)}")
    if getattr(config, "runs", None):
        needs.append(f"finetuning base: {_describe_model(config.base_model)}")
    if hasattr(config, "openai_jobs"):
        for name, job in config.openai_jobs().items():
            submit = ("submitted: " + _describe_api(job.train_config.model, None, "OPENAI_API_KEY")
                      if config.openai_submit else "validated and costed only (openai_submit: false)")
            needs.append(f"OpenAI fine-tuning {name}: {submit}")
    return needs
