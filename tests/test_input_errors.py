"""Bad input is rejected before any compute with one line naming the file (and line or field) and the fix, and
the CLI exits with status 2 instead of a traceback."""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from kvlib.engine import cache as kv_cache
from kvlib.engine.config import InputError, ParamError, load_yaml
from kvlib.pipeline import cli, plan

ROOT = Path(__file__).resolve().parents[1]


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"kvlib {command}: "), err
    assert "Traceback" not in err
    return lines[0]


def _profile_copy(tmp_path: Path, profile: str = "smoke") -> Path:
    """A copy of a committed profile's params in another params directory (`--params-dir`)."""
    params = tmp_path / "params"
    shutil.copytree(ROOT / "params" / profile, params / profile)
    return params


# ------------------------------------------------------------------------------------------------ YAML


def test_yaml_duplicate_keys_are_rejected_with_file_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("models:\n  original: {model: a}\nseed: 0\nnum_documents: 3\nseed: 1\n")
    with pytest.raises(InputError) as exc:
        load_yaml(path)
    assert str(exc.value) == f"{path}:5: invalid YAML: duplicate key 'seed' (first on line 3): keep one of them"
    path.write_text("a: {x: 1, x: 2}\n")  # flow mappings too
    with pytest.raises(InputError, match=r"p.yaml:1: invalid YAML: duplicate key 'x'"):
        load_yaml(path)
    path.write_text("base: &b {x: 1, y: 2}\nd:\n  <<: *b\n  x: 3\n")  # a merge key may be overridden on purpose
    assert load_yaml(path)["d"] == {"x": 3, "y": 2}


