"""End to end on a CPU at toy size, offline: a tiny random Mistral with Mistral-7B-Instruct-v0.1's real tokenizer
and chat template runs the paper-mistral profile's code path (generation with the Mistral token budget,
answer-only training, MDQA, a general benchmark, claims), and a tiny Llama checkpoint runs a profile through
`kvlib reproduce --model`. Sizes come down with --set; nothing touches the network."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from kvlib.pipeline import reproduce

ROOT = Path(__file__).resolve().parents[1]
PAPER_DATASETS = [f"simple-{t}-s{s}" for t in ("template", "notemplate") for s in (0, 1, 2)]


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # inherited by the notebooks' kernels
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def scratch(tmp_path: Path) -> list[str]:
    """Generated data, trained models and cached answers in tmp, not under the checkout's runs/."""
    return [f"01_synthetic_data.data_dir={tmp_path / 'data'}", f"02_finetune.models_dir={tmp_path / 'models'}",
            f"03_mdqa.cache_dir={tmp_path / 'cache'}"]


@pytest.mark.slow
def test_tiny_mistral_runs_the_paper_mistral_code_path(offline, tmp_path, tiny_mistral_dir):
    sets = scratch(tmp_path) + [f"05_general_benchmarks.cache_dir={tmp_path / 'cache'}"]
    for name in PAPER_DATASETS:  # the paper's datasets, shrunk: 6 dictionaries, prompts within 600 Mistral tokens
        sets += [f"01_synthetic_data.datasets.{name}.{k}={v}"
                 for k, v in (("num_dicts", 6), ("n_train", 4), ("n_eval", 2), ("max_tokens", 600))]
    sets += ["02_finetune.launcher=null",  # one CPU: trained in the notebook's process
             "02_finetune.learned_threshold=0",  # a random tiny model learns nothing: every finetune goes on
             "02_finetune.eval_samples=1", "02_finetune.max_new_tokens=4", "02_finetune.token_loss_samples=1",
             "03_mdqa.num_documents=3", "03_mdqa.positions=[1, 3]", "03_mdqa.num_questions=2",
             "03_mdqa.max_new_tokens=4", "05_general_benchmarks.tasks={hellaswag: {max_examples: 2}}"]
    results = tmp_path / "results"
    rc = reproduce.run_profile("paper-mistral", only=["01_synthetic_data", "02_finetune", "03_mdqa",
                                                      "05_general_benchmarks"],
                               results_root=results, params_root=ROOT / "params", notebooks_dir=ROOT / "notebooks",
                               model=tiny_mistral_dir, sets=sets)
    out = results / "paper-mistral" / "tiny-mistral"
    manifest = json.loads((out / "manifest.json").read_text())
    assert rc == 0, {n: e.get("error") for n, e in manifest["notebooks"].items()}
    assert manifest["variant"]["model"] == tiny_mistral_dir
    assert manifest["variant"]["base_model"] == "mistralai/Mistral-7B-Instruct-v0.1"
    assert not (results / "paper-mistral" / "manifest.json").exists(), "the profile's own results stay untouched"

    # generation: the Mistral token budget, counted with Mistral's own SentencePiece model
    from kvlib.engine.models import load_token_counter
    from kvlib.tasks.synthetic import load_dataset

    data = tmp_path / "data" / "paper-mistral" / "simple-template-s0"
    samples = load_dataset(data, "train")
    assert len(samples) == 4 and all(s.meta["n_tokens"] <= 600 - 100 for s in samples)
    assert [s.meta["n_tokens"] for s in samples] == load_token_counter("mistral-7b-v0.1").count([s.prompt for s in samples])
    assert json.loads((data / "stats.json").read_text())["config"]["tokenizer"] == tiny_mistral_dir

    # answer-only training under v0.1's template: loss on the answer and </s>, per token (Fig. 4)
    token_loss = pd.read_csv(out / "02_finetune" / "token_loss.csv")
    assert set(token_loss["model"]) == {"original", "finetuned"} and set(token_loss["kind"]) == {"format", "key", "value"}
    one = token_loss[(token_loss["run"] == "simple-template-s0") & (token_loss["model"] == "original")]
    first = one[one["id"] == one["id"].iloc[0]]
    assert first["token"].iloc[-1] == "</s>" and first["token"].iloc[0] == "The"
    runs = pd.read_csv(out / "02_finetune" / "training_runs.csv")
    assert len(runs) == 6 and set(runs["device"]) == {"cpu"}
    summary = json.loads((tmp_path / "models" / "paper-mistral" / "simple-template-s0" / "train_summary.json").read_text())
    assert summary["config"]["model"] == tiny_mistral_dir and summary["config"]["gradient_accumulation_steps"] == 16

    # MDQA and a general benchmark: the original is the tiny Mistral; claims judge the synthetic runs (seed groups)
    mdqa = pd.read_csv(out / "03_mdqa" / "mdqa_items.csv")
    assert set(mdqa["model_spec"].dropna()) >= {tiny_mistral_dir} and set(mdqa["backend"]) == {"hf"}
    claims = pd.read_csv(out / "03_mdqa" / "claims.csv")
    assert set(claims["model"]) == {"finetuned (template)", "finetuned (no template)"}
    assert manifest["notebooks"]["03_mdqa"]["facts"]["engines"]["original"] == "hf"
    general = pd.read_csv(out / "05_general_benchmarks" / "items.csv")
    assert set(general["task"]) == {"hellaswag"} and general["model"].nunique() == 7
    assert (out / "05_general_benchmarks" / "claims.csv").is_file()
    written = (out / "params" / "paper-mistral" / "02_finetune.yaml").read_text()
    assert f"base_model: {tiny_mistral_dir}" in written and "launcher: null" in written


@pytest.mark.slow
def test_tiny_llama_runs_a_profile_through_model(offline, tmp_path, tiny_llama_4k_dir):
    """The smoke profile's MDQA notebook with a tiny Llama checkpoint as the base: the runs it evaluates are
    finetuned from that checkpoint on first use (no notebook 02 needed), and everything lands in its own folder."""
    results = tmp_path / "results"
    sets = scratch(tmp_path) + ["03_mdqa.max_new_tokens=4"]

    def run() -> int:
        return reproduce.run_profile("smoke", only=["03_mdqa"], results_root=results, params_root=ROOT / "params",
                                     notebooks_dir=ROOT / "notebooks", model=tiny_llama_4k_dir, sets=sets)

    rc = run()
    out = results / "smoke" / "tiny-llama"
    manifest = json.loads((out / "manifest.json").read_text())
    assert rc == 0, {n: e.get("error") for n, e in manifest["notebooks"].items()}
    summary = json.loads((tmp_path / "models" / "smoke" / "simple-template" / "train_summary.json").read_text())
    assert summary["base_model"]["path"] == tiny_llama_4k_dir
    data = json.loads((tmp_path / "data" / "smoke" / "simple-template" / "stats.json").read_text())
    assert data["config"]["tokenizer"] == tiny_llama_4k_dir  # the budget in the base model's own tokens
    mdqa = pd.read_csv(out / "03_mdqa" / "mdqa_items.csv")
    assert set(mdqa[mdqa["model"] == "original"]["model_spec"]) == {tiny_llama_4k_dir}
    assert set(mdqa["model"]) == {"original", "finetuned", "finetuned s1"}
    assert (out / "index.html").is_file() and "--model" in (out / "index.html").read_text()
    assert run() == 0  # the same command again: up to date, nothing re-runs
    assert json.loads((out / "manifest.json").read_text())["notebooks"]["03_mdqa"]["finished"] == \
        manifest["notebooks"]["03_mdqa"]["finished"]
