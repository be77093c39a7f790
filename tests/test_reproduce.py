"""`kvlib reproduce` on a tiny throwaway repo: two 2-cell notebooks, one profile, test params classes.

Kernel start-ups dominate the cost, so one module-scoped run produces the results that the other tests copy
(`clone`) and then re-run incrementally.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

import nbformat
import pytest

from kvlib.report import tables as reporting
from kvlib.pipeline import manifest as kv_manifest
from kvlib.pipeline import notebooks, plan, repro_map, reproduce
from kvlib.engine.config import ParamError, check_positive

PROFILE = "tiny"
SECRET = "sk-test-DO-NOT-LEAK-0123456789abcdef"
NB1, NB2 = "01_first", "02_second"
# Kernels run in the temp repo, so they find kvlib through PYTHONPATH even when it is not pip-installed.
KVLIB_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class FirstParams:
    results_dir: str = ""  # where the runner's staging folder is (the profile is not declared, so not injected)
    message: str = "hi"
    repeat: int = 1

    def validate(self) -> None:
        check_positive("repeat", self.repeat)


@dataclass
class Split:
    seed: int = 1


@dataclass
class SecondParams:
    profile: str = ""  # declares the runner-injected values, like the real notebook params classes
    results_dir: str = ""
    seed: int = 0
    fail: bool = False
    split: Split = field(default_factory=Split)


REGISTRY = {NB1: FirstParams, NB2: SecondParams}

PARAMETERS = "kvlib_params = None"  # the one injected mapping, as in the real notebooks
NB1_CODE = f"""\
globals().update(kvlib_params)
import os
from kvlib.report import tables as reporting
from kvlib.pipeline import manifest
out = reporting.notebook_output_dir(results_dir, "{NB1}")
(out / "message.txt").write_text(message * repeat)
manifest.record_inputs(results_dir, "{NB1}", ["data/input.txt"])
manifest.record_facts(results_dir, "{NB1}", {{"fine_tuned_model": "ft:demo:" + message}})
print("key seen by the kernel:", os.environ.get("OPENAI_API_KEY"))  # a careless notebook: must be redacted
"""
NB2_CODE = """\
globals().update({"fail": False, **kvlib_params})
if fail:
    raise RuntimeError("boom from notebook")
print("seed", seed)
"""


def _write_notebook(path: Path, parameters: str, code: str) -> None:
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell(parameters, metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(code),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(nb, path)


def build_repo(root: Path) -> Path:
    (root / "notebooks").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "input.txt").write_text("some input data\n")
    _write_notebook(root / "notebooks" / f"{NB1}.ipynb", PARAMETERS, NB1_CODE)
    _write_notebook(root / "notebooks" / f"{NB2}.ipynb", PARAMETERS, NB2_CODE)
    (root / "notebooks" / "scratch.ipynb").write_text("not a pipeline notebook: ignored")
    params = root / "params" / PROFILE
    params.mkdir(parents=True)
    (root / "params" / "other").mkdir()
    (params / f"{NB1}.yaml").write_text("message: hi\nrepeat: 2\n")
    (params / f"{NB2}.yaml").write_text("seed: 7\n")
    return root


def run(root: Path, **kwargs) -> int:
    return reproduce.run_profile(
        PROFILE,
        results_root=root / "results",
        params_root=root / "params",
        notebooks_dir=root / "notebooks",
        **kwargs,
    )


def out_dir(root: Path) -> Path:
    return root / "results" / PROFILE


def manifest(root: Path) -> dict:
    return json.loads((out_dir(root) / "manifest.json").read_text())


def _kernel_env(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(plan, "NOTEBOOKS", dict(REGISTRY))
    mp.setenv("PYTHONPATH", KVLIB_ROOT, prepend=os.pathsep)


@pytest.fixture(autouse=True)
def kernel_env(monkeypatch):
    _kernel_env(monkeypatch)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, int]:
    root = build_repo(tmp_path_factory.mktemp("repo"))
    with pytest.MonkeyPatch.context() as mp:
        _kernel_env(mp)
        mp.setenv("OPENAI_API_KEY", SECRET)
        rc = run(root)
    return root, rc


@pytest.fixture
def clone(first_run, tmp_path) -> Path:
    """A private copy of the first run's repo and results, to re-run without disturbing other tests."""
    root, rc = first_run
    assert rc == 0
    return Path(shutil.copytree(root, tmp_path / "repo"))


