"""The record of a profile's results: per notebook the data it read (inputs.json), the facts it produced
(facts.json), the environment and commit, seeds, attempts and wall time, in `results/<profile>/manifest.json`;
and whether a finished notebook is stale (its params, notebook, inputs or evaluated models changed since).
"""
from __future__ import annotations

import html
import importlib
import json
import os
import platform
import re
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import kvlib
from kvlib.engine.config import ParamError
from kvlib.engine.data import resolve_data_dir
from kvlib.engine.io import atomic_write_text, dumps_json, file_sha256
from kvlib.engine.models import cache_dir, weight_files
from kvlib.engine.train import IDENTITY_FILE, SUMMARY_FILE
from kvlib.pipeline.notebooks import profile_finetune_params
from kvlib.pipeline.plan import NotebookJob, make_job, referenced_runs
from kvlib.report.tables import notebook_output_dir

INPUTS_FILE = "inputs.json"



FACTS_FILE = "facts.json"  # facts a run produced that belong in the manifest (e.g. a fine-tuned model name)



BOOKKEEPING_FILES = (INPUTS_FILE, FACTS_FILE)  # merged into the manifest, not outputs



def _expand_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named in `paths`, with directories expanded to the files under them (a dataset is often a dir)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"record_inputs: {p} does not exist")
    return files



# Recorded data-file paths start with this instead of the data directory's location on the recording machine,
# so a clone whose data lives elsewhere ($KVLIB_DATA_DIR) still finds them (kvlib.pipeline.reproduce.locate_input).
DATA_DIR_PREFIX = "$KVLIB_DATA_DIR/"



def _portable_path(path: Path) -> str:
    """Path relative to the working directory (the repo root when run by `kvlib reproduce`), else
    `$KVLIB_DATA_DIR/<path in the data directory>`, else absolute."""

    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        pass
    try:
        return DATA_DIR_PREFIX + resolved.relative_to(resolve_data_dir().resolve()).as_posix()
    except (FileNotFoundError, ValueError):
        return resolved.as_posix()



def machine_paths(repo_root: Path, extra: Mapping[str, Path] | None = None) -> list[tuple[str, str]]:
    """(absolute prefix, placeholder) pairs for `portable_text`, longest prefix first: `extra` (e.g. a results
    folder outside the checkout), the data directory (`$KVLIB_DATA_DIR`), site-packages and the Python
    environment (`<site-packages>`, `<venv>`, `<python>`), kvlib's model cache (`<kvlib-cache>`), the repository
    root (removed: what follows is a path relative to it), the home directory (`~`) and the temp directory
    (`<tmp>`). Each in its given and its resolved spelling."""
    pairs: list[tuple[Path | str | None, str]] = [(path, name) for name, path in (extra or {}).items()]
    try:
        pairs.append((resolve_data_dir(), DATA_DIR_PREFIX.rstrip("/")))
    except FileNotFoundError:
        pass
    site_dirs = {sysconfig.get_paths().get("purelib"), sysconfig.get_paths().get("platlib"),
                 getattr(site, "USER_SITE", None), *getattr(site, "getsitepackages", lambda: [])()}
    pairs += [(d, "<site-packages>") for d in site_dirs if d]
    pairs += [(sys.prefix, "<venv>" if sys.prefix != sys.base_prefix else "<python>"), (sys.base_prefix, "<python>")]
    pairs += [(cache_dir(), "<kvlib-cache>"), (repo_root, ""), (Path.home(), "~"), (tempfile.gettempdir(), "<tmp>")]
    out: dict[str, str] = {}
    for path, name in pairs:
        if path is None or str(path) in ("", "/"):
            continue
        for spelling in (str(Path(path)), str(Path(path).resolve())):
            if spelling not in ("", "/"):
                out.setdefault(spelling, name)
    return sorted(out.items(), key=lambda kv: len(kv[0]), reverse=True)



def portable_text(text: str, repo_root: Path, extra: Mapping[str, Path] | None = None) -> str:
    """`text` (an executed notebook, its HTML, a log) without this machine's absolute paths (`machine_paths`): a
    path under the repository becomes relative to it (`/home/me/kvlib/results/x.png` -> `results/x.png`), a data
    file `$KVLIB_DATA_DIR/...`, a package file `<site-packages>/...`. Only whole path components are replaced, so
    numbers and other text stay byte for byte."""
    for prefix, name in machine_paths(repo_root, extra):
        # the whole prefix, not inside a longer path or name (`/data` never matches `/data2` or `/mnt/data`)
        pattern = re.compile(r"(?<![\w.~-])" + re.escape(prefix) + r"(?=$|[^\w.~-])")
        if name:
            text = pattern.sub(lambda _: name, text)
        else:  # the repository root: `<root>/x` -> `x`, the root alone -> `.`
            text = re.sub(r"(?<![\w.~-])" + re.escape(prefix) + "/", "", text)
            text = pattern.sub(".", text)
    return text



