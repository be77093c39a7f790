"""`kvlib reproduce`: run the notebooks of a params profile with papermill into `results/<profile>/`.

    notebooks/NN_name.ipynb  +  params/<profile>/NN_name.yaml  ->  results/<profile>/NN_name.{ipynb,html}

Every selected params file is validated against the notebook's params dataclass (`NOTEBOOK_PARAMS`) before
anything runs, so a typo fails in a second instead of after an hour of finetuning. Outputs are written under
temporary names and moved into place only on success, so a failed run never replaces a good result.
`results/<profile>/manifest.json` records what ran, with which params, code and data; a notebook whose
params, notebook file, recorded inputs and outputs are unchanged is skipped on the next run.
"""
from __future__ import annotations

import contextlib
import dataclasses
import html
import importlib
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Mapping

from kvlib.config import ParamError, from_mapping, load_yaml, to_mapping
from kvlib.reporting import (
    BOOKKEEPING_FILES, INDEX_FILE, atomic_write_text, dumps_json, entry_wall_seconds, file_sha256, input_record,
    merge_inputs, read_facts, read_inputs, render_index, sha256_text,
)

# Notebook name -> params dataclass ("module:ClassName", imported only when that notebook is selected, or the
# class itself). Every notebook must be listed: adding a notebook means adding its params class here.
NOTEBOOK_PARAMS: dict[str, str | type] = {
    "01_synthetic_data": "kvlib.generate:SyntheticDataNotebookParams",
    "02_finetune": "kvlib.train:FinetuneNotebookParams",
    "03_mdqa": "kvlib.mdqa:MDQANotebookParams",
    "04_flenqa": "kvlib.flenqa:FLenQANotebookParams",
    "07_kv_retrieval": "kvlib.evaluate:KVRetrievalNotebookParams",
    "05_general_benchmarks": "kvlib.general:GeneralBenchmarksNotebookParams",
    "06_baselines": "kvlib.baselines:BaselinesNotebookParams",
    "08_longer_context": "kvlib.mdqa:LongerContextNotebookParams",
}

# Injected by the runner, never read from a params file: the profile name and the absolute results directory.
RESERVED_PARAMS = ("profile", "results_dir")
# `skip: <why>` as the whole params file: the notebook does not apply to this profile (e.g. the longer-context
# experiment for GPT-3.5); recorded as skipped with the reason, never run.
SKIP_KEY = "skip"
KERNEL_NAME = "python3"
MANIFEST_FILE = "manifest.json"
PACKAGES = (
    "torch", "transformers", "gguf", "peft", "accelerate", "numpy", "pandas", "papermill", "openai", "tiktoken",
)
SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET")
# Shorter values (TOKENIZERS_PARALLELISM=false) are flags, not secrets, and would corrupt text if redacted.
MIN_SECRET_LENGTH = 8
REDACTED = "[REDACTED]"
_NOTEBOOK_RE = re.compile(r"^\d{2}_\w+$")


@dataclass(frozen=True)
class NotebookJob:
    """One validated notebook run: what to execute and the fingerprints that decide whether it is stale."""

    name: str
    notebook: Path
    params_file: Path
    injected: dict  # exactly what papermill injects (YAML params + profile + results_dir)
    seeds: dict  # dotted path -> value, from the validated params (so defaults count too)
    params_sha256: str
    notebook_sha256: str
    config: Any = dataclasses.field(default=None, compare=False, repr=False)  # the validated params object
    skip: str | None = None  # the params file says this notebook does not apply to the profile, and why

    @property
    def params(self) -> dict:
        # results_dir is an absolute, machine-specific path: it must not change the hash or land in the manifest.
        return {k: v for k, v in self.injected.items() if k != "results_dir"}


# ---------------------------------------------------------------------------------------------- planning


def discover_notebooks(notebooks_dir: Path) -> dict[str, Path]:
    """`NN_name` -> path for the notebooks in `notebooks_dir`, in run order (sorted by name)."""
    if not notebooks_dir.is_dir():
        raise ParamError(f"notebooks: directory {notebooks_dir} not found")
    found = {p.stem: p for p in sorted(notebooks_dir.glob("*.ipynb")) if _NOTEBOOK_RE.match(p.stem)}
    if not found:
        raise ParamError(f"notebooks: no NN_name.ipynb notebooks in {notebooks_dir}")
    return found