def test_run_writes_notebooks_html_and_manifest(first_run):
    root, rc = first_run
    assert rc == 0
    out = out_dir(root)
    for name in (NB1, NB2):
        assert (out / f"{name}.ipynb").is_file() and (out / f"{name}.html").is_file()
    assert (out / NB1 / "message.txt").read_text() == "hihi"
    assert not list(out.glob(".*running*")), "temp files must not survive a run"

    text = (out / "manifest.json").read_text()
    assert text == json.dumps(json.loads(text), indent=2, sort_keys=True) + "\n"
    m = json.loads(text)
    assert m["profile"] == PROFILE
    assert m["kvlib_version"] == "0.1.0"
    assert m["python"] and m["platform"]
    assert set(m["packages"]) == set(kv_manifest.PACKAGES) and m["packages"]["papermill"]
    assert m["git"] == {"commit": None, "dirty": None}  # the temp repo is not a git checkout

    e1, e2 = m["notebooks"][NB1], m["notebooks"][NB2]
    assert e1["git"] == e2["git"] == {"commit": None, "dirty": None}  # each notebook records its own commit
    assert e1["status"] == e2["status"] == "ok"
    assert e1["params"] == {"message": "hi", "repeat": 2, "profile": PROFILE}  # results_dir is machine-specific
    assert e2["seeds"] == {"seed": 7, "split.seed": 1}  # defaults of the params class count too
    nb_bytes = (root / "notebooks" / f"{NB1}.ipynb").read_bytes()
    assert e1["notebook_sha256"] == hashlib.sha256(nb_bytes).hexdigest()
    assert len(e1["params_sha256"]) == 64 and e1["params_sha256"] != e2["params_sha256"]
    assert datetime.fromisoformat(e1["started"]) <= datetime.fromisoformat(e1["finished"])
    assert e1["wall_seconds"] > 0
    assert e1["outputs"] == [f"{NB1}.ipynb", f"{NB1}.html", f"{NB1}/message.txt"]
    data = (root / "data" / "input.txt").read_bytes()
    assert e1["inputs"] == [
        {"path": "data/input.txt", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    ]
    assert e2["inputs"] == []
    assert e1["facts"] == {"fine_tuned_model": "ft:demo:hi"} and "facts" not in e2  # not an output either
    assert e1["notebook"] == f"notebooks/{NB1}.ipynb" and e1["params_file"] == f"params/{PROFILE}/{NB1}.yaml"


def test_index_page_links_every_notebook_and_shows_the_manifest(first_run):
    """index.html is rendered from the manifest: every href resolves (notebooks, tables, params file via the
    repo root) and the seeds, data hashes and wall times are on the page."""
    import re

    root, _ = first_run
    out = out_dir(root)
    page = (out / "index.html").read_text()
    m = manifest(root)
    hrefs = re.findall(r'href="([^"]+)"', page)
    assert f"{NB1}.html" in hrefs and f"{NB2}.html" in hrefs and "manifest.json" in hrefs
    for href in hrefs:
        assert (out / href).resolve().is_file(), href
    assert f"params/{PROFILE}/{NB2}.yaml" in page and "seed=7" in page and "split.seed=1" in page
    assert m["notebooks"][NB1]["inputs"][0]["sha256"][:12] in page
    assert "ft:demo:hi" in page  # facts
    assert repro_map.render_index(m) == page  # deterministic: the manifest alone decides the page
    # each notebook shows the commit it ran at; the header names the latest run's
    m["git"] = {"commit": "b" * 40, "dirty": False}
    m["notebooks"][NB1]["git"] = {"commit": "a" * 40, "dirty": True}
    page = repro_map.render_index(m)
    assert "<code>aaaaaaaaaaaa</code> (uncommitted changes)" in page and "b" * 40 in page


def test_secret_env_value_is_never_written(first_run):
    root, _ = first_run
    files = [p for p in (root / "results").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"manifest.json", f"{NB1}.ipynb", f"{NB1}.html"}
    for path in files:
        assert SECRET not in path.read_text(errors="replace"), path
    # The kernel did see the key (so the check above is not vacuous): its printed value was redacted.
    assert kv_manifest.REDACTED in (out_dir(root) / f"{NB1}.ipynb").read_text()


def test_second_run_skips_everything(clone, capsys):
    before = (out_dir(clone) / "manifest.json").read_bytes()
    mtime = (out_dir(clone) / f"{NB1}.ipynb").stat().st_mtime_ns
    assert run(clone) == 0
    assert capsys.readouterr().out.count("skip (up to date)") == 2
    assert (out_dir(clone) / f"{NB1}.ipynb").stat().st_mtime_ns == mtime
    assert (out_dir(clone) / "manifest.json").read_bytes() == before


def test_force_reruns_only_the_selected_notebook(clone, capsys):
    mtime = (out_dir(clone) / f"{NB1}.ipynb").stat().st_mtime_ns
    assert run(clone, only=[f"notebooks/{NB1}.ipynb"], force=True) == 0
    out = capsys.readouterr().out
    assert f"{NB1}: run (forced)" in out and NB2 not in out
    assert (out_dir(clone) / f"{NB1}.ipynb").stat().st_mtime_ns != mtime
    assert manifest(clone)["notebooks"][NB2]["status"] == "ok"


def test_killed_attempts_count_in_the_wall_time(clone):
    """A session ending kills `kvlib reproduce` mid-notebook; the rerun that finishes it records every attempt,
    the killed one timed until papermill's last save of its running notebook."""
    out = out_dir(clone)
    began = datetime.now(timezone.utc) - timedelta(seconds=100)
    (out / f".{NB1}.attempts.json").write_text(json.dumps([{"started": began.isoformat(), "seconds": None}]))
    running = out / f".{NB1}.running.ipynb"
    running.write_text("{}")
    os.utime(running, (began.timestamp() + 40, began.timestamp() + 40))  # its last save, 40 s into the attempt
    first = manifest(clone)["notebooks"][NB1]
    assert first["attempts"] == 1 and first["wall_seconds_all_attempts"] == first["wall_seconds"]
    assert run(clone, only=[NB1], force=True) == 0
    entry = manifest(clone)["notebooks"][NB1]
    # the killed attempt, this one, and the first run with the same params (whose work a re-run reuses)
    assert entry["attempts"] == 3
    assert entry["wall_seconds_all_attempts"] == pytest.approx(40 + entry["wall_seconds"] + first["wall_seconds"],
                                                               abs=0.01)
    assert not (out / f".{NB1}.attempts.json").exists() and not running.exists()
    assert "3 runs and attempts with these params" in (out / "index.html").read_text()
    (clone / "params" / PROFILE / f"{NB1}.yaml").write_text("message: other\nrepeat: 2\n")
    assert run(clone, only=[NB1]) == 0
    changed = manifest(clone)["notebooks"][NB1]
    assert changed["attempts"] == 1 and changed["wall_seconds_all_attempts"] == changed["wall_seconds"]


def test_concurrent_runs_of_one_profile_keep_each_others_manifest_entries(clone, monkeypatch):
    """Two `kvlib reproduce --only` of one profile at once (a long profile in the background, a re-render in the
    foreground): the one that finishes last must not write back the manifest it read at its start."""
    real_run_job = reproduce.run_job

    def run_job_while_another_finishes(job, out, repo_root):
        result = real_run_job(job, out, repo_root)
        path = out / "manifest.json"
        data = json.loads(path.read_text())
        data["notebooks"]["03_other"] = {"status": "ok", "outputs": [], "inputs": []}  # the other process's entry
        path.write_text(json.dumps(data))
        return result

    monkeypatch.setattr(reproduce, "run_job", run_job_while_another_finishes)
    assert run(clone, only=[NB2], force=True) == 0
    entries = manifest(clone)["notebooks"]
    assert set(entries) == {NB1, NB2, "03_other"} and entries[NB2]["status"] == "ok"


def test_params_change_reruns_that_notebook(clone, capsys):
    (clone / "params" / PROFILE / f"{NB1}.yaml").write_text("message: hi\nrepeat: 3\n")
    assert run(clone) == 0
    out = capsys.readouterr().out
    assert f"{NB1}: run (params changed)" in out and f"{NB2}: skip (up to date)" in out
    assert (out_dir(clone) / NB1 / "message.txt").read_text() == "hihihi"
    assert manifest(clone)["notebooks"][NB1]["params"]["repeat"] == 3


def test_changed_since_run_names_results_whose_params_or_notebook_changed(clone):
    """The map marks results that an earlier params or notebook version produced: the same fingerprints that make
    `kvlib reproduce` re-run them, read from tracked files only (no data or derived inputs)."""
    entries = kv_manifest.load_manifest_entries(out_dir(clone))
    args = (PROFILE, entries, clone / "params", clone / "notebooks")
    assert kv_manifest.changed_since_run(*args) == {}
    (clone / "params" / PROFILE / f"{NB1}.yaml").write_text("message: hi\nrepeat: 3\n")
    _write_notebook(clone / "notebooks" / f"{NB2}.ipynb", PARAMETERS,
                    NB2_CODE + "print('edited')\n")
    assert kv_manifest.changed_since_run(*args) == {NB1: "params changed", NB2: "notebook changed"}
    (clone / "data" / "input.txt").write_text("other data\n")  # an input is no definition: not reported here
    (clone / "params" / PROFILE / f"{NB1}.yaml").write_text("message: hi\nrepeat: -1\n")  # invalid: reproduce says so
    unfingerprinted = {NB1: {**entries[NB1]}, NB2: {k: v for k, v in entries[NB2].items() if k != "params_sha256"}}
    assert kv_manifest.changed_since_run(PROFILE, unfingerprinted, clone / "params", clone / "notebooks") == {}
    repro_map.write_index(out_dir(clone), clone / "params", notebooks_dir=clone / "notebooks")  # still renders


def test_changed_input_data_reruns_the_notebook_that_read_it(clone, capsys):
    (clone / "data" / "input.txt").write_text("different data\n")
    assert run(clone) == 0
    out = capsys.readouterr().out
    assert f"{NB1}: run (input data/input.txt changed)" in out and f"{NB2}: skip (up to date)" in out
    digest = hashlib.sha256(b"different data\n").hexdigest()
    assert manifest(clone)["notebooks"][NB1]["inputs"][0]["sha256"] == digest


def test_failing_notebook_stops_and_keeps_previous_results(clone, capsys):
    good = (out_dir(clone) / f"{NB2}.ipynb").read_bytes()
    (clone / "params" / PROFILE / f"{NB2}.yaml").write_text("seed: 7\nfail: true\n")
    assert run(clone) == 1
    err = capsys.readouterr().err
    assert "RuntimeError: boom from notebook" in err and "raise RuntimeError" in err  # ename, evalue, traceback
    out = out_dir(clone)
    assert (out / f"{NB2}.ipynb").read_bytes() == good, "a failed run must not replace the last good result"
    assert (out / f"{NB2}.failed.ipynb").is_file()
    assert (out / f"{NB1}.ipynb").is_file() and (out / f"{NB1}.html").is_file()
    entries = manifest(clone)["notebooks"]
    assert entries[NB1]["status"] == "ok"
    # the record still shows the last good result, with the failure beside it
    assert entries[NB2]["status"] == "ok" and entries[NB2]["params"] == {"seed": 7, "profile": PROFILE}
    failure = entries[NB2]["last_failure"]
    assert failure["error"] == {"ename": "RuntimeError", "evalue": "boom from notebook"}
    assert failure["outputs"] == [f"{NB2}.failed.ipynb"]
    assert failure["attempts"] == 1 and (out / f".{NB2}.attempts.json").is_file()  # kept for the rerun
    (clone / "params" / PROFILE / f"{NB2}.yaml").write_text("seed: 8\n")  # the fix: params that differ from both
    assert run(clone) == 0
    entry = manifest(clone)["notebooks"][NB2]
    assert entry["status"] == "ok" and entry["attempts"] == 2 and "last_failure" not in entry
    assert entry["wall_seconds_all_attempts"] > entry["wall_seconds"]
    assert not (out / f".{NB2}.attempts.json").exists()


def test_failure_stops_the_run_before_later_notebooks(tmp_path, capsys):
    root = build_repo(tmp_path)
    _write_notebook(root / "notebooks" / f"{NB1}.ipynb", PARAMETERS, "1 / 0")
    assert run(root) == 1
    assert "ZeroDivisionError: division by zero" in capsys.readouterr().err
    assert set(manifest(root)["notebooks"]) == {NB1}
    assert not (out_dir(root) / f"{NB1}.ipynb").exists() and not (out_dir(root) / f"{NB2}.ipynb").exists()


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda r: (r / "params" / PROFILE / f"{NB2}.yaml").write_text("sed: 3\n"),
         "sed: unknown parameter (did you mean 'seed'?)"),
        (lambda r: (r / "params" / PROFILE / f"{NB1}.yaml").write_text("repeat: -1\n"), "repeat: must be >= 1"),
        (lambda r: (r / "params" / PROFILE / f"{NB2}.yaml").unlink(), "params file not found"),
        (lambda r: (r / "params" / PROFILE / f"{NB2}.yaml").write_text("results_dir: /tmp\n"),
         "results_dir: set by kvlib reproduce"),
        (lambda r: plan.NOTEBOOKS.pop(NB2), "no params class registered"),
        (lambda r: plan.NOTEBOOKS.update({NB2: "kvlib.nope:Params"}), "is not a dataclass"),
    ],
    ids=["unknown-key", "invalid-value", "missing-file", "reserved-key", "unregistered", "bad-class"],
)
def test_invalid_params_fail_before_anything_runs(tmp_path, mutate, message):
    # The broken params belong to the *second* notebook: the first must not have run either.
    root = build_repo(tmp_path)
    mutate(root)
    with pytest.raises(ParamError) as exc_info:
        run(root)
    assert message in str(exc_info.value)
    assert not (root / "results").exists()


