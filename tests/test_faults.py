"""Fault injection: a run killed or failing at any point loses nothing of the last good result and counts nothing
twice. Kills during evaluation and training are real SIGKILLs of a child process; kills inside the final save are
an exception raised at each step of `publish` (what a kill leaves there is what the step before it did, and
`recover` must settle it); the notebook is a stand-in for papermill where the kernel does not matter."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import nbformat
import papermill
import pytest

from kvlib.engine.cache import CACHE_FILE, CorruptCacheError, ResponseCache
from kvlib.pipeline import manifest as kv_manifest
from kvlib.pipeline import plan, repro_map, reproduce

PROFILE = "tiny"
KVLIB_ROOT = str(Path(__file__).resolve().parents[1])


class Killed(BaseException):
    """Stands for a SIGKILL inside this process: no `except Exception` handler sees it."""


@dataclass
class TableParams:
    results_dir: str = ""
    seed: int = 0
    cache_dir: str | None = None


REGISTRY = {"01_table": TableParams, "02_other": TableParams}


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setattr(plan, "NOTEBOOKS", dict(REGISTRY))


def build_repo(root: Path, names=("01_table", "02_other")) -> Path:
    (root / "notebooks").mkdir(parents=True)
    (root / "params" / PROFILE).mkdir(parents=True)
    for name in names:
        nbformat.write(nbformat.v4.new_notebook(cells=[
            nbformat.v4.new_code_cell("kvlib_params = None", metadata={"tags": ["parameters"]})]),
            root / "notebooks" / f"{name}.ipynb")
        (root / "params" / PROFILE / f"{name}.yaml").write_text("seed: 1\n")
    return root


def run(root: Path, **kwargs) -> int:
    return reproduce.run_profile(PROFILE, results_root=root / "results", params_root=root / "params",
                                 notebooks_dir=root / "notebooks", **kwargs)


def out_dir(root: Path) -> Path:
    return root / "results" / PROFILE


def manifest(root: Path) -> dict:
    return json.loads((out_dir(root) / "manifest.json").read_text())


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file of a results folder by relative path, but the attempt and lock bookkeeping and the scratch of a
    run (its staging folder and running notebook, overwritten by the next run)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith((".attempts.json", ".lock", ".holder"))
            and ".running." not in p.name and not p.relative_to(folder).as_posix().startswith(".staging/")}


def fake_papermill(monkeypatch, hook=None):
    """papermill.execute_notebook without a kernel: the notebook writes `table.csv` (its seed) into its staging
    folder and saves the executed notebook; `hook(name, params)` runs first (to fail, sleep or look around)."""

    def execute(input_path, output_path, parameters, **kwargs):
        params, name = parameters["kvlib_params"], Path(input_path).stem
        if hook is not None:
            hook(name, params)
        folder = Path(kwargs["cwd"]) / params["results_dir"] / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "table.csv").write_text(f"name,seed\n{name},{params['seed']}\n")
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(seed)", outputs=[
            nbformat.v4.new_output("stream", text=f"{params['seed']}\n")])])
        nbformat.write(nb, output_path)
        return nb

    monkeypatch.setattr(papermill, "execute_notebook", execute)


@pytest.fixture
def good(tmp_path, monkeypatch) -> Path:
    """A repo whose two notebooks have a last good result (seed 1)."""
    root = build_repo(tmp_path / "repo")
    fake_papermill(monkeypatch)
    assert run(root) == 0
    return root


def assert_consistent(root: Path, scratch: bool = True) -> None:
    """The manifest describes exactly the files in place: every output exists, no journal or file moved aside is
    left (nor, with `scratch`, a staging folder or running notebook)."""
    out = out_dir(root)
    for name, entry in manifest(root)["notebooks"].items():
        for output in entry["outputs"]:
            assert (out / output).is_file(), output
        table = out / name / "table.csv"
        assert table.read_text().splitlines()[1] == f"{name},{entry['params']['seed']}", "files of another run"
    leftovers = [p.name for p in out.iterdir() if p.name.endswith((".publish.json", ".replaced"))
                 or (scratch and ".running." in p.name)]
    assert not leftovers and not (scratch and (out / ".staging" / "01_table").exists()), leftovers


# ------------------------------------------------------------------------------- before and during a run


def test_a_forced_rerun_deletes_nothing_before_the_notebook_starts(good, monkeypatch):
    """A kill in the first seconds of `--force` must find the last good result whole: nothing of it (outputs,
    manifest, index, bookkeeping) is removed or rewritten before the kernel starts."""
    before = snapshot(out_dir(good))
    seen = {}

    def look(name, params):
        seen[name] = snapshot(out_dir(good))
        raise Killed()

    fake_papermill(monkeypatch, look)
    with pytest.raises(Killed):
        run(good, force=True, only=["01_table"])
    assert seen["01_table"] == before
    assert snapshot(out_dir(good)) == before


def test_ctrl_c_times_the_attempt_and_the_rerun_counts_it_once(good, monkeypatch):
    first = manifest(good)["notebooks"]["01_table"]

    def slow_then_interrupted(name, params):
        time.sleep(0.3)
        raise KeyboardInterrupt

    fake_papermill(monkeypatch, slow_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(good, force=True, only=["01_table"])
    [attempt] = json.loads((out_dir(good) / ".01_table.attempts.json").read_text())
    assert attempt["ended"] == "interrupted" and attempt["seconds"] >= 0.3  # not 0 s
    assert manifest(good)["notebooks"]["01_table"] == first  # the last good result stands
    fake_papermill(monkeypatch)
    assert run(good, force=True, only=["01_table"]) == 0
    entry = manifest(good)["notebooks"]["01_table"]
    # the interrupted attempt, this run and the first run with the same params: each once
    assert entry["attempts"] == 3
    assert entry["wall_seconds_all_attempts"] == pytest.approx(
        attempt["seconds"] + entry["wall_seconds"] + first["wall_seconds"], abs=0.01)
    assert not (out_dir(good) / ".01_table.attempts.json").exists()


def test_a_failure_keeps_the_last_good_result_shown_and_its_cost_counted(good, monkeypatch, capsys):
    def boom(name, params):
        time.sleep(0.2)
        raise RuntimeError("boom in cell 3")

    first = manifest(good)["notebooks"]["01_table"]
    before = snapshot(out_dir(good))
    fake_papermill(monkeypatch, boom)
    assert run(good, force=True, only=["01_table"]) == 1
    entry = manifest(good)["notebooks"]["01_table"]
    assert entry["status"] == "ok" and entry["started"] == first["started"]
    failure = entry["last_failure"]
    assert failure["attempts"] == 1 and failure["wall_seconds_all_attempts"] >= 0.2
    assert kv_manifest.entry_attempts(entry) == 2
    assert kv_manifest.entry_wall_seconds(entry) == pytest.approx(
        first["wall_seconds_all_attempts"] + failure["wall_seconds_all_attempts"])
    after = snapshot(out_dir(good))
    assert {k: v for k, v in after.items() if k not in ("manifest.json", "index.html")} == {
        k: v for k, v in before.items() if k not in ("manifest.json", "index.html")}
    page = (out_dir(good) / "index.html").read_text()
    assert "ok (the last good result, shown); a later run failed at" in page and "boom in cell 3" in page
    # the rerun that succeeds counts the failed attempt in its own entry, once
    fake_papermill(monkeypatch)
    assert run(good, force=True, only=["01_table"]) == 0
    entry = manifest(good)["notebooks"]["01_table"]
    assert "last_failure" not in entry and entry["attempts"] == 3
    assert entry["wall_seconds_all_attempts"] == pytest.approx(
        first["wall_seconds"] + failure["wall_seconds_all_attempts"] + entry["wall_seconds"], abs=0.01)


def test_the_map_and_index_flag_a_later_failure_beside_the_last_good_verdict():
    entry = {"status": "ok", "params": {}, "outputs": [], "inputs": [], "wall_seconds": 60,
             "wall_seconds_all_attempts": 120, "attempts": 2,
             "facts": {"claims": [{"artifact": "fig5", "verdict": "holds", "model": "m", "claim": "c"}]},
             "last_failure": {"finished": "2030-01-02T03:04:05+00:00", "attempts": 1, "wall_seconds_all_attempts": 30,
                              "error": {"ename": "RuntimeError", "evalue": "out of memory\nin batch 3"}}}
    [row] = [r for r in repro_map.reproduction_map(PROFILE, entries={"03_mdqa": entry}) if r["artifact"].startswith(
        "Fig. 5")]
    assert row["verdict"] == ("holds (1 holds); a later run failed at 2030-01-02T03:04:05+00:00: RuntimeError: out of "
                              "memory in batch 3")
    page = repro_map.render_index({"notebooks": {"03_mdqa": entry}})
    assert "a later run failed at 2030-01-02T03:04:05+00:00: RuntimeError: out of memory in batch 3" in page
    assert "3 runs and attempts with these params: 0:02:30" in page  # the failed attempt's time counts
    assert kv_manifest.wall_time_summary({"03_mdqa": entry}).startswith(
        "Wall time on this machine (manifest.json: all runs and attempts behind the latest results): 0.0 h for 1 "
        "notebooks (minutes: 03 2.5)")


# ---------------------------------------------------------------------------------------- the final save


def _publish_steps(good: Path, monkeypatch) -> int:
    """How many os.replace calls one publish makes (each is a point where a kill can land)."""
    calls = []
    real_replace, real_publish = os.replace, reproduce.publish

    def counting_publish(*args, **kwargs):
        monkeypatch.setattr(os, "replace", lambda a, b: (calls.append(1), real_replace(a, b)))
        try:
            return real_publish(*args, **kwargs)
        finally:
            monkeypatch.setattr(os, "replace", real_replace)

    monkeypatch.setattr(reproduce, "publish", counting_publish)
    (good / "params" / PROFILE / "01_table.yaml").write_text("seed: 2\n")
    assert run(good, only=["01_table"]) == 0
    monkeypatch.setattr(reproduce, "publish", real_publish)
    (good / "params" / PROFILE / "01_table.yaml").write_text("seed: 1\n")
    assert run(good, only=["01_table"]) == 0
    return len(calls)


def test_a_kill_at_any_step_of_the_final_save_loses_nothing(good, monkeypatch):
    """The journal, the moves aside, the moves into place, the manifest and index (the commit point), the
    cleanup: killed after any of them, the next run finds either the last good result or the new one, whole and
    described by the manifest, and counts the attempt once."""
    steps = _publish_steps(good, monkeypatch)
    assert steps == 9  # journal, 3 aside, 3 into place, manifest, index
    real_replace, real_publish, real_finish = os.replace, reproduce.publish, reproduce._finish_publish
    for kill_at in range(steps + 1):  # the last one: killed during the cleanup after the commit point
        before = snapshot(out_dir(good))
        last_good = manifest(good)["notebooks"]["01_table"]
        count = []

        def replace(a, b):
            if len(count) == kill_at:
                raise Killed()
            count.append(1)
            real_replace(a, b)

        def killing_publish(*args, **kwargs):
            monkeypatch.setattr(os, "replace", replace)
            try:
                return real_publish(*args, **kwargs)
            finally:
                monkeypatch.setattr(os, "replace", real_replace)

        def killing_finish(out, name):
            raise Killed()

        monkeypatch.setattr(reproduce, "publish", killing_publish)
        if kill_at == steps:
            monkeypatch.setattr(reproduce, "_finish_publish", killing_finish)
        seed = 10 + kill_at
        (good / "params" / PROFILE / "01_table.yaml").write_text(f"seed: {seed}\n")
        with pytest.raises(Killed):
            run(good, only=["01_table"])
        monkeypatch.setattr(reproduce, "publish", real_publish)
        monkeypatch.setattr(reproduce, "_finish_publish", real_finish)

        committed = kill_at >= steps - 1  # the manifest was written (the index after it is not the commit)
        messages = reproduce.recover(out_dir(good), good / "params", good / "notebooks")
        if kill_at == 0:  # killed writing the journal: nothing had moved yet
            assert messages == []
        else:
            assert len(messages) == 1 and ("completed" in messages[0]) == committed, (kill_at, messages)
        assert_consistent(good, scratch=kill_at > 0)
        entry = manifest(good)["notebooks"]["01_table"]
        attempts_file = out_dir(good) / ".01_table.attempts.json"
        if committed:
            assert entry["params"]["seed"] == seed and not attempts_file.exists()
            assert entry["finished"] in (out_dir(good) / "index.html").read_text()  # re-rendered from the manifest
        else:
            assert entry == last_good
            after = snapshot(out_dir(good))
            assert {k: v for k, v in after.items() if k != "index.html"} == {
                k: v for k, v in before.items() if k != "index.html"}, kill_at
            [attempt] = json.loads(attempts_file.read_text())
            assert attempt["seconds"] is not None  # it ran to the end: timed
            assert attempt["ended"] == ("ok" if kill_at == 0 else "killed while saving its result")
            # the rerun counts the attempt whose result was lost, once
            assert run(good, only=["01_table"]) == 0
            entry = manifest(good)["notebooks"]["01_table"]
            assert entry["params"]["seed"] == seed and entry["attempts"] == 2 and not attempts_file.exists()
            assert_consistent(good)
        assert reproduce.recover(out_dir(good)) == []


# ---------------------------------------------------------------------------------- cache and concurrency


def test_a_corrupt_cache_stops_the_run_before_any_compute(good, monkeypatch):
    cache = good / "runs" / "cache"
    c = ResponseCache(cache)
    c.put("k", "generate", "b", ["x"], "y")
    c.close()
    (cache / CACHE_FILE).write_bytes(b"\x00garbage" * 512)
    (good / "params" / PROFILE / "01_table.yaml").write_text("seed: 1\ncache_dir: runs/cache\n")
    before = snapshot(out_dir(good))
    fake_papermill(monkeypatch, lambda name, params: pytest.fail("ran with a corrupt cache"))
    with pytest.raises(CorruptCacheError, match=r"responses.sqlite: the response cache is corrupt .* `mv "):
        run(good)
    assert snapshot(out_dir(good)) == before


def test_concurrent_runs_of_one_folder_wait_and_count_each_attempt_once(good, monkeypatch, capsys):
    first = manifest(good)["notebooks"]["01_table"]
    started, release = threading.Event(), threading.Event()
    order = []

    def hold(name, params):
        order.append((name, params["seed"]))
        if params["seed"] == 1:  # the first run holds the folder until told to finish
            started.set()
            assert release.wait(20)

    fake_papermill(monkeypatch, hold)
    results = {}
    a = threading.Thread(target=lambda: results.update(a=run(good, force=True, only=["01_table"], lock=True)))
    a.start()
    assert started.wait(20)
    (good / "params" / PROFILE / "01_table.yaml").write_text("seed: 2\n")  # the second run's params
    b = threading.Thread(target=lambda: results.update(b=run(good, only=["01_table"], lock=True)))
    b.start()
    b.join(1.0)
    assert b.is_alive() and order == [("01_table", 1)]  # waiting, nothing of it ran
    release.set()
    a.join(20)
    b.join(20)
    assert results == {"a": 0, "b": 0} and order == [("01_table", 1), ("01_table", 2)]
    assert "waiting for kvlib reproduce --profile tiny --only 01_table (pid" in capsys.readouterr().out
    entry = manifest(good)["notebooks"]["01_table"]
    assert entry["params"]["seed"] == 2 and entry["attempts"] == 1  # new params: its own cost only
    assert_consistent(good)
    assert first["wall_seconds"] > 0


# --------------------------------------------------------------------------------- real kills (processes)

EVAL_PARAMS = '''
from dataclasses import dataclass


@dataclass
class EvalParams:
    results_dir: str = ""
    cache_dir: str = "runs/cache"
    n: int = 30
    delay: float = 0.0


REGISTRY = {"01_eval": EvalParams}
'''

EVAL_CODE = '''
import dataclasses
import time

import evalparams  # the kernel runs in the repository root

fields = {f.name for f in dataclasses.fields(evalparams.EvalParams)}
P = evalparams.EvalParams(**{k: v for k, v in kvlib_params.items() if k in fields})
from kvlib.engine.cache import CachedBackend, ResponseCache
from kvlib.pipeline import manifest
from kvlib.report import tables as reporting


class Slow:
    name = "slow"
    asked = []

    def identity(self):
        return {"name": "slow"}

    def generate(self, requests, max_new_tokens, on_result=None):
        out = []
        for i, request in enumerate(requests):  # a prompt string or a chat conversation (kvlib.engine.backends)
            time.sleep(P.delay)
            question = request if isinstance(request, str) else request[-1]["content"]
            answer = "answer to " + question
            Slow.asked.append(question)
            if on_result:
                on_result(i, answer)
            out.append(answer)
        return out


answers = CachedBackend(Slow(), ResponseCache(P.cache_dir)).generate([f"q{i}" for i in range(P.n)], 8)
out = reporting.notebook_output_dir(P.results_dir, "01_eval")
(out / "answers.csv").write_text("q,a\\n" + "".join(f"q{i},{a}\\n" for i, a in enumerate(answers)))
manifest.record_facts(P.results_dir, "01_eval", {"asked": len(Slow.asked)})
print(f"01_eval asked {len(Slow.asked)}")
import sys
print("01_eval progress: done", file=sys.stderr)
'''

DRIVER = '''
import sys
sys.path[:0] = [{kvlib!r}, {repo!r}]
import evalparams
from kvlib.pipeline import cli, plan
plan.NOTEBOOKS = evalparams.REGISTRY
sys.exit(cli.main(sys.argv[1:]))
'''


def _stored(cache: Path) -> int:
    return len(ResponseCache(cache)) if (cache / CACHE_FILE).is_file() else 0


def _eval_repo(tmp_path: Path) -> Path:
    """A repository with one notebook, 01_eval, that evaluates a fake model through the response cache."""
    repo = tmp_path / "repo"
    (repo / "notebooks").mkdir(parents=True)
    (repo / "params" / PROFILE).mkdir(parents=True)
    (repo / "evalparams.py").write_text(EVAL_PARAMS)
    nbformat.write(nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("kvlib_params = None", metadata={"tags": ["parameters"]}),
               nbformat.v4.new_code_cell(textwrap.dedent(EVAL_CODE))],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}),
        repo / "notebooks" / "01_eval.ipynb")
    return repo


@pytest.mark.slow
def test_a_run_killed_during_evaluation_resumes_from_the_cache(tmp_path, monkeypatch):
    """A real SIGKILL of `kvlib reproduce` while a notebook evaluates: the last good result is untouched, and the
    rerun asks the model only what the cache lacks, ending with one stored answer per question and the table an
    uninterrupted run writes."""
    repo = _eval_repo(tmp_path)
    params = repo / "params" / PROFILE / "01_eval.yaml"
    params.write_text("n: 30\n")
    monkeypatch.syspath_prepend(str(repo))
    import evalparams

    monkeypatch.setattr(plan, "NOTEBOOKS", evalparams.REGISTRY)
    monkeypatch.setenv("PYTHONPATH", KVLIB_ROOT, prepend=os.pathsep)
    assert run(repo) == 0  # the last good result
    out = out_dir(repo)
    good_table = (out / "01_eval" / "answers.csv").read_bytes()
    before = snapshot(out)

    params.write_text("n: 30\ndelay: 0.3\ncache_dir: runs/cache2\n")  # a new run that answers slowly
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(kvlib=KVLIB_ROOT, repo=str(repo)))
    proc = subprocess.Popen(
        [sys.executable, str(driver), "reproduce", "--profile", PROFILE, "--params-dir", str(repo / "params"),
         "--notebooks", str(repo / "notebooks"), "--results", str(repo / "results")],
        cwd=repo, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = repo / "runs" / "cache2"
    deadline = time.time() + 180
    while time.time() < deadline and _stored(cache) < 5:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    stable, last = 0, -1  # the kernel notices its parent died within a second or two: wait until it stops
    while stable < 3:
        time.sleep(1)
        now = _stored(cache)
        stable, last = (stable + 1, now) if now == last else (0, now)
    assert 5 <= last < 30, f"the kill should land midway, {last} of 30 stored"
    assert snapshot(out) == before  # the last good result, whole; its manifest unchanged
    [attempt] = json.loads((out / ".01_eval.attempts.json").read_text())
    assert attempt["seconds"] is None  # killed: timed by the next run

    assert run(repo) == 0
    entry = manifest(repo)["notebooks"]["01_eval"]
    assert entry["facts"]["asked"] == 30 - last  # only what the cache lacked
    assert _stored(cache) == 30  # one stored answer per question: nothing twice
    assert (out / "01_eval" / "answers.csv").read_bytes() == good_table
    assert entry["attempts"] == 2 and entry["wall_seconds_all_attempts"] >= entry["wall_seconds"]
    assert not (out / ".01_eval.attempts.json").exists()


@pytest.mark.slow
def test_sigterm_times_the_attempt_like_ctrl_c(tmp_path, monkeypatch):
    """A session ending sends SIGTERM: `kvlib reproduce` stops as on Ctrl-C, with the running attempt timed in the
    attempts file (not left for the next run to guess) and the kernel shut down."""
    repo = _eval_repo(tmp_path)
    (repo / "params" / PROFILE / "01_eval.yaml").write_text("n: 200\ndelay: 0.2\n")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(kvlib=KVLIB_ROOT, repo=str(repo)))
    began = time.time()
    proc = subprocess.Popen(
        [sys.executable, str(driver), "reproduce", "--profile", PROFILE, "--params-dir", str(repo / "params"),
         "--notebooks", str(repo / "notebooks"), "--results", str(repo / "results")],
        cwd=repo, env={**os.environ, "PYTHONPATH": KVLIB_ROOT}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = repo / "runs" / "cache"
    deadline = time.time() + 180
    while time.time() < deadline and _stored(cache) < 3:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) != 0
    [attempt] = json.loads((out_dir(repo) / ".01_eval.attempts.json").read_text())
    assert attempt["ended"] == "interrupted" and 0 < attempt["seconds"] < time.time() - began
    time.sleep(3)
    stored = _stored(cache)
    time.sleep(2)
    assert _stored(cache) == stored < 200  # the kernel is gone: nothing answers any more
    assert not (out_dir(repo) / "manifest.json").exists()  # nothing published


@pytest.mark.slow
def test_what_the_kernel_prints_reaches_the_terminal_as_it_comes(tmp_path):
    """A notebook cell may run for hours (training): its progress bars and prints stream to the terminal of
    `kvlib reproduce`, stdout to stdout and stderr to stderr, not only into the rendered notebook."""
    repo = _eval_repo(tmp_path)
    (repo / "params" / PROFILE / "01_eval.yaml").write_text("n: 3\n")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER.format(kvlib=KVLIB_ROOT, repo=str(repo)))
    done = subprocess.run(
        [sys.executable, str(driver), "reproduce", "--profile", PROFILE, "--params-dir", str(repo / "params"),
         "--notebooks", str(repo / "notebooks"), "--results", str(repo / "results")],
        cwd=repo, env={**os.environ, "PYTHONPATH": KVLIB_ROOT}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "01_eval asked 3" in done.stdout and "01_eval asked 3" not in done.stderr
    assert "01_eval progress: done" in done.stderr
    assert "Executing:" not in done.stderr  # no bar of cells drawn over the kernel's own lines


TRAIN_DRIVER = '''
import sys, time
sys.path.insert(0, {kvlib!r})
from kvlib.engine import train
from kvlib.engine.config import from_mapping


class Slow:
    def __getattr__(self, name):
        return lambda *a, **k: None

    def on_step_end(self, args, state, control, **kw):
        time.sleep(0.5)


cfg = from_mapping(train.TrainConfig, {cfg!r})
train.train(cfg, resume="auto", callbacks=[Slow()])
'''


@pytest.mark.slow
def test_a_training_killed_midway_resumes_to_the_same_weights(tmp_path, embedded_checkpoint):
    """A real SIGKILL of a training process after its second checkpoint: the rerun (what a notebook's `run:` model
    does, resume="auto") continues from the last complete checkpoint and ends with the weights of an
    uninterrupted run."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kvlib.engine import train
    from kvlib.engine.config import from_mapping
    from kvlib.tasks import synthetic as gen

    tok = AutoTokenizer.from_pretrained(embedded_checkpoint)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(tok), max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).save_pretrained(tmp_path / "tiny")
    tok.save_pretrained(tmp_path / "tiny")
    samples = gen.generate(gen.GenerationConfig(num_dicts=2, n_train=12, n_eval=0, max_tokens=400, tokenizer="chars"),
                           lambda texts: [len(t) // 3 for t in texts])["train"]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": s.messages()}) + "\n" for s in samples))

    def config(out: Path) -> dict:
        return dict(train_file=str(data), out_dir=str(out), model=str(tmp_path / "tiny"), max_steps=8,
                    gradient_accumulation_steps=1, learning_rate=1e-3, save_steps=2, logging_steps=1)

    driver = tmp_path / "train_driver.py"
    driver.write_text(TRAIN_DRIVER.format(kvlib=KVLIB_ROOT, cfg=config(tmp_path / "killed")))
    proc = subprocess.Popen([sys.executable, str(driver)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = from_mapping(train.TrainConfig, config(tmp_path / "killed"))
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        last = train.last_checkpoint(killed)
        if last and int(last.rsplit("-", 1)[1]) >= 4:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not train.is_finished(killed), "the kill should land before the end"
    summary = train.train(killed, resume="auto")
    assert summary["resumed_from"].startswith("checkpoint-") and summary["global_steps"] == 8
    straight = train.train(from_mapping(train.TrainConfig, config(tmp_path / "straight")), resume="auto")
    assert straight["global_steps"] == 8

    def weights(folder: Path) -> dict:
        return {k: v for f in sorted((folder / "model").glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b = weights(tmp_path / "straight"), weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_no_handler_sees_is_timed_from_the_attempts_heartbeat(tmp_path):
    """SIGKILL (the machine stopped under it) leaves the attempt open; papermill does not save a notebook while
    one long cell runs (hours of training), so the next run times it from the heartbeat the attempt kept."""
    from datetime import datetime, timedelta

    from kvlib.pipeline.manifest import attempt_heartbeat, attempts_path, begin_attempt

    running = tmp_path / ".02_finetune.running.ipynb"
    attempts = begin_attempt(tmp_path, "02_finetune", "2026-12-04T11:00:00+00:00", running)
    with attempt_heartbeat(tmp_path, "02_finetune", attempts, every=0.05):
        deadline = time.time() + 30
        while time.time() < deadline and "alive" not in json.loads(attempts_path(tmp_path, "02_finetune").read_text())[-1]:
            time.sleep(0.05)
    saved = json.loads(attempts_path(tmp_path, "02_finetune").read_text())
    assert saved[-1]["seconds"] is None and "alive" in saved[-1]  # open, with a sign of life
    # as if killed 2.5 hours in, the notebook last saved when its long cell began, 1 minute in
    began = datetime.fromisoformat("2026-12-04T11:00:00+00:00")
    saved[-1]["alive"] = (began + timedelta(hours=2.5)).isoformat(timespec="seconds")
    attempts_path(tmp_path, "02_finetune").write_text(json.dumps(saved))
    running.write_text("{}")
    os.utime(running, (began.timestamp() + 60, began.timestamp() + 60))
    killed, new = begin_attempt(tmp_path, "02_finetune", "2026-12-04T14:00:00+00:00", running)
    assert killed["ended"] == "killed" and killed["seconds"] == 2.5 * 3600
    assert new == {"started": "2026-12-04T14:00:00+00:00", "seconds": None}
    # no heartbeat (killed within its first minute): the notebook's last save times it
    new["seconds"] = None
    attempts_path(tmp_path, "02_finetune").write_text(json.dumps([killed, new]))
    os.utime(running, (datetime.fromisoformat(new["started"]).timestamp() + 30,) * 2)
    assert begin_attempt(tmp_path, "02_finetune", "2026-12-04T15:00:00+00:00", running)[1]["seconds"] == 30
