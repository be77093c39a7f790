"""`kvlib reproduce`: run the notebooks of a params profile with papermill into `results/<profile>/`.

    notebooks/NN_name.ipynb  +  params/<profile>/NN_name.yaml  ->  results/<profile>/NN_name.{ipynb,html}

Every selected params file is validated against the notebook's params class (kvlib.pipeline.notebooks.NOTEBOOKS)
before anything runs, so a typo fails in a second instead of after an hour of finetuning. A notebook writes into a
staging folder; its result replaces the last good one only when it succeeds, in one journaled step (`publish`)
that a kill cannot tear, so a failed or killed run never loses or replaces a good result (the manifest keeps that
result's entry, with the failure recorded beside it). One run at a time per results folder (`one_run_per_folder`).
`results/<profile>/manifest.json` records what ran, with which params, code and data, and every attempt's wall
time; a notebook whose params, notebook file, recorded inputs and outputs are unchanged is skipped on the next run.
"""
from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from filelock import FileLock, Timeout

from kvlib.engine.cache import check_cache
from kvlib.engine.io import atomic_write_text, dumps_json
from kvlib.engine.models import ModelAccessError, check_hub_access
from kvlib.pipeline.data_needs import check_inputs, missing_for
from kvlib.pipeline.manifest import (
    BOOKKEEPING_FILES,
    attempt_heartbeat,
    attempts_path,
    begin_attempt,
    carry_over_cost,
    end_attempts,
    entry_identity,
    environment_info,
    git_info,
    load_manifest_entries,
    merge_inputs,
    portable_text,
    read_facts,
    read_inputs,
    redact,
    repo_relative,
    run_identity_inputs,
    stale_reason,
    utc_now,
)
from kvlib.pipeline.notebooks import INJECTED, STAGING
from kvlib.pipeline.plan import NotebookJob, Overrides, ProfileVariant, model_requirements, plan_run
from kvlib.pipeline.planner import format_plan, plan_profile_cost, power_problems
from kvlib.pipeline.repro_map import write_index, write_results_record

KERNEL_NAME = "python3"



# ------------------------------------------------------------------------------------------- execution


def _papermill_path(path: Path) -> str:
    # papermill str.format()s paths with the parameters; escape braces so a path is taken literally.
    return str(path).replace("{", "{{").replace("}", "}}")


def _notebook_artifacts(out_dir: Path, name: str) -> list[str]:
    """Files the notebook wrote under `out_dir`/<name>/ (inputs.json, facts.json are bookkeeping), relative to
    `out_dir` (the staging folder and the profile's results folder give the same names)."""
    art_dir = out_dir / name
    if not art_dir.is_dir():
        return []
    return sorted(
        p.relative_to(out_dir).as_posix() for p in art_dir.rglob("*") if p.is_file() and p.name not in BOOKKEEPING_FILES
    )


def _running_files(out_dir: Path, name: str) -> tuple[Path, Path]:
    """Where a running notebook is executed into (papermill saves it as it goes) and its HTML rendered: temp
    names beside the results, moved into place by `publish`."""
    return out_dir / f".{name}.running.ipynb", out_dir / f".{name}.running.html"


def _portable(text: str, out_dir: Path, repo_root: Path) -> str:
    """`text` with secrets redacted and no absolute path of this machine (kvlib.pipeline.manifest.portable_text);
    a results folder outside the checkout (tests, scratch runs) reads `<results>`."""
    try:
        out_dir.resolve().relative_to(repo_root.resolve())
        extra = None
    except ValueError:
        extra = {"<results>": out_dir.parent}
    return portable_text(redact(text), repo_root, extra)