def test_unknown_profile_and_notebook_list_the_known_ones(tmp_path):
    root = build_repo(tmp_path)
    with pytest.raises(ParamError, match="known profiles: other, tiny"):
        reproduce.run_profile("nope", results_root=root / "results", params_root=root / "params",
                              notebooks_dir=root / "notebooks")
    with pytest.raises(ParamError, match=f"unknown notebook '03_third'; known: {NB1}, {NB2}"):
        run(root, only=["03_third"])
    assert not (root / "results").exists()


def test_cli_reports_param_errors_with_exit_code_2(tmp_path):
    root = build_repo(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "kvlib", "reproduce", "--profile", "nope", "--params-dir", str(root / "params"),
         "--notebooks", str(root / "notebooks"), "--results", str(root / "results")],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2
    assert "invalid parameter: profile: unknown profile 'nope'" in proc.stderr


def test_skip_params_file_records_the_reason_without_running(clone, capsys):
    """`skip: <why>` as a notebook's whole params file: recorded as skipped with the reason, never executed,
    and up to date on the next run; a skip file with anything else in it is refused before anything runs."""
    (clone / "params" / PROFILE / f"{NB2}.yaml").write_text("skip: not part of this profile\n")
    assert run(clone) == 0
    assert "not for this profile (not part of this profile)" in capsys.readouterr().out
    entry = manifest(clone)["notebooks"][NB2]
    assert entry["status"] == "skipped" and entry["reason"] == "not part of this profile"
    assert "skipped: not part of this profile" in (out_dir(clone) / "index.html").read_text()
    assert run(clone) == 0 and capsys.readouterr().out.count("skip (up to date)") == 2
    (clone / "params" / PROFILE / f"{NB2}.yaml").write_text("skip: why\nseed: 3\n")
    with pytest.raises(ParamError, match="holding only `skip: <why>`"):
        run(clone)


