"""Which models the paper's claims judge: those declared as finetuned on the synthetic data (a `run:` of notebook
02, or `synthetic: true`); any other model an evaluation notebook compares is reported, not judged."""
from __future__ import annotations

from pathlib import Path

import pytest

from kvlib.engine.config import ParamError
from kvlib.pipeline import notebooks
from kvlib.pipeline.notebooks import MDQANotebookParams, synthetic_models
from kvlib.report import paper

ROOT = Path(__file__).resolve().parents[1]


def test_runs_and_flagged_models_are_synthetic_other_models_are_not():
    models = {
        "original": {"model": "smollm2-135m-instruct"},
        "finetuned": {"run": "simple-template"},
        "another instruct model": {"model": "org/other-instruct"},
        "a kv-finetuned checkpoint": {"model": "/ckpt/kv", "synthetic": True},
        "a run on purpose left out": {"run": "simple-notemplate", "synthetic": False},
    }
    assert synthetic_models(models, "original") == ["finetuned", "a kv-finetuned checkpoint"]
    assert synthetic_models(models, "finetuned") == ["a kv-finetuned checkpoint"]


def test_seed_groups_stand_in_for_their_members_when_all_are_synthetic():
    models = {"original": {}, "s0": {"run": "a"}, "s1": {"run": "b"}, "other": {"model": "org/m"}}
    assert synthetic_models(models, "original", {"seeds": ["s0", "s1"]}) == ["seeds"]
    assert synthetic_models(models, "original", {"mixed": ["s0", "other"]}) == ["s1"]


def test_the_flag_is_validated_and_never_reaches_the_backend(monkeypatch):
    monkeypatch.chdir(ROOT)
    params = MDQANotebookParams(profile="quick", models={
        "original": {"model": "smollm2-135m-instruct"},
        "kv": {"model": "smollm2-135m-instruct", "synthetic": True, "batch_size": 2}})
    configs = params.model_configs()
    assert configs["kv"].batch_size == 2 and params.synthetic_models("original") == ["kv"]
    bad = MDQANotebookParams(profile="quick", models={"original": {}, "kv": {"synthetic": "yes"}})
    with pytest.raises(ParamError, match=r"models.kv.synthetic: expected true/false"):
        bad.model_configs()


def test_claims_judge_only_the_synthetic_models():
    """MDQA's claims for a run and an added instruct model: only the run is judged."""

    def pooled(model, setting, delta):
        return {"model": model, "setting": setting, "n": 50, "delta_correct": delta, "ci_low": delta - 0.05,
                "ci_high": delta + 0.05, "ci_method": "t", "p_increase": 0.001 if delta > 0 else 0.9,
                "p_decrease": 0.9 if delta > 0 else 0.001, "p_no_loss": 0.001, "p_no_gain": 0.5,
                "baseline_value": 0.5, "baseline_ci_low": 0.4, "baseline_ci_high": 0.6}

    models = {"original": {}, "finetuned": {"run": "simple-template"}, "other": {"model": "org/other"}}
    rows = [pooled(m, s, 0.2) for m in ("finetuned", "other") for s in ("random", "retrieved")]
    claims = paper.mdqa_claims(rows, synthetic_models(models, "original"), "random", "retrieved")
    assert claims and {c["model"] for c in claims} == {"finetuned"}


def test_every_profile_judges_its_runs():
    """In the committed profiles every model besides the original is a run of notebook 02, so the claims judge
    the same models as before the flag existed."""
    for params_file in sorted((ROOT / "params").glob("*/0[3-8]_*.yaml")):
        data = notebooks.load_yaml(params_file)
        if "models" not in data:
            continue
        base = data.get("original") or data.get("baseline") or next(iter(data["models"]))
        expected = [label for label, entry in data["models"].items() if label != base and "run" in (entry or {})]
        members = {m for ms in (data.get("seed_groups") or {}).values() for m in ms}
        assert [m for m in synthetic_models(data["models"], base) if m not in members] == \
            [m for m in expected if m not in members], params_file
