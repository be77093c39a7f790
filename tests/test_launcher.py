"""Training that needs several GPUs runs as its own process (`accelerate launch ... -m kvlib train`), after its
memory estimate is checked against the visible GPUs; hub models that are gated or missing stop with the fix.
subprocess and torch.cuda are stood in for: nothing here needs a GPU, the network or the model's weights."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from kvlib.engine import models, train
from kvlib.engine.config import ParamError, from_mapping
from kvlib.pipeline import cli, notebooks, plan, runs

ROOT = Path(__file__).resolve().parents[1]
FSDP = "params/paper-mistral/accelerate_fsdp.yaml"


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture
def paper_cfg(tmp_path, at_root) -> train.TrainConfig:
    """The paper's Mistral-7B recipe on a small chat file, planned offline (Mistral's shipped architecture and
    tokenizer; no weights)."""
    chats = tmp_path / "train.jsonl"
    chats.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Dictionary [1] {{{i}: {i + 7}}} Report the value of key {i}."},
        {"role": "assistant", "content": f"The value of key {i} is {i + 7} and it is in Dictionary [1]."}]}) + "\n"
        for i in range(8)))
    return from_mapping(train.TrainConfig, {
        "train_file": str(chats), "out_dir": str(tmp_path / "run"), "model": "mistralai/Mistral-7B-Instruct-v0.1",
        "gradient_checkpointing": True, "gradient_accumulation_steps": 4, "precision": "auto",
        "dry_run_tokenizer": "mistral-7b-v0.1",
        "dry_run_model_config": "params/paper-mistral/mistral-7b-v0.1.config.json"})


def accelerate(processes: int = 4) -> train.LauncherConfig:
    return from_mapping(train.LauncherConfig, {"kind": "accelerate", "config_file": FSDP, "num_processes": processes})


class FakeLaunch:
    """subprocess.run standing in for `accelerate launch`: records the command and finishes the run as rank 0
    would (its train_summary.json, of this config and training file)."""

    def __init__(self, cfg: train.TrainConfig, returncode: int = 0):
        self.cfg, self.returncode, self.calls = cfg, returncode, []

    def __call__(self, argv, check=False):
        self.calls.append(argv)
        if self.returncode == 0:
            params = Path(argv[argv.index("--params") + 1])
            launched = train.config_from_file(params)
            out = Path(launched.out_dir)
            summary = {**train.run_identity(launched), "model_dir": str(out / "model"), "global_steps": 1}
            (out / train.SUMMARY_FILE).write_text(json.dumps(summary))
        return SimpleNamespace(returncode=self.returncode)


def test_a_multi_gpu_run_is_launched_as_its_own_process(paper_cfg):
    fake = FakeLaunch(paper_cfg)
    summary = runs.train_run(paper_cfg, accelerate(4), run=fake, gpus_gib=[79.2] * 4)
    (argv,) = fake.calls
    params = Path(paper_cfg.out_dir) / runs.LAUNCH_PARAMS
    assert Path(argv[0]).name == "accelerate"
    assert argv[1:] == ["launch", "--config_file", FSDP, "--num_processes", "4", "-m", "kvlib", "train",
                        "--params", str(params), "--resume-auto"]
    launched = train.config_from_file(params)  # the run's exact config: the same run identity
    assert train.config_hash(launched) == train.config_hash(paper_cfg)
    assert summary["model_dir"].endswith("model")
    assert runs.train_run(paper_cfg, accelerate(4), run=fake, gpus_gib=[79.2] * 4) == summary
    assert len(fake.calls) == 1, "a finished run is reused, not launched again"


def test_a_failed_launch_says_how_to_resume(paper_cfg):
    with pytest.raises(RuntimeError, match=r"exited with status 3 .* resumes from the run's last checkpoint"):
        runs.train_run(paper_cfg, accelerate(4), run=FakeLaunch(paper_cfg, returncode=3), gpus_gib=[79.2] * 4)


def test_a_run_that_cannot_fit_stops_before_launching_with_the_numbers_and_the_fix(paper_cfg):
    fake = FakeLaunch(paper_cfg)
    with pytest.raises(ParamError) as err:
        runs.train_run(paper_cfg, accelerate(4), where="run simple-template-s0", run=fake, gpus_gib=[22.0] * 4)
    text = str(err.value)
    assert text.startswith("run simple-template-s0: training mistralai/Mistral-7B-Instruct-v0.1 does not fit")
    assert "needs about 27." in text and "on each of 4 GPUs" in text
    assert "weights, gradients and AdamW states 27.0 GiB" in text and "90% of a GPU's memory" in text
    assert "visible: 4 GPUs x 22.0, 22.0, 22.0, 22.0 GiB" in text
    assert "run on 4 GPUs with at least 30." in text and "method: lora" in text
    assert not fake.calls


def test_too_few_gpus_suggests_a_process_count_that_fits(paper_cfg):
    with pytest.raises(ParamError, match=r"visible: 2 GPUs x 79.2, 79.2 GiB. .*set launcher: \{kind: accelerate, "
                                         r"num_processes: 2\} in 02_finetune \(5\d.\d GiB per GPU on 2\)"):
        runs.train_run(paper_cfg, accelerate(4), run=FakeLaunch(paper_cfg), gpus_gib=[79.2, 79.2])
    with pytest.raises(ParamError, match=r"visible: no CUDA GPU \(torch.cuda.device_count\(\) == 0\)"):
        runs.train_run(paper_cfg, accelerate(4), run=FakeLaunch(paper_cfg), gpus_gib=[])


def test_in_process_training_on_a_gpu_is_checked_too(paper_cfg, monkeypatch):
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("must not train"))
    with pytest.raises(ParamError, match=r"needs about 10[789].\d GiB on each of 1 GPU \("):
        runs.train_run(paper_cfg, None, gpus_gib=[40.0])


def test_visible_gpus_come_from_torch_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=(80 if i == 0 else 40) * 1024 ** 3))
    assert train.visible_gpus_gib() == [80.0, 40.0]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.visible_gpus_gib() == []


def test_the_paper_profiles_launch_their_runs_on_four_gpus(at_root):
    for profile in ("paper-mistral", "paper-mistral-v02"):
        params = notebooks.profile_finetune_params(profile)
        assert (params.launcher.kind, params.launcher.config_file, params.launcher.num_processes) == \
            ("accelerate", FSDP, 4)
        for job in params.jobs().values():  # the global batch stays the paper's 16
            assert job.train_config.gradient_accumulation_steps * params.launcher.num_processes == 16


def test_the_global_batch_must_split_over_the_processes(at_root, tmp_path):
    with pytest.raises(ParamError, match=r"runs.simple-template-s0.gradient_accumulation_steps: 16 does not split "
                                         r"over launcher.num_processes 3"):
        plan.plan_run("paper-mistral", ["02_finetune"], ROOT / "params", ROOT / "notebooks", tmp_path,
                      plan.Overrides(sets=("02_finetune.launcher.num_processes=3",)))
    with pytest.raises(ParamError, match=r"launcher.config_file: file not found: nowhere.yaml"):
        plan.plan_run("paper-mistral", ["02_finetune"], ROOT / "params", ROOT / "notebooks", tmp_path,
                      plan.Overrides(sets=("02_finetune.launcher.config_file=nowhere.yaml",)))


def test_dry_run_says_how_training_is_launched(at_root, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert cli.main(["reproduce", "--profile", "paper-mistral", "--only", "02_finetune", "--dry-run",
                     "--results", str(tmp_path)]) == 0
    assert f"launched as its own job on 4 GPU(s), `accelerate launch --config_file {FSDP} -m kvlib train" in \
        capsys.readouterr().out


def test_kvlib_train_resume_auto(tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr(train, "train", lambda cfg, resume: seen.setdefault("resume", resume) and {})
    params = tmp_path / "p.yaml"
    params.write_text(yaml.safe_dump({"train": {"train_file": "x.jsonl", "out_dir": str(tmp_path / "o")}}))
    assert cli.main(["train", "--params", str(params), "--resume-auto"]) == 0  # a rank other than 0: no report
    assert seen["resume"] == "auto"
    with pytest.raises(SystemExit):
        cli.main(["train", "--params", str(params), "--resume", "--resume-auto"])


# ------------------------------------------------------------------------------------------ hub access


def _gated():
    from huggingface_hub.errors import GatedRepoError

    return GatedRepoError("403 Client Error. Access to model is restricted", response=SimpleNamespace(headers={},
                                                                                                         request=None))


def _missing():
    from huggingface_hub.errors import RepositoryNotFoundError

    return RepositoryNotFoundError("404 Client Error. Repository Not Found",
                                   response=SimpleNamespace(headers={}, request=None))


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_gated_model_names_the_repository_the_licence_and_hf_token(wrapped, monkeypatch):
    """As huggingface_hub raises it, and as transformers re-raises it (an OSError from the GatedRepoError)."""
    monkeypatch.delenv("HF_TOKEN", raising=False)

    def loader(source, **kwargs):
        if not wrapped:
            raise _gated()
        try:
            raise _gated()
        except OSError as exc:
            raise OSError(f"You are trying to access a gated repo.\nMake sure to have access to it at "
                          f"https://huggingface.co/{source}.") from exc

    with pytest.raises(models.ModelAccessError) as err:
        models._from_pretrained(loader, "mistralai/Mistral-7B-Instruct-v0.1", "model")
    text = str(err.value)
    assert text.startswith("mistralai/Mistral-7B-Instruct-v0.1 is a gated model on the Hugging Face hub")
    assert "https://huggingface.co/mistralai/Mistral-7B-Instruct-v0.1" in text and "accept its licence" in text
    assert "HF_TOKEN (now not set" in text


def test_a_missing_model_says_so(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value_never_printed")

    def loader(source, **kwargs):
        raise _missing()

    with pytest.raises(models.ModelAccessError, match=r"org/no-such-model: no such model on the Hugging Face hub") as err:
        models._from_pretrained(loader, "org/no-such-model", "model")
    assert "HF_TOKEN (now set)" in str(err.value) and "hf_secret" not in str(err.value)


def test_check_hub_access_asks_the_hub_only_for_hub_models(monkeypatch, tmp_path):
    import huggingface_hub

    asked = []

    def auth_check(repo_id, **kwargs):
        asked.append(repo_id)
        raise _missing() if repo_id == "org/missing" else ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "auth_check", auth_check)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(models.ModelAccessError, match="org/missing: no such model"):
        models.check_hub_access("org/missing")
    models.check_hub_access("org/unreachable")  # the hub out of reach: nothing known, loading will say
    models.check_hub_access("smollm2-135m-instruct")
    models.check_hub_access(str(tmp_path))
    assert asked == ["org/missing", "org/unreachable"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.check_hub_access("org/missing")
    assert len(asked) == 2