def test_a_retrained_run_makes_the_notebooks_that_evaluate_it_stale(tmp_path):
    repo_params = Path(KVLIB_ROOT) / "params"
    assert plan.referenced_runs({"models": {"a": {"run": "x"}, "b": {"model": "m"}}, "match": "y",
                                      "grid": [{"run": "z"}]}) == ["x", "y", "z"]
    job = plan.NotebookJob(
        name="03_mdqa", notebook=Path(KVLIB_ROOT) / "notebooks" / "03_mdqa.ipynb",
        params_file=repo_params / "quick" / "03_mdqa.yaml",
        injected={"profile": "quick", "models": {"finetuned": {"run": "simple-template"}}},
        seeds={}, params_sha256="p", notebook_sha256="n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)  # runs/ is git-ignored, as in the repo
    (tmp_path / ".gitignore").write_text("/runs/\n")
    assert kv_manifest.run_identity_inputs(job, tmp_path) == []  # not trained yet: nothing to record
    summary = tmp_path / "runs" / "models" / "quick" / "simple-template" / "run_identity.json"
    summary.parent.mkdir(parents=True)
    summary.write_text('{"config_sha256": "a"}\n')
    inputs = kv_manifest.run_identity_inputs(job, tmp_path)
    assert [i["path"] for i in inputs] == ["runs/models/quick/simple-template/run_identity.json"]
    (tmp_path / "results").mkdir()
    entry = {"status": "ok", "params_sha256": "p", "notebook_sha256": "n", "outputs": [], "inputs": inputs}
    assert kv_manifest.stale_reason(job, entry, tmp_path / "results", tmp_path) is None
    summary.write_text('{"config_sha256": "b"}\n')  # the run was retrained with another recipe
    assert kv_manifest.stale_reason(job, entry, tmp_path / "results", tmp_path) == (
        "input runs/models/quick/simple-template/run_identity.json changed")
    legacy = {**entry, "inputs": [{**inputs[0], "path": "runs/models/quick/simple-template/train_summary.json"}]}
    assert kv_manifest.stale_reason(job, legacy, tmp_path / "results", tmp_path) is None  # not comparable
    tracked = {**entry, "inputs": [{**inputs[0], "path": "data/train_summary.json"}]}  # not a run's record
    assert kv_manifest.stale_reason(job, tracked, tmp_path / "results", tmp_path) == (
        "input data/train_summary.json missing")


def test_a_derived_input_absent_on_a_fresh_machine_is_not_a_change(tmp_path):
    # A new session's machine has the committed results but not runs/ (git-ignored): the generated dataset a
    # notebook read is absent there, not changed, so hours of finished results must not re-run for it; an
    # absent tracked file or data file still counts, and a regenerated derived file with another hash too.
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".gitignore").write_text("/runs/\n")
    (tmp_path / "kvlib").mkdir()
    (tmp_path / "results").mkdir()
    template = tmp_path / "kvlib" / "t.txt"
    template.write_text("tracked\n")
    derived = tmp_path / "runs" / "data" / "cpu" / "flenqa.jsonl"
    derived.parent.mkdir(parents=True)
    derived.write_text("{}\n")
    job = plan.NotebookJob(name="04_flenqa", notebook=tmp_path / "nb.ipynb", params_file=tmp_path / "p.yaml",
                                injected={}, seeds={}, params_sha256="p", notebook_sha256="n")
    inputs = [kv_manifest.input_record(derived, "runs/data/cpu/flenqa.jsonl"),
              kv_manifest.input_record(template, "kvlib/t.txt")]
    entry = {"status": "ok", "params_sha256": "p", "notebook_sha256": "n", "outputs": [], "inputs": inputs}
    assert kv_manifest.is_derived_input("runs/data/cpu/flenqa.jsonl", tmp_path)
    assert not kv_manifest.is_derived_input("kvlib/t.txt", tmp_path)
    assert not kv_manifest.is_derived_input(str(tmp_path / "runs" / "x"), tmp_path)  # absolute: a data file
    shutil.rmtree(tmp_path / "runs")  # the fresh machine
    assert kv_manifest.stale_reason(job, entry, tmp_path / "results", tmp_path) is None
    derived.parent.mkdir(parents=True)
    derived.write_text('{"regenerated": "differently"}\n')
    assert kv_manifest.stale_reason(job, entry, tmp_path / "results", tmp_path) == (
        "input runs/data/cpu/flenqa.jsonl changed")
    derived.unlink()
    template.unlink()
    assert kv_manifest.stale_reason(job, entry, tmp_path / "results", tmp_path) == "input kvlib/t.txt missing"