# A progress bar line as tqdm draws it ("Loading weights:  30%|██▉       | 81/272 [00:00<00:00, 770.52it/s]", or
# without a total "12it [00:01, 9.5it/s]"), and tqdm's notice that it could not draw a notebook widget.
_PROGRESS_LINE = re.compile(r"\d+%\|.*\|\s*\d|\|\s*\d+/\d+\s*\[|\d+(?:it|B)?\s*\[\d+:\d+.*(?:it/s|s/it|B/s)\]")
_TQDM_NOTICE = re.compile(r"TqdmWarning: IProgress not found|from \.autonotebook import tqdm")
# the cursor moves and line erases tqdm draws nested bars with ("\x1b[A" after a bar closes): nothing a saved
# notebook can show, so they would stand as empty stderr boxes
_CURSOR_CONTROL = re.compile(r"\x1b\[\d*[A-DGK]")
_WIDGET = "application/vnd.jupyter.widget-view+json"
REPORT_TEMPLATE = Path(__file__).resolve().parent / "templates"  # kvlib_report: code cells folded in the HTML
HIDDEN_IN_REPORT = ("parameters", "injected-parameters")  # cell tags: the params table after `start` shows them


def _strip_progress(text: str) -> str:
    """`text` (a cell's stderr) without progress-bar lines, tqdm's IProgress notice and cursor controls; a line
    redrawn with carriage returns counts as what a terminal would show last."""
    kept = []
    for line in _CURSOR_CONTROL.sub("", text).split("\n"):
        shown = next((part for part in reversed(line.split("\r")) if part.strip()), "")
        if _TQDM_NOTICE.search(line) or _PROGRESS_LINE.search(shown):
            continue
        kept.append(shown if "\r" in line else line)
    return "\n".join(kept)


def _clean_outputs(nb: Any) -> Any:
    """What a reader of the executed notebook does not need, removed in place before it is written: progress bars
    (stderr stream outputs drawn by tqdm, which `kvlib reproduce` shows in the terminal as the run goes), tqdm's
    "IProgress not found" warning and progress widgets. Other stderr (warnings, errors) stays."""
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        outputs = []
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream" and out.get("name") == "stderr":
                text = _strip_progress("".join(out.get("text", "")))
                if not text.strip():
                    continue
                out["text"] = text
            elif _WIDGET in out.get("data", {}):
                continue
            outputs.append(out)
        cell["outputs"] = outputs
    nb.metadata.pop("widgets", None)
    return nb


def report_exporter():
    """The HTML exporter of the rendered reports: the kvlib_report template (code cells folded under a "code"
    toggle, no In/Out prompts) without the parameters cells (the params table shows the values once)."""
    from nbconvert import HTMLExporter
    from nbconvert.preprocessors import TagRemovePreprocessor

    exporter = HTMLExporter(template_name="kvlib_report", extra_template_basedirs=[str(REPORT_TEMPLATE)],
                            exclude_input_prompt=True, exclude_output_prompt=True)
    exporter.register_preprocessor(TagRemovePreprocessor(remove_cell_tags=set(HIDDEN_IN_REPORT)), enabled=True)
    return exporter


def _render(nb: Any, job: NotebookJob, out_dir: Path, repo_root: Path) -> None:
    """Write the executed notebook and its HTML under their temp names (`_running_files`), with portable paths
    (`portable_text`) and secrets redacted. Nothing of the last good result is touched."""
    import nbformat

    tmp_nb, tmp_html = _running_files(out_dir, job.name)
    # papermill recorded the absolute temp paths; record portable final ones instead.
    meta = nb.metadata.setdefault("papermill", {})
    meta["input_path"] = repo_relative(job.notebook, repo_root)
    meta["output_path"] = repo_relative(out_dir / f"{job.name}.ipynb", repo_root)
    _clean_outputs(nb)
    text = _portable(nbformat.writes(nb), out_dir, repo_root)
    atomic_write_text(tmp_nb, text)
    body, _ = report_exporter().from_notebook_node(nbformat.reads(text, as_version=4))
    atomic_write_text(tmp_html, _portable(body, out_dir, repo_root))


# ------------------------------------------------------------------------------------ publishing a result
#
# A notebook's result is its executed notebook, its HTML, its folder of tables and figures and its manifest entry.
# `publish` replaces all four with a journal: the new files are complete (staging folder, temp names) before it
# starts; it writes the journal, moves the last good files aside, moves the new ones into place, writes the
# manifest (the commit point) and only then deletes what it moved aside. A run killed at any step leaves the
# journal; `recover` (at the start of the next run, under the folder's lock) rolls forward when the manifest
# already names the new result and back to the last good one otherwise. So a kill never loses the last good
# result and never leaves files that the manifest does not describe.