def read_inputs(results_dir: str | Path, name: str) -> list[dict]:
    """The inputs recorded so far for notebook `name` (empty when none)."""
    path = Path(results_dir) / name / INPUTS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))



def input_record(path: Path, name: str) -> dict:
    """One recorded input: the file at `path`, recorded under `name` (a portable path), with sha256 and size."""
    return {"path": name, "sha256": file_sha256(path), "bytes": path.stat().st_size}



def merge_inputs(*groups: Iterable[dict]) -> list[dict]:
    """Input records merged by path (a later group's record wins), sorted by path."""
    merged = {item["path"]: item for group in groups for item in group}
    return [merged[k] for k in sorted(merged)]



def record_inputs(results_dir: str | Path, name: str, paths: Iterable[str | Path]) -> list[dict]:
    """Record the data files notebook `name` read, with sha256, in `results_dir/name/inputs.json`.

    Call it once per data source; entries are merged by path (the latest hash wins) and kept sorted, and
    `kvlib reproduce` copies them into the run manifest. Returns the full list now recorded.
    """
    entries = merge_inputs(read_inputs(results_dir, name),
                           [input_record(f, _portable_path(f)) for f in _expand_files(paths)])
    atomic_write_text(notebook_output_dir(results_dir, name) / INPUTS_FILE, dumps_json(entries))
    return entries



def read_facts(results_dir: str | Path, name: str) -> dict:
    """The facts recorded so far for notebook `name` (empty when none)."""
    path = Path(results_dir) / name / FACTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}



def record_facts(results_dir: str | Path, name: str, facts: dict) -> dict:
    """Merge `facts` (plain JSON data) into `results_dir/name/facts.json`; `kvlib reproduce` copies them into
    the notebook's manifest entry. Returns everything recorded so far."""
    merged = {**read_facts(results_dir, name), **facts}
    atomic_write_text(notebook_output_dir(results_dir, name) / FACTS_FILE, dumps_json(merged))
    return merged



def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"



def _wall_time(entry: Mapping[str, Any]) -> str:
    """A notebook's wall time; when its results took several runs or attempts with these params (interrupted
    and resumed, re-rendered from cached answers, or failed since), their sum too."""
    text = _duration(entry.get("wall_seconds"))
    if entry_attempts(entry) > 1:
        text += (f" (the last run; {entry_attempts(entry)} runs and attempts with these params: "
                 f"{_duration(entry_wall_seconds(entry))})")
    return text



def entry_attempts(entry: Mapping[str, Any]) -> int:
    """Every run and attempt behind a notebook's entry: those behind its latest results and those that failed
    since (`last_failure`)."""
    return (entry.get("attempts") or 1) + ((entry.get("last_failure") or {}).get("attempts") or 0)



def entry_wall_seconds(entry: Mapping[str, Any]) -> float:
    """What a notebook's entry cost: every run and attempt behind its latest results (manifests written before
    attempts were counted have only the last run's `wall_seconds`), plus the attempts that failed since
    (`last_failure`, counted from that result on: a rerun that succeeds counts them in its own entry instead)."""
    own = entry.get("wall_seconds_all_attempts", entry.get("wall_seconds")) or 0
    return own + ((entry.get("last_failure") or {}).get("wall_seconds_all_attempts") or 0)



def failure_note(entry: Mapping[str, Any], limit: int = 160) -> str:
    """`a later run failed at <time>: <error>` for an entry whose last good result stands beside a later failure
    (`last_failure`), else ''. One line, at most about `limit` characters of error."""
    failure = entry.get("last_failure")
    if not failure:
        return ""
    error = failure.get("error") or {}
    text = " ".join(f"{error.get('ename', 'error')}: {error.get('evalue', '')}".split()).rstrip(":")
    if len(text) > limit:
        text = text[:limit - 3].rstrip() + "..."
    return f"a later run failed at {failure.get('finished') or failure.get('started') or '?'}: {text}"