def _profile_dir(profile: str, params_root: Path) -> Path:
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
    """The params dataclass notebook `name` declares in NOTEBOOK_PARAMS."""
    spec = NOTEBOOK_PARAMS.get(name)
    if spec is None:
        raise ParamError(
            f"{name}: no params class registered; every notebook must declare one in "
            f"kvlib.reproduce.NOTEBOOK_PARAMS ('{name}': 'module:ClassName')"
        )
    if isinstance(spec, str):
        module_name, sep, attr = spec.partition(":")
        if not sep:
            raise ParamError(f"{name}: params class must be given as 'module:ClassName', got {spec!r}")
        try:
            spec = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ParamError(f"{name}: cannot load params class {spec!r}: {exc}") from exc
    if not (isinstance(spec, type) and dataclasses.is_dataclass(spec)):
        raise ParamError(f"{name}: params class {spec!r} is not a dataclass")
    return spec


def find_seeds(data: Any, prefix: str = "") -> dict[str, Any]:
    """Every value under a key named `seed` or `seeds`, by dotted path (`datasets.train.seed`, `runs[0].seed`)."""
    found: dict[str, Any] = {}
    if isinstance(data, Mapping):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            if key in ("seed", "seeds"):
                found[path] = value
            found.update(find_seeds(value, path))
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found.update(find_seeds(value, f"{prefix}[{i}]"))
    return found


def _canonical_json(data: Any) -> str:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _make_job(name: str, notebook: Path, profile: str, profile_dir: Path, results_dir: Path) -> NotebookJob:
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
    injected = {**data, "profile": profile, "results_dir": str(results_dir)}
    cls = params_class(name)
    # The class sees the runner-injected values only if it declares them (notebooks may or may not use them).
    declared = {f.name for f in dataclasses.fields(cls)}
    try:
        obj = from_mapping(cls, {k: v for k, v in injected.items() if k in data or k in declared})
    except ParamError as exc:
        raise ParamError(f"{params_file}: {exc}") from None
    job_params = {k: v for k, v in injected.items() if k != "results_dir"}
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
    profile_dir = _profile_dir(profile, params_root)
    notebooks = discover_notebooks(notebooks_dir)
    jobs, errors = [], []
    for name in _select(notebooks, only):
        try:
            jobs.append(_make_job(name, notebooks[name], profile, profile_dir, results_dir))
        except ParamError as exc:
            errors.append(str(exc))
    if errors:
        raise ParamError("\n".join(errors))
    return jobs


# --------------------------------------------------------------------------------------- environment


def secret_values() -> list[str]:
    """Values of env vars whose names look secret (…KEY, …TOKEN, …SECRET), longest first."""
    values = {
        v for k, v in os.environ.items()
        if any(part in k.upper() for part in SECRET_NAME_PARTS) and len(v) >= MIN_SECRET_LENGTH
    }
    return sorted(values, key=len, reverse=True)


def redact(text: str) -> str:
    """Replace secret env values in `text`, also in their JSON- and HTML-escaped spellings."""
    for value in secret_values():
        for spelling in {value, json.dumps(value)[1:-1], html.escape(value)}:
            text = text.replace(spelling, REDACTED)
    return text