def _journal_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.publish.json"


def _aside(final: Path) -> Path:
    return final.with_name(f".{final.name}.replaced")


def _publish_moves(out_dir: Path, name: str) -> list[tuple[Path, Path]]:
    """(new, final) pairs of one notebook's result: its folder, executed notebook and HTML."""
    tmp_nb, tmp_html = _running_files(out_dir, name)
    return [(out_dir / STAGING / name, out_dir / name), (tmp_nb, out_dir / f"{name}.ipynb"),
            (tmp_html, out_dir / f"{name}.html")]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _finish_publish(out_dir: Path, name: str) -> None:
    """After the commit point: delete the last good result's files moved aside, the failed notebook of an earlier
    attempt (superseded), the attempts (now counted in the manifest entry) and, last, the journal."""
    for _, final in _publish_moves(out_dir, name):
        _remove(_aside(final))
    (out_dir / f"{name}.failed.ipynb").unlink(missing_ok=True)
    attempts_path(out_dir, name).unlink(missing_ok=True)
    _journal_path(out_dir, name).unlink(missing_ok=True)


def entry_fingerprint(entry: Mapping[str, Any]) -> str:
    """What identifies a manifest entry in a publish journal: all of it, not its times (two runs can start and
    finish within the same second)."""
    return hashlib.sha256(dumps_json(entry).encode()).hexdigest()


def publish(out_dir: Path, name: str, entry: Mapping[str, Any], commit: Callable[[], None]) -> None:
    """Replace notebook `name`'s last good result with the new one (staged, see `_publish_moves`) and `commit` its
    manifest `entry` (a callable writing the manifest and index), as one step a kill cannot tear (see above)."""
    moves = _publish_moves(out_dir, name)
    atomic_write_text(_journal_path(out_dir, name), dumps_json({
        "notebook": name, "started": entry["started"], "entry": entry_fingerprint(entry),
        "had_last_good": [final.exists() for _, final in moves], "pid": os.getpid(), "host": socket.gethostname()}))
    for _, final in moves:
        if final.exists():
            _remove(_aside(final))  # a leftover of an older publish that `recover` already settled
            os.replace(final, _aside(final))
    for new, final in moves:
        if new.exists():
            os.replace(new, final)
    commit()  # the commit point: the manifest now describes the new files
    _finish_publish(out_dir, name)