def test_yaml_syntax_errors_are_one_line_with_file_and_line(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(InputError) as exc:
        load_yaml(path)
    message = str(exc.value)
    assert message.startswith(f"{path}:3: invalid YAML: ") and "\n" not in message


def test_cli_reports_a_broken_params_file_in_one_line(tmp_path, capsys, monkeypatch):
    params = _profile_copy(tmp_path)
    (params / "smoke" / "03_mdqa.yaml").write_text(
        (params / "smoke" / "03_mdqa.yaml").read_text() + "num_documents: 4\n")
    monkeypatch.chdir(ROOT)
    rc = cli.main(["reproduce", "--profile", "smoke", "--dry-run", "--params-dir", str(params),
                   "--results", str(tmp_path / "results")])
    assert rc == 2
    line = _one_line_error(capsys, "reproduce")
    assert f"{params / 'smoke' / '03_mdqa.yaml'}:" in line and "duplicate key 'num_documents'" in line
    assert not (tmp_path / "results").exists()


def test_an_interrupted_command_ends_with_one_line_and_status_130(capsys, monkeypatch):
    """Ctrl-C (or SIGTERM, which `kvlib reproduce` turns into one) ends the CLI with one line saying how to resume,
    not a traceback."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("signal 15")

    monkeypatch.setattr(cli.reproduce, "run_profile", interrupted)
    monkeypatch.chdir(ROOT)
    assert cli.main(["reproduce", "--profile", "smoke"]) == 130
    assert _one_line_error(capsys, "reproduce").endswith("run the same command again to resume")


# ----------------------------------------------------------------------------------- models and --params-dir


def test_a_local_model_path_that_does_not_exist_fails_at_planning(tmp_path, capsys, monkeypatch):
    params = _profile_copy(tmp_path)
    mdqa = params / "smoke" / "03_mdqa.yaml"
    mdqa.write_text(mdqa.read_text().replace("original: {model: smollm2-135m-instruct}",
                                             "original: {model: ./runs/models/never-trained/model}"))
    monkeypatch.chdir(ROOT)
    rc = cli.main(["reproduce", "--profile", "smoke", "--dry-run", "--params-dir", str(params),
                   "--results", str(tmp_path / "results")])
    assert rc == 2
    line = _one_line_error(capsys, "reproduce")
    assert str(mdqa) in line and "models.original.model: './runs/models/never-trained/model' is not an existing" \
        in line and "fix the path" in line
    finetune = params / "smoke" / "02_finetune.yaml"
    finetune.write_text(finetune.read_text() + "base_model: /nowhere/base\n")
    with pytest.raises(ParamError, match=r"02_finetune.yaml: base_model: '/nowhere/base' is not an existing"):
        plan.plan_profile("smoke", ["02_finetune"], params, ROOT / "notebooks", tmp_path / "results")


def test_params_dir_is_where_run_models_are_looked_up(tmp_path, monkeypatch):
    """`--params-dir` decides where an evaluation notebook's `run:` models are found, at planning and in the
    notebook (params_root is injected), and is not part of the params hash or the manifest's params."""
    params = _profile_copy(tmp_path)
    for name in ("01_synthetic_data", "02_finetune", "03_mdqa"):  # a run only this params directory defines
        path = params / "smoke" / f"{name}.yaml"
        path.write_text(path.read_text().replace("simple-template-s1", "only-in-this-params-dir"))
    monkeypatch.chdir(ROOT)  # where the committed params/ would be found by mistake
    [job] = plan.plan_profile("smoke", ["03_mdqa"], params, ROOT / "notebooks", tmp_path / "results")
    assert job.config.model_configs()["finetuned s1"].run == "only-in-this-params-dir"
    assert job.injected["kvlib_params"]["params_root"] == str(params.resolve())  # outside the checkout: absolute
    assert "params_root" not in job.params
    [committed] = plan.plan_profile("smoke", ["03_mdqa"], ROOT / "params", ROOT / "notebooks", tmp_path / "r")
    assert committed.injected["kvlib_params"]["params_root"] == "params"  # inside: relative to the repo root
    assert committed.params_sha256 != job.params_sha256  # the params differ (the run's name), not their folder
    [synthetic] = plan.plan_profile("smoke", ["01_synthetic_data"], params, ROOT / "notebooks", tmp_path / "r")
    assert "params_root" not in synthetic.injected["kvlib_params"]  # not declared by that notebook: not injected


def test_params_root_in_a_params_file_is_refused(tmp_path):
    params = _profile_copy(tmp_path)
    path = params / "smoke" / "03_mdqa.yaml"
    path.write_text(path.read_text() + "params_root: elsewhere\n")
    with pytest.raises(ParamError, match="params_root: set by kvlib reproduce"):
        plan.plan_profile("smoke", ["03_mdqa"], params, ROOT / "notebooks", tmp_path / "results")


def test_seeds_are_recorded_under_their_own_names():
    assert plan.find_seeds({"question_seed": 1, "distractor_seed": 2, "seed_groups": {"a": ["b"]},
                            "generation": {"seed": 3}, "runs": [{"seed": 4}], "bootstrap_seeds": [5]}) == {
        "question_seed": 1, "distractor_seed": 2, "generation.seed": 3, "runs[0].seed": 4, "bootstrap_seeds": [5]}


# ---------------------------------------------------------------------------------------------- the CLI


def test_map_of_an_unknown_profile_is_one_line(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# x\n")
    rc = cli.main(["map", "--profile", "nosuch", "--update", str(readme), "--params-dir", str(ROOT / "params")])
    assert rc == 2
    assert "invalid parameter: profile: unknown profile 'nosuch'" in _one_line_error(capsys, "map")
    rc = cli.main(["map", "--profile", "smoke", "--update", str(readme), "--params-dir", str(ROOT / "params"),
                   "--results", str(tmp_path)])
    assert rc == 2
    line = _one_line_error(capsys, "map")
    assert f"{readme}: no markers for the smoke map" in line and "reproduction-map:smoke:start" in line
    assert readme.read_text() == "# x\n"


def test_generate_refuses_to_write_over_an_existing_output_before_computing(tmp_path, capsys, monkeypatch):
    from kvlib.tasks import synthetic

    monkeypatch.setattr(synthetic, "generate", lambda *a, **k: pytest.fail("generated before the check"))
    existing = tmp_path / "data.jsonl"
    existing.write_text("precious\n")
    assert cli.main(["generate", "--tokenizer", "chars", "--out", str(existing)]) == 2
    assert f"{existing}: --out is an existing file" in _one_line_error(capsys, "generate")
    dataset = tmp_path / "simple-s0"
    dataset.mkdir()
    (dataset / "config.json").write_text("{}\n")
    assert cli.main(["generate", "--tokenizer", "chars", "--out", str(dataset)]) == 2
    line = _one_line_error(capsys, "generate")
    assert f"{dataset}: --out already holds a dataset" in line and "--force" in line
    assert existing.read_text() == "precious\n" and (dataset / "config.json").read_text() == "{}\n"
    synthetic.check_out_dir(dataset, overwrite=True)  # --force
    synthetic.check_out_dir(tmp_path / "new")  # a new directory


def test_train_dry_run_names_a_malformed_line(tmp_path, capsys):
    good = '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
    data = tmp_path / "train.jsonl"
    params = tmp_path / "train.yaml"
    params.write_text(f"train_file: {data}\nout_dir: {tmp_path / 'out'}\n")
    for bad, what in (('{"messages": [{"role": "user", "content": "no answer"}]}\n', "expected {'messages'"),
                      ('{"messages": [\n', "malformed JSON line")):
        data.write_text(good + bad + good)
        assert cli.main(["train", "--params", str(params), "--dry-run"]) == 2
        line = _one_line_error(capsys, "train")
        assert f"{data}:2: " in line and what in line


# ------------------------------------------------------------------------------------------ the cache


def _corrupt_cache(folder: Path) -> Path:
    c = kv_cache.ResponseCache(folder)
    for i in range(2000):
        c.put(f"k{i}", "generate", "b", ["x" * 200], "answer " * 20)
    c.close()
    path = folder / kv_cache.CACHE_FILE
    data = bytearray(path.read_bytes())
    for offset in range(8 * 4096, 24 * 4096, 4096):  # damage pages in the middle, not the header
        data[offset:offset + 100] = b"\xff" * 100
    path.write_bytes(bytes(data))
    return path


def test_a_corrupt_cache_is_named_with_the_command_that_moves_it_aside(tmp_path):
    path = _corrupt_cache(tmp_path / "cache")
    with pytest.raises(kv_cache.CorruptCacheError) as exc:
        kv_cache.check_cache(tmp_path / "cache")
    message = str(exc.value)
    assert message.startswith(f"{path}: the response cache is corrupt (database disk image is malformed)")
    assert f"`mv {path} {path}.corrupt`" in message and "\n" not in message
    kv_cache.check_cache(tmp_path / "no-cache-yet")  # nothing there: fine
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(kv_cache.CorruptCacheError, match="file is not a database"):
        kv_cache.ResponseCache(tmp_path / "cache")
    shutil.move(path, f"{path}.corrupt")  # the fix the message names
    assert len(kv_cache.ResponseCache(tmp_path / "cache")) == 0


def test_a_locked_cache_is_not_called_corrupt(tmp_path):
    kv_cache.ResponseCache(tmp_path).put("k", "generate", "b", ["x"], "y")
    holder = sqlite3.connect(tmp_path / kv_cache.CACHE_FILE)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        other = kv_cache.ResponseCache.__new__(kv_cache.ResponseCache)
        other.path = tmp_path / kv_cache.CACHE_FILE
        other._db = sqlite3.connect(other.path, timeout=0.1)
        with pytest.raises(sqlite3.OperationalError):
            other.put("k2", "generate", "b", ["x"], "y")
    finally:
        holder.rollback()