def _git(repo_root: Path, *args: str) -> str | None:
    try:
        proc = subprocess.run(["git", *args], cwd=repo_root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


SOURCE_DIRS = ("kvlib", "notebooks", "params")  # where an untracked file can change what a run computes


def git_info(repo_root: Path, results_root: Path) -> dict:
    """HEAD commit and whether code/params differ from it: a changed tracked file (results/ excluded, since runs
    write there) or an untracked file under SOURCE_DIRS. Other untracked files (logs, caches) do not count."""
    commit = _git(repo_root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    pathspec = ["--", "."]
    try:
        pathspec.append(f":(exclude){results_root.resolve().relative_to(repo_root.resolve()).as_posix()}")
    except ValueError:
        pass  # results outside the checkout cannot make it dirty
    tracked = _git(repo_root, "status", "--porcelain", "--untracked-files=no", *pathspec)
    untracked = _git(repo_root, "ls-files", "--others", "--exclude-standard", "--", *SOURCE_DIRS)
    if tracked is None or untracked is None:
        return {"commit": commit.strip(), "dirty": None}
    return {"commit": commit.strip(), "dirty": bool(tracked.strip() or untracked.strip())}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def environment_info(repo_root: Path, results_root: Path) -> dict:
    """What the manifest records about the machine. Deliberately no environment variables."""
    import kvlib

    return {
        "kvlib_version": kvlib.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_info(repo_root, results_root),
    }


# -------------------------------------------------------------------------------------------- manifest


def load_manifest_entries(out_dir: Path) -> dict[str, dict]:
    """Per-notebook entries of a previous run (empty when there is none or it is unreadable)."""
    path = out_dir / MANIFEST_FILE
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8"))["notebooks"])
    except (ValueError, KeyError, TypeError) as exc:
        print(f"kvlib reproduce: ignoring unreadable {path} ({exc}); all notebooks will re-run", file=sys.stderr)
        return {}


def write_manifest(out_dir: Path, header: dict, entries: dict[str, dict], params_root: Path = Path("params"),
                   notebooks_dir: Path = Path("notebooks")) -> None:
    """manifest.json and the index.html page rendered from it, always together."""
    manifest = {**header, "notebooks": entries}
    atomic_write_text(out_dir / MANIFEST_FILE, redact(dumps_json(manifest)))
    write_index(out_dir, params_root, manifest, notebooks_dir)


def write_index(out_dir: Path, params_root: Path = Path("params"), manifest: dict | None = None,
                notebooks_dir: Path = Path("notebooks")) -> Path:
    """index.html from the manifest (default: read from out_dir/manifest.json), with the reproduction map
    (kvlib.paper) when the profile ran any notebook of the paper's artifacts; results whose params or notebook
    changed since they ran are marked stale there (`changed_since_run`)."""
    from kvlib import paper

    out_dir = Path(out_dir)
    if manifest is None:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    entries = manifest.get("notebooks", {})
    map_rows = None
    if {a["notebook"] for a in paper.load().artifacts} & set(entries):
        map_rows = paper.reproduction_map(out_dir.name, out_dir.parent, params_root, link_root=out_dir,
                                          entries=entries, changed=changed_since_run(
                                              out_dir.name, entries, Path(params_root), Path(notebooks_dir)))
    return atomic_write_text(out_dir / INDEX_FILE, redact(render_index(manifest, map_rows)))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_derived_input(recorded_path: str, repo_root: Path) -> bool:
    """Whether an input is a file the pipeline derives itself (a generated dataset under runs/, a run's
    run_identity.json): a path inside the checkout that git ignores. Why it matters: such files live only on
    the machine that made them, so on a fresh machine (a new session, a CI clone) they are absent although
    nothing changed; they are regenerated from the same params on use, and once regenerated a different hash
    makes the result stale. An absent data file or tracked template still does."""
    from kvlib.reporting import DATA_DIR_PREFIX

    if Path(recorded_path).is_absolute() or recorded_path.startswith(DATA_DIR_PREFIX):
        return False
    return _git(repo_root, "check-ignore", "-q", "--", recorded_path) is not None


def locate_input(recorded_path: str, repo_root: Path) -> Path:
    """Where a recorded input is on this machine: `$KVLIB_DATA_DIR/...` in the current data directory, a
    relative path in the checkout, an absolute path as is. A data file that an older manifest recorded by its
    absolute path on another machine is looked up in the current data directory under the longest tail of
    that path found there; the caller compares the sha256 anyway, so a wrong match reads as changed, not as
    unchanged."""
    from kvlib.data import resolve_data_dir
    from kvlib.reporting import DATA_DIR_PREFIX

    try:
        root = resolve_data_dir()
    except FileNotFoundError:  # no data directory here: a data file reads as missing
        root = None
    if recorded_path.startswith(DATA_DIR_PREFIX):
        rest = recorded_path.removeprefix(DATA_DIR_PREFIX)
        return root / rest if root is not None else Path(recorded_path)
    path = repo_root / recorded_path  # relative paths were recorded from the repo root (absolute stay so)
    if path.is_file() or not Path(recorded_path).is_absolute() or root is None:
        return path
    parts = Path(recorded_path).parts
    tails = (root.joinpath(*parts[i:]) for i in range(1, len(parts)))  # longest first
    return next((tail for tail in tails if tail.is_file()), path)


def definition_change(job: NotebookJob, entry: Mapping[str, Any]) -> str | None:
    """Whether the committed files that define `job` (its params, the notebook) differ from those its manifest
    `entry` ran with: the part of `stale_reason` that reads only tracked files, so it is the same on every
    checkout."""
    if entry.get("params_sha256") != job.params_sha256:
        return "params changed"
    if entry.get("notebook_sha256") != job.notebook_sha256:
        return "notebook changed"
    return None


def changed_since_run(profile: str, entries: Mapping[str, Mapping[str, Any]], params_root: Path,
                      notebooks_dir: Path) -> dict[str, str]:
    """The finished notebooks of a profile whose params or notebook changed after they ran (`definition_change`),
    with the reason: their results stand as what the earlier version produced, and `kvlib reproduce` runs them
    again. Entries without recorded fingerprints, and notebooks whose params do not validate or whose files are
    gone, are left out: `kvlib reproduce` reports those itself."""
    profile_dir = Path(params_root) / profile
    changed = {}
    for name, entry in entries.items():
        notebook = Path(notebooks_dir) / f"{name}.ipynb"
        if entry.get("status") != "ok" or "params_sha256" not in entry or not notebook.is_file():
            continue
        try:
            job = _make_job(name, notebook, profile, profile_dir, Path("results") / profile)
        except ParamError:
            continue
        reason = definition_change(job, entry)
        if reason:
            changed[name] = reason
    return changed


def stale_reason(job: NotebookJob, entry: dict | None, out_dir: Path, repo_root: Path) -> str | None:
    """Why `job` must run again, or None when its previous result is still valid."""
    from kvlib.train import SUMMARY_FILE

    if entry is None:
        return "no previous run"
    if entry.get("status") not in ("ok", "skipped"):
        return f"previous run {entry.get('status')}"
    changed = definition_change(job, entry)
    if changed:
        return changed
    for output in entry.get("outputs", []):
        if not (out_dir / output).is_file():
            return f"output {output} missing"
    for item in entry.get("inputs", []):
        path = locate_input(item["path"], repo_root)
        if Path(item["path"]).name == SUMMARY_FILE and is_derived_input(item["path"], repo_root):
            # A run's train_summary.json, recorded by entries written before run_identity_inputs: it holds the
            # wall time, so its hash changes with every retraining and cannot tell the same recipe retrained
            # from another recipe. It is not compared; such an entry misses a recipe change of a run defined in
            # another notebook's params until it re-runs (a training file the notebook recorded is still compared).
            continue
        if not path.is_file():
            if is_derived_input(item["path"], repo_root):
                continue  # see is_derived_input: absent on this machine is not changed
            return f"input {item['path']} missing"
        if file_sha256(path) != item["sha256"]:
            return f"input {item['path']} changed"
    return None


# ------------------------------------------------------------------------------------------- execution


def _papermill_path(path: Path) -> str:
    # papermill str.format()s paths with the parameters; escape braces so a path is taken literally.
    return str(path).replace("{", "{{").replace("}", "}}")


def _relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def _notebook_artifacts(out_dir: Path, name: str) -> list[str]:
    """Files the notebook wrote under results/<profile>/<name>/ (inputs.json, facts.json are bookkeeping)."""
    art_dir = out_dir / name
    if not art_dir.is_dir():
        return []
    return sorted(
        p.relative_to(out_dir).as_posix() for p in art_dir.rglob("*") if p.is_file() and p.name not in BOOKKEEPING_FILES
    )


def _publish(nb: Any, job: NotebookJob, out_dir: Path, repo_root: Path, tmp_nb: Path, tmp_html: Path) -> list[str]:
    """Write the executed notebook and its HTML under temp names, then move both into place."""
    import nbformat
    from nbconvert import HTMLExporter

    final_nb, final_html = out_dir / f"{job.name}.ipynb", out_dir / f"{job.name}.html"
    # papermill recorded the absolute temp paths; record portable final ones instead.
    meta = nb.metadata.setdefault("papermill", {})
    meta["input_path"] = _relative(job.notebook, repo_root)
    meta["output_path"] = _relative(final_nb, repo_root)
    text = redact(nbformat.writes(nb))
    atomic_write_text(tmp_nb, text)
    body, _ = HTMLExporter().from_notebook_node(nbformat.reads(text, as_version=4))
    atomic_write_text(tmp_html, redact(body))
    os.replace(tmp_nb, final_nb)
    os.replace(tmp_html, final_html)
    (out_dir / f"{job.name}.failed.ipynb").unlink(missing_ok=True)  # superseded by this good run
    return [final_nb.name, final_html.name, *_notebook_artifacts(out_dir, job.name)]


def _keep_failed(tmp_nb: Path, out_dir: Path, name: str) -> list[str]:
    """Keep the partly executed notebook for debugging, next to (never over) the last good result."""
    if not tmp_nb.is_file():
        return []
    failed = out_dir / f"{name}.failed.ipynb"
    atomic_write_text(failed, redact(tmp_nb.read_text(encoding="utf-8")))
    return [failed.name]


def format_error(exc: BaseException) -> str:
    """The notebook's own error for a failed cell; a Python traceback for anything else (kernel died, …)."""
    from papermill.exceptions import PapermillExecutionError, strip_color

    if isinstance(exc, PapermillExecutionError):
        return (
            f"{exc.ename}: {exc.evalue}\n"
            f"in cell {exc.cell_index} (execution count {exc.exec_count}):\n"
            + strip_color("\n".join(exc.traceback))
        )
    return "".join(traceback.format_exception(exc))


def _entry_identity(job: NotebookJob, repo_root: Path) -> dict:
    """The manifest fields that say which notebook and params a run (or skip) was: what stale_reason compares."""
    return {"notebook": _relative(job.notebook, repo_root), "params_file": _relative(job.params_file, repo_root),
            "params_sha256": job.params_sha256, "notebook_sha256": job.notebook_sha256}


def run_job(job: NotebookJob, out_dir: Path, repo_root: Path) -> tuple[dict, BaseException | None]:
    """Execute one notebook; returns its manifest entry and the error (None on success)."""
    import papermill

    tmp_nb, tmp_html = out_dir / f".{job.name}.running.ipynb", out_dir / f".{job.name}.running.html"
    # inputs.json and facts.json describe one run: drop the previous run's records so they are not mixed in.
    for bookkeeping in BOOKKEEPING_FILES:
        (out_dir / job.name / bookkeeping).unlink(missing_ok=True)
    started, t0 = _now(), time.perf_counter()
    git = git_info(repo_root, out_dir.parent)  # per notebook: a profile's notebooks may run at different commits
    attempts = _begin_attempt(out_dir, job.name, started, tmp_nb)
    error: BaseException | None = None
    try:
        nb = papermill.execute_notebook(
            _papermill_path(job.notebook),
            _papermill_path(tmp_nb),
            parameters=job.injected,
            kernel_name=KERNEL_NAME,
            progress_bar=True,
            cwd=str(repo_root),
        )
        outputs = _publish(nb, job, out_dir, repo_root, tmp_nb, tmp_html)
    except Exception as exc:  # a failing cell, a dead kernel or a failed export all fail this notebook
        error = exc
        outputs = _keep_failed(tmp_nb, out_dir, job.name)
    finally:
        tmp_nb.unlink(missing_ok=True)
        tmp_html.unlink(missing_ok=True)
    wall = round(time.perf_counter() - t0, 3)
    attempts[-1].update(seconds=wall, ended="ok" if error is None else "failed")
    _end_attempts(out_dir, job.name, attempts, done=error is None)
    entry = {
        **_entry_identity(job, repo_root),
        "params": job.params,
        "seeds": job.seeds,
        "status": "ok" if error is None else "failed",
        "started": started,
        "finished": _now(),
        "git": git,
        "wall_seconds": wall,
        # every attempt since the last success, and every earlier run with these params (_carry_over_cost):
        # a notebook interrupted (a session ending) and resumed, or re-rendered from the answer cache, costs
        # all of them, though the last one alone reused their work
        "attempts": len(attempts),
        "wall_seconds_all_attempts": round(sum(a["seconds"] for a in attempts), 3),
        "outputs": outputs,
        "inputs": merge_inputs(read_inputs(out_dir, job.name), run_identity_inputs(job, repo_root)),
    }
    facts = read_facts(out_dir, job.name)
    if facts:
        entry["facts"] = facts
    if error is not None:
        entry["error"] = {"ename": getattr(error, "ename", type(error).__name__),
                          "evalue": getattr(error, "evalue", str(error))}
    return entry, error


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


def run_identity_inputs(job: NotebookJob, repo_root: Path) -> list[dict]:
    """The run_identity.json (config and training-file hashes) of every HF run the job's params refer to, as
    recorded inputs: a run retrained with another recipe or dataset then makes the notebook stale, as a changed
    data file does, while the same recipe retrained on another machine does not (train_summary.json, recorded
    before, also holds wall times). Recorded after the notebook ran, so the runs it trained on first use are
    included."""
    from kvlib.train import IDENTITY_FILE, profile_finetune_params

    names = referenced_runs(job.params)
    if not names or job.skip:
        return []
    jobs = profile_finetune_params(job.injected["profile"], job.params_file.parent.parent).jobs()
    entries = []
    for name in names:
        if name not in jobs:  # an OpenAI run: its model is a name on the API, nothing local to hash
            continue
        identity = Path(jobs[name].train_config.out_dir) / IDENTITY_FILE
        path = identity if identity.is_absolute() else repo_root / identity
        if path.is_file():
            entries.append(input_record(path, _relative(path, repo_root)))
    return entries


def _carry_over_cost(entry: dict, previous: Mapping[str, Any] | None) -> None:
    """A re-run with unchanged params (a changed notebook, --force) is fed by the models and cached answers its
    predecessors computed, so their time counts toward what these results cost; changed params start over."""
    if previous and previous.get("status") == "ok" and previous.get("params_sha256") == entry["params_sha256"]:
        entry["attempts"] += previous.get("attempts", 1)
        entry["wall_seconds_all_attempts"] = round(entry["wall_seconds_all_attempts"] + entry_wall_seconds(previous), 3)


def _attempts_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.attempts.json"


def _begin_attempt(out_dir: Path, name: str, started: str, running: Path) -> list[dict]:
    """The attempts at notebook `name` since its last success, this one appended (and saved at once, so a
    kill leaves it on disk). An earlier attempt that never ended was killed: it ran until papermill's last
    save of its `running` notebook (papermill saves it at least every 30 s while a cell runs)."""
    path = _attempts_path(out_dir, name)
    try:
        attempts = list(json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, TypeError):
        attempts = []
    if attempts and attempts[-1].get("seconds") is None:
        last_save = running.stat().st_mtime if running.exists() else None
        began = datetime.fromisoformat(attempts[-1]["started"]).timestamp()
        attempts[-1].update(seconds=round(max(0.0, last_save - began), 3) if last_save else 0.0, ended="killed")
    attempts.append({"started": started, "seconds": None})
    atomic_write_text(path, dumps_json(attempts))
    return attempts


def _end_attempts(out_dir: Path, name: str, attempts: list[dict], done: bool) -> None:
    """After a success the attempts live on in the manifest entry; after a failure they are kept, so the
    rerun that fixes it counts them too."""
    path = _attempts_path(out_dir, name)
    if done:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, dumps_json(attempts))


def _describe_model(spec: str | None) -> str:
    from kvlib import models

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


def print_plan(jobs: list[NotebookJob], entries: dict[str, dict], out_dir: Path, repo_root: Path, profile: str,
               force: bool = False) -> int:
    """What `run_profile` would do, printed without running or writing anything (`--dry-run`): each notebook,
    whether it would run (and why), be skipped as up to date, or does not apply to the profile, what its
    models need (weights, API keys) and which of its data inputs are missing (kvlib.datasets)."""
    from kvlib import datasets

    print(f"kvlib reproduce --profile {profile} --dry-run: {len(jobs)} notebooks, params valid")
    for i, job in enumerate(jobs, 1):
        if job.skip:
            print(f"[{i}/{len(jobs)}] {job.name}: not for this profile ({job.skip})")
            continue
        reason = "forced" if force else stale_reason(job, entries.get(job.name), out_dir, repo_root)
        print(f"[{i}/{len(jobs)}] {job.name}: {'would run (' + reason + ')' if reason else 'up to date, would skip'}")
        for line in model_requirements(job.config):
            print(f"    {line}")
        for need, st in datasets.missing_for(job.name, job.config):
            print(f"    data: {need.dataset} {st.state} ({need.why}) -> {st.fix}")
    return 0


MACHINE_LOCK = Path(tempfile.gettempdir()) / "kvlib-reproduce.lock"


@contextlib.contextmanager
def one_run_per_machine(label: str, lock_path: Path | None = None) -> Iterator[None]:
    """Hold the machine-wide lock of `kvlib reproduce` while a run executes; a second run waits for it, saying
    which run holds it. Why: each run's kernel starts torch with a thread per core, so two runs at once fight
    over the cores. On the 2-core reference machine an MDQA request took 200 s instead of 7 s (28x) while a
    training ran beside it, and both finished later than one after the other. `--concurrent` skips the lock
    (e.g. runs on separate GPUs). No lock where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path = MACHINE_LOCK if lock_path is None else Path(lock_path)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another run"
            print(f"waiting for {holder} to finish ({path}): two runs at once share the CPU cores and each runs "
                  f"many times slower; --concurrent runs anyway", flush=True)
            fcntl.flock(fh, fcntl.LOCK_EX)
        fh.seek(0)
        fh.truncate()
        fh.write(f"kvlib reproduce {label} (pid {os.getpid()})")
        fh.flush()
        try:
            yield
        finally:
            fh.seek(0)
            fh.truncate()
            fh.flush()
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_profile(
    profile: str,
    only: list[str] | None = None,
    results_root: Path = Path("results"),
    params_root: Path = Path("params"),
    notebooks_dir: Path = Path("notebooks"),
    force: bool = False,
    dry_run: bool = False,
    lock: bool = False,
) -> int:
    """Run the notebooks of `profile` (or the `only` ones) in order; 0 when all succeed, 1 at the first failure.
    `dry_run`: validate and print the plan (`print_plan`) instead, offline, writing nothing. `lock`: wait for
    any other locked run on this machine first (`one_run_per_machine`; the CLI locks unless --concurrent).

    Raises ParamError before anything runs if the profile, a notebook name or any params file is invalid; returns
    2, printing one message, before anything runs if a data input of a notebook that would run is missing
    (kvlib.datasets.check_inputs).
    """
    results_root, params_root, notebooks_dir = Path(results_root), Path(params_root), Path(notebooks_dir)
    out_dir = (results_root / profile).resolve()
    jobs = plan_profile(profile, only, params_root, notebooks_dir, out_dir)
    repo_root = notebooks_dir.resolve().parent
    if dry_run:
        return print_plan(jobs, load_manifest_entries(out_dir), out_dir, repo_root, profile, force)

    # The check before compute: every data input of the notebooks that will run (kvlib/datasets.yaml) is in place,
    # else one message naming each missing one and the command that fetches them, before any training or evaluation.
    from kvlib import datasets

    entries = load_manifest_entries(out_dir)
    will_run = [job for job in jobs
                if not job.skip and (force or stale_reason(job, entries.get(job.name), out_dir, repo_root))]
    missing = datasets.check_inputs(will_run, profile=profile)
    if missing:
        print(missing, file=sys.stderr)
        return 2

    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"profile": profile, **environment_info(repo_root, results_root)}

    # one run at a time per machine (see one_run_per_machine); params were validated above, before any wait
    label = f"--profile {profile}" + "".join(f" --only {n}" for n in only or ())
    with one_run_per_machine(label) if lock else contextlib.nullcontext():
        for i, job in enumerate(jobs, 1):
            tag = f"[{i}/{len(jobs)}] {job.name}"
            # Read the manifest afresh for every notebook and again before writing: another `kvlib reproduce` of
            # the same profile (e.g. `--only` another notebook, run --concurrent or on another machine sharing the
            # results) may have added entries since, and writing a snapshot taken at start would drop them.
            entries = load_manifest_entries(out_dir)
            reason = "forced" if force else stale_reason(job, entries.get(job.name), out_dir, repo_root)
            if reason is None:
                print(f"{tag}: skip (up to date)", flush=True)
                continue
            if job.skip:
                print(f"{tag}: not for this profile ({job.skip})", flush=True)
                entries[job.name] = {**_entry_identity(job, repo_root), "status": "skipped", "reason": job.skip,
                                     "outputs": [], "inputs": []}
                write_manifest(out_dir, header, entries, params_root, notebooks_dir)
                continue
            print(f"{tag}: run ({reason})", flush=True)
            entry, error = run_job(job, out_dir, repo_root)
            entries = load_manifest_entries(out_dir)
            _carry_over_cost(entry, entries.get(job.name))
            entries[job.name] = entry
            write_manifest(out_dir, header, entries, params_root, notebooks_dir)
            if error is not None:
                kept = f"; executed notebook kept at {out_dir / entry['outputs'][0]}" if entry["outputs"] else ""
                print(f"kvlib reproduce: {job.name} failed{kept}\n{redact(format_error(error))}",
                      file=sys.stderr)
                return 1
            print(f"{tag}: ok in {entry['wall_seconds']:.1f}s -> {out_dir / job.name}.html", flush=True)
        # Nothing rewritten when everything was skipped: the header describes the run that produced the results.
        return 0
