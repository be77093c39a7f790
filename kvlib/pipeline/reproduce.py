"""`kvlib reproduce`: run the notebooks of a params profile with papermill into `results/<profile>/`.

    notebooks/NN_name.ipynb  +  params/<profile>/NN_name.yaml  ->  results/<profile>/NN_name.{ipynb,html}

Every selected params file is validated against the notebook's params class (kvlib.pipeline.notebooks.NOTEBOOKS)
before anything runs, so a typo fails in a second instead of after an hour of finetuning. A notebook writes into a
staging folder, moved over its last good result only when it succeeds, so a failed or killed run never replaces a
good result (and the manifest keeps that result's entry, with the failure recorded beside it).
`results/<profile>/manifest.json` records what ran, with which params, code and data; a notebook whose
params, notebook file, recorded inputs and outputs are unchanged is skipped on the next run.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Iterator

from kvlib.engine.io import atomic_write_text
from kvlib.engine.models import ModelAccessError, check_hub_access
from kvlib.pipeline.data_needs import check_inputs, missing_for
from kvlib.pipeline.manifest import (
    BOOKKEEPING_FILES,
    begin_attempt,
    carry_over_cost,
    end_attempts,
    entry_identity,
    environment_info,
    git_info,
    load_manifest_entries,
    merge_inputs,
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
from kvlib.pipeline.repro_map import write_results_record

KERNEL_NAME = "python3"



# ------------------------------------------------------------------------------------------- execution


def _papermill_path(path: Path) -> str:
    # papermill str.format()s paths with the parameters; escape braces so a path is taken literally.
    return str(path).replace("{", "{{").replace("}", "}}")


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
    meta["input_path"] = repo_relative(job.notebook, repo_root)
    meta["output_path"] = repo_relative(final_nb, repo_root)
    text = redact(nbformat.writes(nb))
    atomic_write_text(tmp_nb, text)
    body, _ = HTMLExporter().from_notebook_node(nbformat.reads(text, as_version=4))
    atomic_write_text(tmp_html, redact(body))
    _replace_dir(out_dir / STAGING / job.name, out_dir / job.name)
    os.replace(tmp_nb, final_nb)
    os.replace(tmp_html, final_html)
    (out_dir / f"{job.name}.failed.ipynb").unlink(missing_ok=True)  # superseded by this good run
    return [final_nb.name, final_html.name, *_notebook_artifacts(out_dir, job.name)]


def _replace_dir(new: Path, final: Path) -> None:
    """Put the folder `new` where `final` is, replacing it (two renames: `final` is never half-written)."""
    old = final.with_name(f".{final.name}.replaced")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    if new.is_dir():
        os.replace(new, final)
    shutil.rmtree(old, ignore_errors=True)


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


def run_job(job: NotebookJob, out_dir: Path, repo_root: Path) -> tuple[dict, BaseException | None]:
    """Execute one notebook; returns its manifest entry and the error (None on success)."""
    import papermill

    tmp_nb, tmp_html = out_dir / f".{job.name}.running.ipynb", out_dir / f".{job.name}.running.html"
    # The notebook writes its tables, figures and records into a staging folder of its own, moved over the last
    # good result only when the whole notebook succeeded (`_publish`): a failed or killed run leaves it as it was.
    staging = out_dir / STAGING
    shutil.rmtree(staging / job.name, ignore_errors=True)
    started, t0 = utc_now(), time.perf_counter()
    git = git_info(repo_root, out_dir.parent)  # per notebook: a profile's notebooks may run at different commits
    attempts = begin_attempt(out_dir, job.name, started, tmp_nb)
    error: BaseException | None = None
    try:
        nb = papermill.execute_notebook(
            _papermill_path(job.notebook),
            _papermill_path(tmp_nb),
            # the staging folder relative to the repository root (the kernel's working directory): no machine
            # path is recorded in the executed notebook
            parameters={INJECTED: {**job.injected[INJECTED], "results_dir": repo_relative(staging, repo_root)}},
            kernel_name=KERNEL_NAME,
            progress_bar=True,
            cwd=str(repo_root),
        )
        inputs, facts = read_inputs(staging, job.name), read_facts(staging, job.name)
        outputs = _publish(nb, job, out_dir, repo_root, tmp_nb, tmp_html)
    except Exception as exc:  # a failing cell, a dead kernel or a failed export all fail this notebook
        error = exc
        inputs, facts = [], {}
        outputs = _keep_failed(tmp_nb, out_dir, job.name)
    finally:
        tmp_nb.unlink(missing_ok=True)
        tmp_html.unlink(missing_ok=True)
        shutil.rmtree(staging / job.name, ignore_errors=True)
    wall = round(time.perf_counter() - t0, 3)
    attempts[-1].update(seconds=wall, ended="ok" if error is None else "failed")
    end_attempts(out_dir, job.name, attempts, done=error is None)
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
               force: bool = False, variant: ProfileVariant | None = None) -> int:
    """What `run_profile` would do, printed without running or writing anything (`--dry-run`): with --model/--set
    every change to the profile's params (`variant`), then each notebook, whether it would run (and why), be skipped
    as up to date, or does not apply to the profile, what its models need (weights, API keys) and which of its data
    inputs are missing (kvlib.pipeline.data_needs)."""
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
) -> int:
    """Run the notebooks of `profile` (or the `only` ones) in order; 0 when all succeed, 1 at the first failure.
    `dry_run`: validate and print the plan (`print_plan`) instead, offline, writing nothing. `lock`: wait for
    any other locked run on this machine first (`one_run_per_machine`; the CLI locks unless --concurrent).
    `model` (a model spec: hub id, local checkpoint, embedded name, openai:<model>[@<base_url>]) replaces the
    profile's base model, `sets` (NOTEBOOK.KEY=VALUE) set single params (kvlib.pipeline.plan.apply_overrides);
    with either, the run goes to results_root/<profile>/<model slug>/, never into the profile's own results.

    Raises ParamError before anything runs if the profile, a notebook name or any params file is invalid; returns
    2, printing one message, before anything runs if a data input of a notebook that would run is missing
    (kvlib.pipeline.data_needs.check_inputs) or a hub model it loads is gated or missing (`model_access_problems`).
    """
    results_root, params_root, notebooks_dir = Path(results_root), Path(params_root), Path(notebooks_dir)
    planned = plan_run(profile, only, params_root, notebooks_dir, results_root, Overrides(model, tuple(sets or ())))
    jobs, out_dir, variant = planned.jobs, planned.out_dir, planned.variant
    repo_root = notebooks_dir.resolve().parent
    if dry_run:
        with planned.planned_params():
            return print_plan(jobs, load_manifest_entries(out_dir), out_dir, repo_root, profile, force, variant)

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
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"profile": profile, **environment_info(repo_root, results_root)}
    if variant is not None:
        header["variant"] = {"command": variant.command(), "base_model": variant.base_model, "model": variant.model,
                             "slug": variant.slug, "changes": variant.changes,
                             "params": repo_relative(variant.params_root / profile, repo_root)}

    # one run at a time per machine (see one_run_per_machine); params were validated above, before any wait
    label = (variant.command().removeprefix("kvlib reproduce ") if variant is not None else f"--profile {profile}")
    label += "".join(f" --only {n}" for n in only or ())
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
                entries[job.name] = {**entry_identity(job, repo_root), "status": "skipped", "reason": job.skip,
                                     "outputs": [], "inputs": []}
                write_results_record(out_dir, header, entries, params_root, notebooks_dir)
                continue
            print(f"{tag}: run ({reason})", flush=True)
            entry, error = run_job(job, out_dir, repo_root)
            entries = load_manifest_entries(out_dir)
            carry_over_cost(entry, entries.get(job.name))
            previous = entries.get(job.name)
            if error is not None and previous is not None and previous.get("status") == "ok":
                # the last good result stays what the record shows; the failure is recorded beside it
                entries[job.name] = {**previous, "last_failure": {
                    k: entry[k] for k in ("started", "finished", "wall_seconds", "attempts", "wall_seconds_all_attempts", "error",
                                          "outputs", "git") if k in entry}}
            else:
                entries[job.name] = entry
            write_results_record(out_dir, header, entries, params_root, notebooks_dir)
            if error is not None:
                kept = f"; executed notebook kept at {out_dir / entry['outputs'][0]}" if entry["outputs"] else ""
                print(f"kvlib reproduce: {job.name} failed{kept}\n{redact(format_error(error))}",
                      file=sys.stderr)
                return 1
            print(f"{tag}: ok in {entry['wall_seconds']:.1f}s -> {out_dir / job.name}.html", flush=True)
        # Nothing rewritten when everything was skipped: the header describes the run that produced the results.
        return 0
