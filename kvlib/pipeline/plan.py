"""Planning a profile run: discover the notebooks, validate each one's params file against its params class
(kvlib.pipeline.notebooks) before any compute, and describe what every job would run and what its models need.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, Mapping

import yaml

from kvlib.engine import models
from kvlib.engine.config import ParamError, from_mapping, load_yaml, to_mapping
from kvlib.engine.io import atomic_write_text, file_sha256, sha256_text
from kvlib.pipeline.notebooks import (
    FINETUNE,
    INJECTED,
    NOTEBOOKS,
    STAGING,
    SYNTHETIC_DATA,
    params_overlay,
)
from kvlib.tasks.flenqa import FLenQAConfig
from kvlib.tasks.synthetic import GenerationConfig

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



def make_job(name: str, notebook: Path, profile: str, profile_dir: Path, results_dir: Path,
             data: Mapping[str, Any] | None = None) -> NotebookJob:
    """The validated job of notebook `name` from its params file in `profile_dir`, or from `data` (the params a
    run with --model/--set plans to write there)."""
    params_file = profile_dir / f"{name}.yaml"
    if data is None:
        if not params_file.is_file():
            raise ParamError(f"{params_file}: params file not found (every notebook run in {profile!r} needs one)")
        data = load_yaml(params_file)
    data = dict(data)
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



# ------------------------------------------------------------------------------------- any model, any param

ENDPOINT_PREFIX = "openai:"  # --model openai:<model>[@<base_url>]: an OpenAI-compatible chat endpoint
VARIANTS_DIR = "variants"  # generated data and trained models of a run with --model/--set: <dir>/variants/<slug>/
# params holding where a notebook writes generated data or trained models (relative to the repository root):
# a run with --model/--set writes under <value>/variants/<slug>/, never over the profile's own
_WRITE_DIRS = {SYNTHETIC_DATA: ("data_dir",), FINETUNE: ("models_dir",), "04_flenqa": ("data_dir",),
               "06_baselines": ("data_dir", "models_dir")}
_INJECTED_BY_RUNNER = (*RESERVED_PARAMS, "params_root")
# 02's dry-run fields describe the profile's own base model (its architecture and offline token counter)
_BASE_ONLY_RUN_FIELDS = ("dry_run_tokenizer", "dry_run_model_config")
_UNSET = object()


@dataclass(frozen=True)
class Overrides:
    """What `kvlib reproduce --model SPEC --set NOTEBOOK.KEY=VALUE` changes in a profile's params. `model` replaces
    the profile's base model (02's base_model) everywhere (`apply_overrides`); each `sets` entry sets one param,
    its value parsed as YAML (`parse_set`). Applied to the loaded params before validation."""

    model: str | None = None
    sets: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.model is not None or bool(self.sets)


@dataclass
class ProfileVariant:
    """A profile run with overrides: its params per notebook (transformed, validated with the profile's classes),
    what changed, and where it goes: results/<profile>/<slug>/, with the params it ran with written under its
    params/<profile>/ (`params_root`, what the notebooks read each other's params from)."""

    profile: str
    base_model: str  # the profile's own (02's base_model)
    model: str  # the base model of this run
    slug: str
    overrides: Overrides
    params: dict[str, dict]  # notebook -> params data
    changes: list[str]
    params_root: Path  # absolute
    params_root_value: str  # as injected (relative to the repository root when inside it)

    def planned_files(self) -> dict[Path, dict]:
        files = {}
        for name, data in self.params.items():
            files[Path(self.params_root_value) / self.profile / f"{name}.yaml"] = data
            files[self.params_root / self.profile / f"{name}.yaml"] = data
        return files

    def command(self) -> str:
        parts = [f"kvlib reproduce --profile {self.profile}"]
        if self.overrides.model is not None:
            parts.append(f"--model {self.overrides.model}")
        parts += [f"--set {text!r}" for text in self.overrides.sets]
        return " ".join(parts)

    def write(self) -> None:
        """Write the params this run executes with, one YAML per notebook, each headed by the command and changes."""
        folder = self.params_root / self.profile
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.params.items():
            mine = [c for c in self.changes if c.startswith(f"{name}.") or c.startswith(f"{name}:")]
            head = [f"# {self.command()}: params/{self.profile}/{name}.yaml with"]
            head += [f"#   {c}" for c in mine] or ["#   no change to this notebook's params"]
            atomic_write_text(folder / f"{name}.yaml",
                              "\n".join(head) + "\n" + yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def describe(self) -> list[str]:
        where = f"{self.params_root.parent}{os.sep}"
        lines = [f"{self.command()}: base model {self.base_model} -> {self.model}; results in {where} (the params it "
                 f"runs with: {self.params_root / self.profile}{os.sep})"]
        return lines + [f"    {c}" for c in self.changes]


def parse_endpoint(spec: str) -> tuple[str, str | None] | None:
    """(model, base_url or None) of an `openai:<model>[@<base_url>]` spec, else None."""
    if not str(spec).startswith(ENDPOINT_PREFIX):
        return None
    model, _, base_url = str(spec)[len(ENDPOINT_PREFIX):].partition("@")
    if not model.strip():
        raise ParamError(f"model: {spec!r}: expected openai:<model> or openai:<model>@<base_url>")
    if base_url and not base_url.startswith(("http://", "https://")):
        raise ParamError(f"model: {spec!r}: the base URL after @ must be http(s)://...")
    return model.strip(), base_url or None


def normalize_model(spec: str) -> str:
    """The --model SPEC checked and made unambiguous (a local directory as an absolute path); nothing is loaded."""
    if parse_endpoint(spec) is not None:
        return str(spec).strip()
    return models.normalize_model_spec(spec, "model")


def _slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-.") or "model"


def model_slug(spec: str) -> str:
    """The folder name of a model's results (results/<profile>/<slug>/): an embedded model's name, a local
    directory's name (with its parent's for a generic name like `model`), a hub id with `--` for `/`, `api-<name>`
    for an endpoint."""
    endpoint = parse_endpoint(spec)
    if endpoint is not None:
        return "api-" + _slugify(endpoint[0])
    embedded = models._embedded_name(spec)
    if embedded is not None:
        return embedded
    path = Path(spec).expanduser()
    if path.exists():
        path = path.resolve()
        name = path.stem if path.is_file() else path.name
        if name.lower() in ("model", "final", "checkpoint", "merged") or name.lower().startswith("checkpoint-"):
            name = f"{path.parent.name}-{name}"
        return _slugify(name)
    return _slugify(str(spec).replace("/", "--"))


def parse_set(text: str, names: list[str]) -> tuple[str, list[str], Any]:
    """(notebook, keys, value) of `NOTEBOOK.KEY=VALUE`: NOTEBOOK is a notebook's name or number (`03_mdqa`, `03`),
    KEY a dotted path into its params (`datasets.simple-template.n_train`), VALUE parsed as YAML (`3`, `null`,
    `[1, 5]`, `{kind: accelerate, num_processes: 2}`)."""
    where = f"--set {text}"
    lhs, eq, raw = str(text).partition("=")
    notebook, _, path = lhs.strip().partition(".")
    if not eq or not notebook or not path:
        raise ParamError(f"{where}: expected NOTEBOOK.KEY=VALUE (e.g. 03_mdqa.num_questions=5)")
    matches = [n for n in names if notebook in (n, n.split("_", 1)[0], n.split("_", 1)[-1])]
    if len(matches) != 1:
        raise ParamError(f"{where}: unknown notebook {notebook!r}; known: {', '.join(names)}")
    keys = path.split(".")
    if any(not k.strip() for k in keys):
        raise ParamError(f"{where}: empty key in {path!r}")
    if keys[0] in _INJECTED_BY_RUNNER:
        raise ParamError(f"{where}: {keys[0]} is set by kvlib reproduce")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ParamError(f"{where}: the value is not YAML: {exc}") from None
    return matches[0], keys, value


def _show(value: Any) -> str:
    if value is _UNSET:
        return "(unset)"
    return json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value


def _live(data: Any) -> bool:
    return isinstance(data, dict) and SKIP_KEY not in data


def _default(cls: type, name: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def profile_base_model(params: Mapping[str, Any]) -> str:
    """The profile's base model: 02's base_model (its params class default when the file does not set it)."""
    data = params.get(FINETUNE)
    if _live(data) and data.get("base_model"):
        return str(data["base_model"])
    return str(_default(NOTEBOOKS[FINETUNE], "base_model"))


def _replace_base_model(params: dict[str, dict], base: str, spec: str, changes: list[str]) -> None:
    """--model: `spec` replaces `base` as 02's base_model, in every `models:` entry that is the base, and as the
    tokenizer of every token budget measured in the base's tokens (01's datasets, FLenQA's generation, explicit
    baseline tokenizers). An endpoint (openai:...) is not finetuned: 02 and 06 (training) are skipped and the runs
    leave the evaluation notebooks."""
    endpoint = parse_endpoint(spec)
    tokenizer = None if endpoint else (models.spm_tokenizer_alias(spec) or spec)

    def retokenize(where: str, holder: dict, default: str | None) -> None:
        current = holder.get("tokenizer", default)
        if tokenizer and current and models.same_tokenizer(str(current), base) and current != tokenizer:
            holder["tokenizer"] = tokenizer
            changes.append(f"{where}.tokenizer: {current} -> {tokenizer}")

    synthetic = params.get(SYNTHETIC_DATA)
    if _live(synthetic):
        default = _default(GenerationConfig, "tokenizer")
        for name, entry in (synthetic.get("datasets") or {}).items():
            if isinstance(entry, dict):
                retokenize(f"{SYNTHETIC_DATA}.datasets.{name}", entry, default)
    finetune = params.get(FINETUNE)
    if _live(finetune):
        if endpoint:
            reason = f"the base model {spec} is an API endpoint: kvlib finetunes local weights only"
            params[FINETUNE] = {SKIP_KEY: reason}
            changes.append(f"{FINETUNE}: skipped ({reason})")
        else:
            changes.append(f"{FINETUNE}.base_model: {finetune.get('base_model', base)} -> {spec}")
            finetune["base_model"] = spec
            for name, run in (finetune.get("runs") or {}).items():
                for key in _BASE_ONLY_RUN_FIELDS:
                    if isinstance(run, dict) and key in run:
                        changes.append(f"{FINETUNE}.runs.{name}.{key}: {run.pop(key)} -> (unset: describes {base})")
    if endpoint and _live(params.get("06_baselines")):
        reason = f"the baselines are finetuned from the base model, and {spec} is an API endpoint"
        params["06_baselines"] = {SKIP_KEY: reason}
        changes.append(f"06_baselines: skipped ({reason})")
    for name, data in params.items():
        cls = NOTEBOOKS.get(name)
        if not _live(data) or cls is None or "models" not in {f.name for f in dataclasses.fields(cls)}:
            continue
        if "models" not in data:
            data["models"] = _default(cls, "models")
        kind = (data.get("backend") or {}).get("kind", "hf")
        dropped = []
        for label, entry in list(data["models"].items()):
            entry = dict(entry or {})
            if entry.get("run") is not None:
                if endpoint and entry.get("kind", kind) != "openai":
                    dropped.append(label)
                    del data["models"][label]
                continue
            current = entry.get("model") or models.DEFAULT_MODEL
            if entry.get("kind", kind) == "openai" or not models.same_model(str(current), base):
                continue
            if endpoint:
                entry.update(kind="openai", model=endpoint[0])
                if endpoint[1]:
                    entry["base_url"] = endpoint[1]
            else:
                entry["model"] = spec
            data["models"][label] = entry
            changes.append(f"{name}.models.{label}.model: {current} -> {spec}")
        if dropped:
            changes.append(f"{name}.models: {', '.join(dropped)} left out (runs of 02, which an endpoint skips)")
            groups = {g: [m for m in ms if m not in dropped] for g, ms in (data.get("seed_groups") or {}).items()}
            if "seed_groups" in data:
                data["seed_groups"] = {g: ms for g, ms in groups.items() if ms}
            if "harness_crosscheck" in data:
                data["harness_crosscheck"] = [label for label in data["harness_crosscheck"] if label in data["models"]]
        if endpoint and data.get("harness_crosscheck"):
            local = [label for label in data["harness_crosscheck"]
                     if (data["models"].get(label) or {}).get("kind", kind) != "openai"]
            if local != data["harness_crosscheck"]:
                changes.append(f"{name}.harness_crosscheck: {data['harness_crosscheck']} -> {local} (an API has no "
                               f"local weights to cross-check)")
                data["harness_crosscheck"] = local
    flenqa = params.get("04_flenqa")
    if _live(flenqa):
        flenqa["generation"] = dict(flenqa.get("generation") or {})
        retokenize("04_flenqa.generation", flenqa["generation"], _default(FLenQAConfig, "tokenizer"))
    baselines = params.get("06_baselines")
    if _live(baselines):
        if isinstance(baselines.get("flenqa"), dict):
            baselines["flenqa"]["generation"] = dict(baselines["flenqa"].get("generation") or {})
            retokenize("06_baselines.flenqa.generation", baselines["flenqa"]["generation"],
                       _default(FLenQAConfig, "tokenizer"))
        for label, spec_ in (baselines.get("baselines") or {}).items():
            if isinstance(spec_, dict):  # default: the matched dataset's tokenizer, replaced above
                retokenize(f"06_baselines.baselines.{label}", spec_, None)


def _apply_set(params: dict[str, dict], profile: str, text: str, changes: list[str]) -> None:
    name, keys, value = parse_set(text, list(params))
    data = params[name]
    if not _live(data):
        raise ParamError(f"--set {text}: {name} does not apply to profile {profile} ({data.get(SKIP_KEY)})")
    node, where = data, name
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ParamError(f"--set {text}: {where}.{key} is {_show(child)}, not a mapping of params")
        node, where = child, f"{where}.{key}"
    old = node.get(keys[-1], _UNSET)
    node[keys[-1]] = value
    changes.append(f"{name}.{'.'.join(keys)}: {_show(old)} -> {_show(value)} (--set)")


def apply_overrides(profile: str, params: Mapping[str, Any], overrides: Overrides,
                    slug: str) -> tuple[dict[str, dict], list[str]]:
    """The profile's params (notebook -> data, as loaded) with `overrides` applied, and what changed: the base model
    replaced (`_replace_base_model`), generated data and trained models moved under <dir>/variants/<slug>/, then
    each --set, in order. (The notebooks read the params this run writes: `make_job` injects their folder as
    `params_root`.)"""
    params = copy.deepcopy({name: dict(data) if isinstance(data, Mapping) else data for name, data in params.items()})
    changes: list[str] = []
    base = profile_base_model(params)
    if overrides.model is not None:
        _replace_base_model(params, base, overrides.model, changes)
    for name, keys in _WRITE_DIRS.items():
        data = params.get(name)
        if _live(data):
            for key in keys:
                data[key] = f"{data.get(key, _default(NOTEBOOKS[name], key))}/{VARIANTS_DIR}/{slug}"
    for text in overrides.sets:
        _apply_set(params, profile, text, changes)
    return params, changes


@dataclass
class RunPlan:
    """What `kvlib reproduce` runs: the validated jobs, the results folder and, with --model/--set, the variant."""

    jobs: list[NotebookJob]
    out_dir: Path
    variant: ProfileVariant | None = None

    @property
    def params_root(self) -> Path | None:
        """Where the params of this run are read from (None: the profile's own, under the params root)."""
        return self.variant.params_root if self.variant is not None else None

    def planned_params(self) -> ContextManager[None]:
        """A block in which the params a variant will write are read as if written (for --dry-run, which writes
        nothing); a no-op without overrides."""
        return params_overlay(self.variant.planned_files()) if self.variant is not None else contextlib.nullcontext()


def plan_run(profile: str, only: list[str] | None, params_root: Path, notebooks_dir: Path, results_root: Path,
             overrides: Overrides | None = None) -> RunPlan:
    """`plan_profile` into results_root/<profile>/, or, with overrides, the profile transformed by them
    (`apply_overrides`) and validated into results_root/<profile>/<slug>/ before anything is written."""
    out_dir = (Path(results_root) / profile).resolve()
    if not overrides:
        return RunPlan(plan_profile(profile, only, params_root, notebooks_dir, out_dir), out_dir)
    folder = profile_dir(profile, params_root)
    notebooks = discover_notebooks(notebooks_dir)
    loaded = {name: load_yaml(folder / f"{name}.yaml") for name in notebooks if (folder / f"{name}.yaml").is_file()}
    if overrides.model is not None:
        overrides = dataclasses.replace(overrides, model=normalize_model(overrides.model))
    base = profile_base_model(loaded)
    model = overrides.model if overrides.model is not None else base
    slug = model_slug(model)
    out_dir = out_dir / slug
    derived = out_dir / "params"
    repo_root = Path(notebooks_dir).resolve().parent
    try:
        value = derived.relative_to(repo_root).as_posix()
    except ValueError:
        value = derived.as_posix()
    params, changes = apply_overrides(profile, loaded, overrides, slug)
    variant = ProfileVariant(profile, base, model, slug, overrides, params, changes, derived, value)
    jobs, errors = [], []
    with params_overlay(variant.planned_files()):
        for name in _select(notebooks, only):
            try:
                if name not in params:  # no params file in the profile: the usual error, naming it
                    make_job(name, notebooks[name], profile, folder, out_dir)
                jobs.append(make_job(name, notebooks[name], profile, derived / profile, out_dir,
                                     data=params.get(name)))
            except ParamError as exc:
                errors.append(str(exc))
    if errors:
        raise ParamError("\n".join(errors))
    return RunPlan(jobs, out_dir, variant)


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
        launcher = getattr(config, "launcher", None)
        if launcher is not None and launcher.kind == "accelerate":
            needs.append(f"training: launched as its own job on {launcher.num_processes} GPU(s), `accelerate launch"
                         f"{' --config_file ' + launcher.config_file if launcher.config_file else ''} -m kvlib train "
                         f"...`, after its memory estimate is checked against the visible GPUs")
    if hasattr(config, "openai_jobs"):
        for name, job in config.openai_jobs().items():
            submit = ("submitted: " + _describe_api(job.train_config.model, None, "OPENAI_API_KEY")
                      if config.openai_submit else "validated and costed only (openai_submit: false)")
            needs.append(f"OpenAI fine-tuning {name}: {submit}")
    return needs