def test_data_inputs_are_found_in_the_current_data_directory_wherever_it_lives(tmp_path, monkeypatch):
    """Data files are recorded under $KVLIB_DATA_DIR, not the recording machine's path, so a clone whose data
    lives elsewhere keeps its finished notebooks; older manifests' absolute data paths are matched by their tail
    in the current data directory. The sha256 decides either way."""
    repo, data = tmp_path / "repo", tmp_path / "elsewhere" / "data"
    (repo / "results").mkdir(parents=True)
    (data / "mdqa").mkdir(parents=True)
    source = data / "mdqa" / "qa.jsonl"
    source.write_text('{"q": 1}\n')
    monkeypatch.chdir(repo)
    monkeypatch.setenv("KVLIB_DATA_DIR", str(data))
    [recorded] = kv_manifest.record_inputs(repo / "results", "03_mdqa", [source])
    assert recorded["path"] == "$KVLIB_DATA_DIR/mdqa/qa.jsonl"
    legacy = {**recorded, "path": "/home/someone/shared/data/mdqa/qa.jsonl"}  # written by an older kvlib
    job = plan.NotebookJob(name="03_mdqa", notebook=repo / "nb.ipynb", params_file=repo / "p.yaml",
                                injected={}, seeds={}, params_sha256="p", notebook_sha256="n")
    entry = lambda item: {"status": "ok", "params_sha256": "p", "notebook_sha256": "n", "outputs": [],  # noqa: E731
                          "inputs": [item]}
    assert not kv_manifest.is_derived_input(recorded["path"], repo)
    moved = tmp_path / "moved" / "data"
    shutil.move(data, moved)  # the same files in another place: nothing changed
    monkeypatch.setenv("KVLIB_DATA_DIR", str(moved))
    for item in (recorded, legacy):
        assert kv_manifest.locate_input(item["path"], repo) == moved / "mdqa" / "qa.jsonl"
        assert kv_manifest.stale_reason(job, entry(item), repo / "results", repo) is None
    (moved / "mdqa" / "qa.jsonl").write_text('{"q": 2}\n')
    assert kv_manifest.stale_reason(job, entry(recorded), repo / "results", repo) == (
        "input $KVLIB_DATA_DIR/mdqa/qa.jsonl changed")
    (moved / "mdqa" / "qa.jsonl").unlink()
    assert kv_manifest.stale_reason(job, entry(legacy), repo / "results", repo) == (
        "input /home/someone/shared/data/mdqa/qa.jsonl missing")


