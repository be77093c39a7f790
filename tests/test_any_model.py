"""`kvlib reproduce --profile P --model SPEC --set NOTEBOOK.KEY=VALUE`: the profile's params transformed before
validation (so --dry-run shows it), into results/<profile>/<model slug>/, never over the profile's own results,
generated data or trained models."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlib.engine.config import ParamError
from kvlib.pipeline import cli, plan
from kvlib.pipeline.notebooks import INJECTED, synthetic_models

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # params refer to each other relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def model_dir(tmp_path) -> Path:
    path = tmp_path / "checkpoints" / "my-llama"
    path.mkdir(parents=True)  # a local checkpoint directory (nothing is loaded while planning)
    return path


def planned(profile: str, results: Path, model: str | None = None, sets: tuple[str, ...] = (), only=None):
    return plan.plan_run(profile, only, ROOT / "params", ROOT / "notebooks", results,
                         plan.Overrides(model, sets))


def params_of(run_plan) -> dict:
    return {job.name: job.params for job in run_plan.jobs}


def test_model_replaces_the_base_everywhere_and_moves_every_output(at_root, tmp_path, model_dir):
    run_plan = planned("quick", tmp_path / "results", str(model_dir))
    assert run_plan.out_dir == (tmp_path / "results" / "quick" / "my-llama").resolve()
    p = params_of(run_plan)
    spec = str(model_dir.resolve())
    assert p["02_finetune"]["base_model"] == spec
    assert {d["tokenizer"] for d in p["01_synthetic_data"]["datasets"].values()} == {spec}
    assert p["04_flenqa"]["generation"]["tokenizer"] == spec
    for name in ("03_mdqa", "04_flenqa", "05_general_benchmarks", "06_baselines", "07_kv_retrieval",
                 "08_longer_context"):
        assert p[name]["models"]["original"]["model"] == spec, name
        assert all("run" in e for label, e in p[name]["models"].items() if label != "original")
    # generated data and trained models of this model never land on the profile's own
    assert p["01_synthetic_data"]["data_dir"] == "runs/data/variants/my-llama"
    assert p["02_finetune"]["models_dir"] == "runs/models/variants/my-llama"
    assert (p["06_baselines"]["data_dir"], p["06_baselines"]["models_dir"]) == (
        "runs/data/variants/my-llama", "runs/models/variants/my-llama")
    # the notebooks read each other's params from the ones this run writes
    derived = run_plan.out_dir / "params"
    assert run_plan.params_root == derived
    assert {job.injected[INJECTED].get("params_root") for job in run_plan.jobs
            if job.name != "01_synthetic_data"} == {derived.as_posix()}
    assert all(job.params_file == derived / "quick" / f"{job.name}.yaml" for job in run_plan.jobs)
    with run_plan.planned_params():  # as if written (planning writes nothing)
        jobs = run_plan.jobs[1].config.jobs()  # 02's runs: from the transformed 01, into the variant's folders
    assert jobs["simple-template"].train_config.model == spec
    assert jobs["simple-template"].train_config.out_dir == "runs/models/variants/my-llama/quick/simple-template"
    assert jobs["simple-template"].data_config.tokenizer == spec
    assert not (tmp_path / "results").exists(), "planning writes nothing"


def test_paper_profile_with_another_model(at_root, tmp_path):
    """Mistral's offline token counter and dry-run architecture belong to the base being replaced; the launcher
    stays (the FSDP config wraps whatever decoder layers the model has)."""
    run_plan = planned("paper-mistral", tmp_path, "meta-llama/Llama-3.1-8B-Instruct")
    p = params_of(run_plan)
    assert run_plan.out_dir.name == "meta-llama--llama-3.1-8b-instruct"
    finetune = p["02_finetune"]
    assert finetune["base_model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert finetune["launcher"]["kind"] == "accelerate"
    assert not any(k.startswith("dry_run_") for run in finetune["runs"].values() for k in run)
    assert {d["tokenizer"] for d in p["01_synthetic_data"]["datasets"].values()} == {"meta-llama/Llama-3.1-8B-Instruct"}
    assert p["06_baselines"]["flenqa"]["generation"]["tokenizer"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert next(j for j in run_plan.jobs if j.name == "08_longer_context").skip  # not in this profile, left so
    assert "MistralDecoderLayer" not in (ROOT / "params/paper-mistral/accelerate_fsdp.yaml").read_text()


def test_a_hub_mistral_gets_the_offline_tokenizer(at_root, tmp_path):
    run_plan = planned("quick", tmp_path, "mistralai/Mistral-7B-Instruct-v0.2")
    datasets = params_of(run_plan)["01_synthetic_data"]["datasets"]
    assert {d["tokenizer"] for d in datasets.values()} == {"mistral-7b-v0.1"}  # counted offline, same tokens


def test_set_overrides_any_param_with_the_yaml_validation(at_root, tmp_path):
    run_plan = planned("quick", tmp_path, None, (
        "03_mdqa.num_questions=2", "03.positions=[1, 5]", "01_synthetic_data.datasets.simple-template.n_train=4",
        "02_finetune.runs.simple-template.epochs=0.5", "07_kv_retrieval.litm=null",
        "05.tasks={gsm8k: {max_examples: 3}}", "02_finetune.launcher={kind: inprocess}"))
    p = params_of(run_plan)
    assert run_plan.out_dir.name == "smollm2-135m-instruct"  # the profile's base: still not its own results
    assert (p["03_mdqa"]["num_questions"], p["03_mdqa"]["positions"]) == (2, [1, 5])
    assert p["01_synthetic_data"]["datasets"]["simple-template"]["n_train"] == 4
    assert p["07_kv_retrieval"]["litm"] is None and p["05_general_benchmarks"]["tasks"] == {"gsm8k": {"max_examples": 3}}
    with run_plan.planned_params():
        jobs = run_plan.jobs[1].config.jobs()
    assert jobs["simple-template"].train_config.epochs == 0.5
    assert jobs["simple-template"].data_config.n_train == 4  # 02 reads the overridden 01
    assert run_plan.variant.changes[-1] == '02_finetune.launcher: (unset) -> {"kind": "inprocess"} (--set)'


@pytest.mark.parametrize("text, message", [
    ("03_mdqa.num_questions=0", r"03_mdqa.yaml: num_questions: must be >= 1, got 0"),
    ("03_mdqa.num_questons=5", r"num_questons: unknown parameter \(did you mean 'num_questions'\?\)"),
    ("99_nothing.x=1", r"unknown notebook '99_nothing'"),
    ("03_mdqa=5", r"expected NOTEBOOK.KEY=VALUE"),
    ("03_mdqa.results_dir=x", r"results_dir is set by kvlib reproduce"),
    ("03_mdqa.positions=[1, 2", r"the value is not YAML"),
    ("03_mdqa.num_questions.x=1", r"03_mdqa.num_questions is 3, not a mapping"),
])
def test_bad_sets_fail_before_anything_runs(at_root, tmp_path, text, message):
    with pytest.raises(ParamError, match=message):
        planned("quick", tmp_path, None, (text,))


def test_set_on_a_notebook_the_profile_skips(at_root, tmp_path):
    with pytest.raises(ParamError, match=r"08_longer_context does not apply to profile paper-mistral"):
        planned("paper-mistral", tmp_path, None, ("08_longer_context.num_documents=10",))


def test_bad_model_spec(at_root, tmp_path):
    with pytest.raises(ParamError, match=r"model: 'no such/dir/x' is not an existing directory"):
        planned("quick", tmp_path, "no such/dir/x")


def test_an_endpoint_is_evaluated_not_finetuned(at_root, tmp_path):
    run_plan = planned("quick", tmp_path, "openai:my-model@http://127.0.0.1:8000/v1")
    jobs = {job.name: job for job in run_plan.jobs}
    assert run_plan.out_dir.name == "api-my-model"
    assert jobs["02_finetune"].skip and jobs["06_baselines"].skip
    original = jobs["03_mdqa"].params["models"]
    assert original == {"original": {"model": "my-model", "kind": "openai", "base_url": "http://127.0.0.1:8000/v1"}}
    assert jobs["03_mdqa"].config.model_configs()["original"].kind == "openai"


def test_added_models_are_reported_not_judged(at_root, tmp_path):
    run_plan = planned("quick", tmp_path, None, ("03_mdqa.models.other instruct model={model: smollm2-135m-instruct}",))
    p = params_of(run_plan)["03_mdqa"]
    assert synthetic_models(p["models"], "original") == ["finetuned (template)", "finetuned (no template)"]


def test_model_slugs(tmp_path):
    (tmp_path / "run" / "model").mkdir(parents=True)
    assert plan.model_slug("smollm2-135m-instruct") == "smollm2-135m-instruct"
    assert plan.model_slug("EMBEDDED") == "smollm2-135m-instruct"
    assert plan.model_slug("Qwen/Qwen2.5-0.5B-Instruct") == "qwen--qwen2.5-0.5b-instruct"
    assert plan.model_slug(str(tmp_path / "run" / "model")) == "run-model"
    assert plan.model_slug("openai:gpt-4o-mini") == "api-gpt-4o-mini"


def test_dry_run_shows_every_change_and_writes_nothing(at_root, tmp_path, capsys, model_dir):
    argv = ["reproduce", "--profile", "quick", "--model", str(model_dir), "--set", "03_mdqa.num_questions=2",
            "--results", str(tmp_path / "results"), "--dry-run"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "base model smollm2-135m-instruct -> " + str(model_dir.resolve()) in out
    assert "02_finetune.base_model: smollm2-135m-instruct -> " in out
    assert "03_mdqa.num_questions: 3 -> 2 (--set)" in out
    assert f"original: {model_dir.resolve()} (local directory)" in out
    assert not (tmp_path / "results").exists()


def test_variant_params_are_written_and_read_back_alike(at_root, tmp_path, model_dir):
    """A real run writes the params it executes with; planning again from those files gives the same jobs (so
    the stale checks and the index page agree with the run)."""
    run_plan = planned("quick", tmp_path / "results", str(model_dir), ("03_mdqa.num_questions=2",))
    run_plan.variant.write()
    written = run_plan.out_dir / "params" / "quick" / "03_mdqa.yaml"
    text = written.read_text()
    assert text.startswith("# kvlib reproduce --profile quick --model ") and "#   03_mdqa.num_questions: 3 -> 2" in text
    again = plan.plan_profile("quick", None, run_plan.out_dir / "params", ROOT / "notebooks", run_plan.out_dir)
    assert [j.params_sha256 for j in again] == [j.params_sha256 for j in run_plan.jobs]


def test_gated_hub_model_stops_the_run_before_compute(at_root, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError
    from types import SimpleNamespace

    from kvlib.pipeline import reproduce

    monkeypatch.delenv("HF_HUB_OFFLINE")
    asked = []

    def auth_check(repo_id, **kwargs):
        asked.append(repo_id)
        raise GatedRepoError("403 Client Error: access to model is restricted",
                             response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    monkeypatch.setattr(reproduce, "run_job", lambda *a, **k: pytest.fail("nothing may run"))
    rc = reproduce.run_profile("quick", only=["02_finetune", "03_mdqa"], results_root=tmp_path,
                               params_root=ROOT / "params", notebooks_dir=ROOT / "notebooks",
                               model="meta-llama/Llama-3.2-1B-Instruct")
    err = capsys.readouterr().err
    assert rc == 2 and asked == ["meta-llama/Llama-3.2-1B-Instruct"]
    assert "meta-llama/Llama-3.2-1B-Instruct is a gated model" in err
    assert "https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct" in err and "HF_TOKEN" in err
    assert "licence" in err
    assert not (tmp_path / "quick" / "meta-llama--llama-3.2-1b-instruct" / "manifest.json").exists()


def test_manifest_and_index_of_a_variant(tmp_path):
    """The index page of results/<profile>/<slug>/ names the command and the model replaced."""
    from kvlib.pipeline import repro_map

    manifest = {"profile": "quick", "variant": {"command": "kvlib reproduce --profile quick --model x",
                                                "base_model": "smollm2-135m-instruct", "model": "/m/x"},
                "notebooks": {}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    html = repro_map.write_index(tmp_path).read_text()
    assert "kvlib reproduce --profile quick --model x" in html
    assert "base model smollm2-135m-instruct replaced by /m/x" in html