def wall_seconds_total(entries: Mapping[str, Mapping[str, Any]]) -> float:
    """What a profile's results cost: `entry_wall_seconds` summed over its notebooks."""
    return sum(entry_wall_seconds(entry) for entry in entries.values())



def wall_time_summary(entries: Mapping[str, Mapping[str, Any]], notebooks: Sequence[str] = (),
                      rerun: Mapping[str, str] | None = None) -> str:
    """One line for the README under a profile's map: the total and each notebook's share, in minutes, with the
    profile's `notebooks` that have not finished yet named (a total over a partial profile must not read as the
    whole), and those that must `rerun` (notebook -> why: params or notebook changed since it ran, or results that
    only a re-run can bring up to date)."""
    done = {n: e for n, e in sorted(entries.items()) if e.get("status") == "ok"}
    parts = ", ".join(f"{n.split('_', 1)[0]} {entry_wall_seconds(e) / 60:.1f}" for n, e in done.items())
    pending = sorted(n for n in {*entries, *notebooks}
                     if (entries.get(n) or {}).get("status") not in ("ok", "skipped"))
    text = (f"Wall time on this machine (manifest.json: all runs and attempts behind the latest results): "
            f"{wall_seconds_total(done) / 3600:.1f} h for {len(done)} notebooks (minutes: {parts}).")
    if pending:
        text += f" Not finished yet: {', '.join(pending)}."
    if rerun:
        text += " To run again: " + ", ".join(f"{n} ({reason})" for n, reason in sorted(rerun.items())) + "."
    return text


MANIFEST_FILE = "manifest.json"



PACKAGES = (
    "torch", "transformers", "gguf", "peft", "accelerate", "numpy", "pandas", "papermill", "openai", "tiktoken",
)



SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET")



# Shorter values (TOKENIZERS_PARALLELISM=false) are flags, not secrets, and would corrupt text if redacted.
MIN_SECRET_LENGTH = 8



REDACTED = "[REDACTED]"



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

    return {
        "kvlib_version": kvlib.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_info(repo_root, results_root),
    }



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



def write_manifest(out_dir: Path, header: dict, entries: dict[str, dict]) -> dict:
    """manifest.json (secrets redacted); kvlib.pipeline.repro_map.write_results_record adds the index page."""
    manifest = {**header, "notebooks": entries}
    atomic_write_text(out_dir / MANIFEST_FILE, redact(dumps_json(manifest)))
    return manifest



def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")



def is_derived_input(recorded_path: str, repo_root: Path) -> bool:
    """Whether an input is a file the pipeline derives itself (a generated dataset under runs/, a run's
    run_identity.json): a path inside the checkout that git ignores. Why it matters: such files live only on
    the machine that made them, so on a fresh machine (a new session, a CI clone) they are absent although
    nothing changed; they are regenerated from the same params on use, and once regenerated a different hash
    makes the result stale. An absent data file or tracked template still does."""

    if Path(recorded_path).is_absolute() or recorded_path.startswith(DATA_DIR_PREFIX):
        return False
    return _git(repo_root, "check-ignore", "-q", "--", recorded_path) is not None



def locate_input(recorded_path: str, repo_root: Path) -> Path:
    """Where a recorded input is on this machine: `$KVLIB_DATA_DIR/...` in the current data directory, a
    relative path in the checkout, an absolute path as is. A data file that an older manifest recorded by its
    absolute path on another machine is looked up in the current data directory under the longest tail of
    that path found there; the caller compares the sha256 anyway, so a wrong match reads as changed, not as
    unchanged."""

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
            job = make_job(name, notebook, profile, profile_dir, Path("results") / profile)
        except ParamError:
            continue
        reason = definition_change(job, entry)
        if reason:
            changed[name] = reason
    return changed



def stale_reason(job: NotebookJob, entry: dict | None, out_dir: Path, repo_root: Path) -> str | None:
    """Why `job` must run again, or None when its previous result is still valid."""

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



def entry_identity(job: NotebookJob, repo_root: Path) -> dict:
    """The manifest fields that say which notebook and params a run (or skip) was: what stale_reason compares."""
    return {"notebook": repo_relative(job.notebook, repo_root), "params_file": repo_relative(job.params_file, repo_root),
            "params_sha256": job.params_sha256, "notebook_sha256": job.notebook_sha256}