def recover(out_dir: Path, params_root: Path | None = None, notebooks_dir: Path | None = None) -> list[str]:
    """Settle every publish a kill interrupted in `out_dir` (see above); returns one line per notebook settled.
    Rolled back: the last good result is back in place and the attempt that produced the lost result stays in
    the attempts file (so the rerun counts its time once). Rolled forward: the cleanup is finished and, given
    `params_root` and `notebooks_dir`, the index page rendered again from the manifest (the kill may have
    landed between the two)."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    entries = None
    done = []
    for journal in sorted(out_dir.glob(".*.publish.json")):
        try:
            record = json.loads(journal.read_text(encoding="utf-8"))
            name = record["notebook"]
        except (ValueError, KeyError, TypeError):  # a journal cut short: its moves had not started
            journal.unlink(missing_ok=True)
            continue
        if _publishing_now(record):  # a --concurrent run of this folder, saving its result right now
            continue
        if entries is None:
            entries = load_manifest_entries(out_dir)
        entry = entries.get(name) or {}
        moves = _publish_moves(out_dir, name)
        if entry and entry_fingerprint(entry) == record.get("entry"):
            for new, final in moves:  # the manifest names the new result: finish the moves and the cleanup
                if new.exists() and not final.exists():
                    os.replace(new, final)
            _finish_publish(out_dir, name)
            if params_root is not None and notebooks_dir is not None:
                write_index(out_dir, params_root, notebooks_dir=notebooks_dir)
            done.append(f"{name}: completed the interrupted save of its result")
            continue
        had = record.get("had_last_good") or [True] * len(moves)
        for (new, final), had_it in zip(moves, had):
            if _aside(final).exists():
                if final.exists():
                    _remove(final)
                os.replace(_aside(final), final)
            elif not had_it and final.exists():
                _remove(final)  # the uncommitted run's file, with no last good one to restore
            if new.exists():
                _remove(new)
        _mark_attempt(out_dir, name, record.get("started"), "killed while saving its result")
        journal.unlink(missing_ok=True)
        done.append(f"{name}: a run killed while saving its result was rolled back to the last good result")
    return done


def _publishing_now(record: Mapping[str, Any]) -> bool:
    """Whether the process that wrote a publish journal is another one still running on this host."""
    pid = record.get("pid")
    if record.get("host") != socket.gethostname() or not isinstance(pid, int) or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True


def _mark_attempt(out_dir: Path, name: str, started: str | None, how: str) -> None:
    path = attempts_path(out_dir, name)
    try:
        attempts = list(json.loads(path.read_text(encoding="utf-8")))
    except (FileNotFoundError, ValueError, TypeError):
        return
    for attempt in attempts:
        if attempt.get("started") == started:
            attempt["ended"] = how
    atomic_write_text(path, dumps_json(attempts))


def _keep_failed(tmp_nb: Path, out_dir: Path, name: str, repo_root: Path) -> list[str]:
    """Keep the partly executed notebook for debugging, next to (never over) the last good result."""
    if not tmp_nb.is_file():
        return []
    failed = out_dir / f"{name}.failed.ipynb"
    atomic_write_text(failed, _portable(tmp_nb.read_text(encoding="utf-8"), out_dir, repo_root))
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


def run_job(job: NotebookJob, out_dir: Path, repo_root: Path) -> tuple[dict, BaseException | None]:
    """Execute one notebook; returns its manifest entry and the error (None on success). On success its result
    is staged (its folder under .staging/, the executed notebook and HTML under temp names) for `publish`;
    nothing of the last good result is touched here, whatever happens. Every attempt is timed in the attempts
    file, an interrupted one (Ctrl-C, SIGTERM) too, before the interruption goes on."""
    import papermill

    tmp_nb, tmp_html = _running_files(out_dir, job.name)
    # The notebook writes its tables, figures and records into a staging folder of its own, moved over the last
    # good result only when the whole notebook succeeded (`publish`): a failed or killed run leaves it as it was.
    staging = out_dir / STAGING
    shutil.rmtree(staging / job.name, ignore_errors=True)
    started, t0 = utc_now(), time.perf_counter()
    git = git_info(repo_root, out_dir.parent)  # per notebook: a profile's notebooks may run at different commits
    attempts = begin_attempt(out_dir, job.name, started, tmp_nb)

    def cleanup() -> None:
        tmp_nb.unlink(missing_ok=True)
        tmp_html.unlink(missing_ok=True)
        shutil.rmtree(staging / job.name, ignore_errors=True)

    error: BaseException | None = None
    try:
        # a heartbeat in the attempts file: a kill that nothing here sees is still timed by the next run
        with attempt_heartbeat(out_dir, job.name, attempts):
            nb = papermill.execute_notebook(
                _papermill_path(job.notebook),
                _papermill_path(tmp_nb),
                # the staging folder relative to the repository root (the kernel's working directory): no machine
                # path is recorded in the executed notebook
                parameters={INJECTED: {**job.injected[INJECTED], "results_dir": repo_relative(staging, repo_root)}},
                kernel_name=KERNEL_NAME,
                # what the kernel prints (training and evaluation progress bars, warnings) reaches this terminal as
                # it comes, since one cell may run for hours; papermill's bar of cells would garble those lines
                progress_bar=False,
                stdout_file=sys.stdout,
                stderr_file=sys.stderr,
                cwd=str(repo_root),
            )
        inputs, facts = read_inputs(staging, job.name), read_facts(staging, job.name)
        _render(nb, job, out_dir, repo_root)
        outputs = [f"{job.name}.ipynb", f"{job.name}.html", *_notebook_artifacts(staging, job.name)]
    except Exception as exc:  # a failing cell, a dead kernel or a failed export all fail this notebook
        error = exc
        inputs, facts = [], {}
        outputs = _keep_failed(tmp_nb, out_dir, job.name, repo_root)
        cleanup()
    except BaseException:  # Ctrl-C or SIGTERM: time this attempt, keep it for the rerun, then stop
        attempts[-1].update(seconds=round(time.perf_counter() - t0, 3), ended="interrupted")
        end_attempts(out_dir, job.name, attempts, done=False)
        cleanup()
        raise
    wall = round(time.perf_counter() - t0, 3)
    attempts[-1].update(seconds=wall, ended="ok" if error is None else "failed")
    # kept until the result is published (then the manifest entry counts them): a kill before that leaves them
    end_attempts(out_dir, job.name, attempts, done=False)
    entry = {
        **entry_identity(job, repo_root),
        "params": job.params,
        "seeds": job.seeds,
        "status": "ok" if error is None else "failed",
        "started": started,
        "finished": utc_now(),
        "git": git,
        "wall_seconds": wall,
        # every attempt since the last success, and every earlier run with these params (carry_over_cost):
        # a notebook interrupted (a session ending) and resumed, or re-rendered from the answer cache, costs
        # all of them, though the last one alone reused their work
        "attempts": len(attempts),
        "wall_seconds_all_attempts": round(sum(a["seconds"] for a in attempts), 3),
        "outputs": outputs,
        "inputs": merge_inputs(inputs, run_identity_inputs(job, repo_root)),
    }
    if facts:
        entry["facts"] = facts
    if error is not None:
        entry["error"] = {"ename": getattr(error, "ename", type(error).__name__),
                          "evalue": getattr(error, "evalue", str(error))}
    return entry, error


def print_plan(jobs: list[NotebookJob], entries: dict[str, dict], out_dir: Path, repo_root: Path, profile: str,
               force: bool = False, variant: ProfileVariant | None = None, results_root: Path | None = None,
               params_root: Path | None = None) -> int:
    """What `run_profile` would do, printed without running or writing anything (`--dry-run`): with --model/--set
    every change to the profile's params (`variant`), then each notebook, whether it would run (and why), be skipped
    as up to date, or does not apply to the profile, what its models need (weights, API keys) and which of its data
    inputs are missing (kvlib.pipeline.data_needs); then, given `results_root` and `params_root`, the cost and power
    plan (kvlib.pipeline.planner: each notebook's predicted wall time on this machine, each pre-registered primary
    claim's expected interval half-width, flagged when it cannot reach its width)."""
    print(f"kvlib reproduce --profile {profile} --dry-run: {len(jobs)} notebooks, params valid")
    for line in variant.describe() if variant is not None else []:
        print(line)
    for i, job in enumerate(jobs, 1):
        if job.skip:
            print(f"[{i}/{len(jobs)}] {job.name}: not for this profile ({job.skip})")
            continue
        reason = "forced" if force else stale_reason(job, entries.get(job.name), out_dir, repo_root)
        print(f"[{i}/{len(jobs)}] {job.name}: {'would run (' + reason + ')' if reason else 'up to date, would skip'}")
        for line in model_requirements(job.config):
            print(f"    {line}")
        for need, st in missing_for(job.name, job.config):
            print(f"    data: {need.dataset} {st.state} ({need.why}) -> {st.fix}")
    if results_root is not None and params_root is not None:
        for line in format_plan(plan_profile_cost(profile, jobs, out_dir, results_root, params_root)):
            print(line)
    return 0


LOCK_FILE = ".kvlib.lock"  # in the results folder it protects (git-ignored)
HOLDER_FILE = ".kvlib.lock.holder"  # who holds it, for the message of a run that waits



def _holder_text(label: str) -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (containers)
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown user"
    return f"kvlib {label} (pid {os.getpid()}, user {user}, host {socket.gethostname()})"


def _share(path: Path) -> None:
    """Let another user open (and so wait on or take) the lock, whatever the umask of whoever created it."""
    try:
        os.chmod(path, 0o666)
    except OSError:  # created by another user: theirs to share
        pass


@contextlib.contextmanager
def one_run_per_folder(out_dir: Path, label: str) -> Iterator[None]:
    """Hold the lock of results folder `out_dir` (`out_dir/.kvlib.lock`, a filelock.FileLock) while a run writes
    there; a second run of the same folder waits for it, saying who holds it. The lock lives in the folder it
    protects, so every run of that folder sees it whatever its user or temp directory, and it is created open to
    every user. Why wait: two runs of one folder would interleave their results, and each run's kernel starts
    torch with a thread per core, so two runs at once fight over the cores (on the 2-core reference machine an
    MDQA request took 200 s instead of 7 s while a training ran beside it). `--concurrent` skips the lock."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path, holder = out_dir / LOCK_FILE, out_dir / HOLDER_FILE
    lock = FileLock(str(path), mode=0o666)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = holder.read_text(encoding="utf-8").strip() or "another run"
        except OSError:
            who = "another run"
        print(f"waiting for {who} to finish ({path}): one run at a time per results folder; --concurrent runs "
              f"anyway", flush=True)
        lock.acquire()
    try:
        _share(path)
        atomic_write_text(holder, _holder_text(label) + "\n")
        _share(holder)
        yield
    finally:
        holder.unlink(missing_ok=True)
        lock.release()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (a session or job scheduler ending the run) into KeyboardInterrupt while a run executes, so
    the running attempt is timed and the kernel shut down as on Ctrl-C. A no-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):  # noqa: ARG001 - signal handler signature
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def check_caches(jobs: list[NotebookJob], repo_root: Path) -> None:
    """The response cache of every job (its params' `cache_dir`, from the repository root) opens and passes
    SQLite's quick check; else CorruptCacheError, one line naming the file and the command that moves it aside."""
    folders = {str(job.config.cache_dir) for job in jobs if getattr(job.config, "cache_dir", None)}
    for folder in sorted(folders):
        path = Path(folder)
        check_cache(path if path.is_absolute() else repo_root / path)


def model_access_problems(jobs: list[NotebookJob]) -> str | None:
    """The check before compute for hub models: every Hugging Face hub model the jobs load (02's base model, the
    `models:` entries) is asked of the hub (kvlib.engine.models.check_hub_access); a gated one whose licence the
    token's account has not accepted, or a missing one, is named with the fix. None when nothing is known wrong
    (local models, HF_HUB_OFFLINE, or the hub out of reach: loading says more then)."""
    specs: list[str] = []
    for job in jobs:
        config = job.config
        if getattr(config, "runs", None):
            specs.append(config.base_model)
        if hasattr(config, "model_configs"):
            specs += [c.model for c in config.model_configs().values()
                      if c.kind != "openai" and c.run is None and c.model]
    problems = []
    for spec in dict.fromkeys(specs):
        try:
            check_hub_access(spec)
        except ModelAccessError as exc:
            problems.append(str(exc))
    if not problems:
        return None
    return "kvlib reproduce: stopped before any compute:\n" + "\n".join(f"- {p}" for p in problems)


def run_profile(
    profile: str,
    only: list[str] | None = None,
    results_root: Path = Path("results"),
    params_root: Path = Path("params"),
    notebooks_dir: Path = Path("notebooks"),
    force: bool = False,
    dry_run: bool = False,
    lock: bool = False,
    model: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
    allow_underpowered: bool = False,
) -> int:
    """Run the notebooks of `profile` (or the `only` ones) in order; 0 when all succeed, 1 at the first failure.
    `dry_run`: validate and print the plan (`print_plan`) instead, offline, writing nothing. `lock`: wait for
    any other locked run of the same results folder first (`one_run_per_folder`; the CLI locks unless
    --concurrent). `model` (a model spec: hub id, local checkpoint, embedded name, openai:<model>[@<base_url>])
    replaces the profile's base model, `sets` (NOTEBOOK.KEY=VALUE) set single params
    (kvlib.pipeline.plan.apply_overrides); with either, the run goes to results_root/<profile>/<model slug>/, never
    into the profile's own results. A run whose notebooks pre-register primary claims that cannot reach their
    interval width at the planned n (kvlib.pipeline.planner.power_problems) stops before any compute, returning 2,
    unless `allow_underpowered`.

    Raises ParamError before anything runs if the profile, a notebook name or any params file is invalid, and
    CorruptCacheError if a response cache the run would use is damaged; returns 2, printing one message, before
    anything runs if a data input of a notebook that would run is missing (kvlib.pipeline.data_needs.check_inputs)
    or a hub model it loads is gated or missing (`model_access_problems`).
    """
    results_root, params_root, notebooks_dir = Path(results_root), Path(params_root), Path(notebooks_dir)
    planned = plan_run(profile, only, params_root, notebooks_dir, results_root, Overrides(model, tuple(sets or ())))
    jobs, out_dir, variant = planned.jobs, planned.out_dir, planned.variant
    repo_root = notebooks_dir.resolve().parent
    if dry_run:
        with planned.planned_params():
            return print_plan(jobs, load_manifest_entries(out_dir), out_dir, repo_root, profile, force, variant,
                              results_root, params_root)

    # The check before compute: every data input of the notebooks that will run (kvlib/engine/datasets.yaml) is in
    # place, else one message naming each missing one and the command that fetches them, before any training.
    entries = load_manifest_entries(out_dir)
    if variant is not None:  # the params this run executes with, where its notebooks and stale checks read them
        out_dir.mkdir(parents=True, exist_ok=True)
        variant.write()
        params_root = variant.params_root
    will_run = [job for job in jobs
                if not job.skip and (force or stale_reason(job, entries.get(job.name), out_dir, repo_root))]
    missing = check_inputs(will_run, profile=profile) or model_access_problems(will_run)
    if missing:
        print(missing, file=sys.stderr)
        return 2
    underpowered = [] if allow_underpowered else power_problems(profile, will_run, out_dir, results_root, params_root)
    if underpowered:
        print("kvlib reproduce: stopped before any compute: pre-registered primary claims cannot reach their interval "
              "width at the planned n (`kvlib reproduce --dry-run` shows the plan):\n"
              + "\n".join(f"- {line}" for line in underpowered), file=sys.stderr)
        return 2
    check_caches(will_run, repo_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"profile": profile, **environment_info(repo_root, results_root)}
    if variant is not None:
        header["variant"] = {"command": variant.command(), "base_model": variant.base_model, "model": variant.model,
                             "slug": variant.slug, "changes": variant.changes,
                             "params": repo_relative(variant.params_root / profile, repo_root)}

    # one run at a time per results folder (see one_run_per_folder); params were validated above, before any wait
    label = ("reproduce " + variant.command().removeprefix("kvlib reproduce ") if variant is not None
             else f"reproduce --profile {profile}")
    label += "".join(f" --only {n}" for n in only or ())
    with one_run_per_folder(out_dir, label) if lock else contextlib.nullcontext():
        for line in recover(out_dir, params_root, notebooks_dir):  # a kill while saving: settled first
            print(f"kvlib reproduce: {line}", flush=True)
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
                entries[job.name] = {**entry_identity(job, repo_root), "status": "skipped", "reason": job.skip,
                                     "outputs": [], "inputs": []}
                write_results_record(out_dir, header, entries, params_root, notebooks_dir)
                continue
            print(f"{tag}: run ({reason})", flush=True)
            entry, error = run_job(job, out_dir, repo_root)
            entries = load_manifest_entries(out_dir)
            previous = entries.get(job.name)
            if error is None:
                carry_over_cost(entry, previous)
                entries[job.name] = entry

                def commit(entries: dict = entries) -> None:
                    write_results_record(out_dir, header, entries, params_root, notebooks_dir)

                publish(out_dir, job.name, entry, commit)
                print(f"{tag}: ok in {entry['wall_seconds']:.1f}s -> {out_dir / job.name}.html", flush=True)
                continue
            if previous is not None and previous.get("status") == "ok":
                # the last good result stays what the record shows; the failure is recorded beside it, with the
                # attempts since that result (counted in the cost: kvlib.pipeline.manifest.entry_wall_seconds)
                entries[job.name] = {**previous, "last_failure": {
                    k: entry[k] for k in ("started", "finished", "wall_seconds", "attempts",
                                          "wall_seconds_all_attempts", "error", "outputs", "git") if k in entry}}
            else:
                entries[job.name] = entry
            write_results_record(out_dir, header, entries, params_root, notebooks_dir)
            kept = f"; executed notebook kept at {out_dir / entry['outputs'][0]}" if entry["outputs"] else ""
            print(f"kvlib reproduce: {job.name} failed{kept}\n{redact(format_error(error))}", file=sys.stderr)
            return 1
        # Nothing rewritten when everything was skipped: the header describes the run that produced the results.
        return 0