def test_git_info_dirty_means_changed_code_not_stray_files(tmp_path):
    repo = tmp_path / "repo"
    (repo / "kvlib").mkdir(parents=True)
    (repo / "kvlib" / "a.py").write_text("x = 1\n")
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init", "--allow-empty")
    git("add", "kvlib/a.py")
    git("-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "code")
    results = repo / "results"
    assert kv_manifest.git_info(repo, results)["dirty"] is False
    (repo / "run.log").write_text("a log beside the checkout\n")
    (results / "p").mkdir(parents=True)
    (results / "p" / "x.csv").write_text("1\n")
    assert kv_manifest.git_info(repo, results)["dirty"] is False
    (repo / "kvlib" / "b.py").write_text("y = 2\n")  # untracked code can change a run
    assert kv_manifest.git_info(repo, results)["dirty"] is True
    (repo / "kvlib" / "b.py").unlink()
    (repo / "kvlib" / "a.py").write_text("x = 2\n")
    assert kv_manifest.git_info(repo, results)["dirty"] is True


def test_one_run_per_machine_makes_a_second_run_wait_for_the_first(tmp_path, capsys):
    """Two runs at once on a small CPU each run many times slower: the second waits, saying who holds the lock."""
    import threading

    from kvlib.pipeline import reproduce

    lock, order = tmp_path / "kvlib.lock", []

    def second():
        with reproduce.one_run_per_machine("--profile quick", lock):
            order.append("second")

    with reproduce.one_run_per_machine("--profile cpu --only 02_finetune", lock):
        t = threading.Thread(target=second)
        t.start()
        t.join(0.5)
        assert t.is_alive() and order == []  # blocked while the first holds the lock
        order.append("first")
    t.join(10)
    assert order == ["first", "second"]
    assert "waiting for kvlib reproduce --profile cpu --only 02_finetune (pid" in capsys.readouterr().out
    assert lock.read_text() == ""  # released: nobody named as holder


def test_run_profile_takes_the_machine_lock_only_when_asked_and_after_validation(clone, monkeypatch):
    """The CLI locks (unless --concurrent); library calls and dry runs do not, and a bad profile fails at once."""
    import contextlib

    taken = []

    @contextlib.contextmanager
    def record(label, lock_path=None):
        taken.append(label)
        yield

    monkeypatch.setattr(reproduce, "one_run_per_machine", record)
    assert run(clone, only=[NB2], force=True, lock=True) == 0 and taken == [f"--profile {PROFILE} --only {NB2}"]
    assert run(clone, only=[NB2], force=True) == 0 and run(clone, dry_run=True, lock=True) == 0
    with pytest.raises(ParamError):
        reproduce.run_profile("nope", results_root=clone / "results", params_root=clone / "params",
                              notebooks_dir=clone / "notebooks", lock=True)
    assert len(taken) == 1