def run_identity_inputs(job: NotebookJob, repo_root: Path) -> list[dict]:
    """The run_identity.json (config and training-file hashes) and the weight files of every HF run the job's
    params refer to, as recorded inputs: a run retrained with another recipe or dataset, or retrained at all (other
    weights), then makes the notebook stale, as a changed data file does, so a notebook never stands on a model
    that is not the run's current one (a fresh clone without runs/ has nothing to compare: not a change).
    Recorded after the notebook ran, so the runs it trained on first use are included."""

    names = referenced_runs(job.params)
    if not names or job.skip:
        return []
    jobs = profile_finetune_params(job.params["profile"], job.params_file.parent.parent).jobs()
    entries = []
    for name in names:
        if name not in jobs:  # an OpenAI run: its model is a name on the API, nothing local to hash
            continue
        identity = Path(jobs[name].train_config.out_dir) / IDENTITY_FILE
        path = identity if identity.is_absolute() else repo_root / identity
        if path.is_file():
            entries.append(input_record(path, repo_relative(path, repo_root)))
        model_dir = path.parent / "model"
        if model_dir.is_dir():
            try:
                weights = weight_files(model_dir)
            except ParamError:  # a LoRA adapter or an unfinished save: its identity file still decides
                weights = []
            entries += [input_record(w, repo_relative(w, repo_root)) for w in weights]
    return entries



def carry_over_cost(entry: dict, previous: Mapping[str, Any] | None) -> None:
    """A re-run with unchanged params (a changed notebook, --force) is fed by the models and cached answers its
    predecessors computed, so their time counts toward what these results cost; changed params start over."""
    if previous and previous.get("status") == "ok" and previous.get("params_sha256") == entry["params_sha256"]:
        # the previous result's own runs; the attempts that failed since it (its `last_failure`) are in the
        # attempts file, so already in `entry`
        entry["attempts"] += previous.get("attempts", 1)
        own = previous.get("wall_seconds_all_attempts", previous.get("wall_seconds")) or 0
        entry["wall_seconds_all_attempts"] = round(entry["wall_seconds_all_attempts"] + own, 3)



def attempts_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.attempts.json"



def begin_attempt(out_dir: Path, name: str, started: str, running: Path) -> list[dict]:
    """The attempts at notebook `name` since its last success, this one appended (and saved at once, so a
    kill leaves it on disk). An earlier attempt that never ended was killed: it ran until its last sign of life,
    the later of its heartbeat (`attempt_heartbeat`, every HEARTBEAT_SECONDS) and papermill's last save of its
    `running` notebook (papermill saves it when a cell starts or ends, not while a long cell runs)."""
    path = attempts_path(out_dir, name)
    try:
        attempts = list(json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, TypeError):
        attempts = []
    if attempts and attempts[-1].get("seconds") is None:
        signs = [running.stat().st_mtime] if running.exists() else []
        if attempts[-1].get("alive"):
            signs.append(datetime.fromisoformat(attempts[-1]["alive"]).timestamp())
        began = datetime.fromisoformat(attempts[-1]["started"]).timestamp()
        attempts[-1].update(seconds=round(max(0.0, max(signs) - began), 3) if signs else 0.0, ended="killed")
    attempts.append({"started": started, "seconds": None})
    atomic_write_text(path, dumps_json(attempts))
    return attempts


HEARTBEAT_SECONDS = 60.0  # how stale a killed attempt's time may be: the most a kill leaves uncounted


@contextmanager
def attempt_heartbeat(out_dir: Path, name: str, attempts: list[dict], every: float = HEARTBEAT_SECONDS
                      ) -> Iterator[None]:
    """While notebook `name` runs: its attempt (the last of `attempts`, as `begin_attempt` saved them) gets an
    `alive` time in the attempts file every `every` seconds, so that a kill no handler sees (SIGKILL, the machine
    stopped under it) is timed by the next run to within that, not from the notebook's last save hours
    before. `attempts` is not touched by the caller meanwhile; the heartbeat has stopped when this returns."""
    stop = threading.Event()
    path = attempts_path(out_dir, name)

    def beat() -> None:
        while not stop.wait(every):
            attempts[-1]["alive"] = utc_now()
            atomic_write_text(path, dumps_json(attempts))

    thread = threading.Thread(target=beat, name=f"kvlib-heartbeat-{name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()



def end_attempts(out_dir: Path, name: str, attempts: list[dict], done: bool) -> None:
    """After a success the attempts live on in the manifest entry; after a failure they are kept, so the
    rerun that fixes it counts them too."""
    path = attempts_path(out_dir, name)
    if done:
        path.unlink(missing_ok=True)
    else:
        atomic_write_text(path, dumps_json(attempts))


def repo_relative(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()
