"""The real notebooks: params for every profile validate, sources carry no outputs, and the `smoke`
profile executes every notebook end to end (so a broken notebook fails CI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlib import reproduce

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = reproduce.discover_notebooks(ROOT / "notebooks")
PROFILES = sorted(p.name for p in (ROOT / "params").iterdir() if p.is_dir())


@pytest.mark.parametrize("profile", PROFILES)
def test_every_notebook_has_valid_params_for_every_profile(profile, monkeypatch, tmp_path):
    """The runner's own planning (what `kvlib reproduce` checks before running anything) passes for
    every notebook of every profile."""
    assert NOTEBOOKS, "no notebooks found"
    assert {"smoke", "quick", "cpu"} <= set(PROFILES)
    monkeypatch.chdir(ROOT)  # params refer to each other relative to the repo root
    jobs = reproduce.plan_profile(profile, None, ROOT / "params", ROOT / "notebooks", tmp_path)
    assert sorted(job.name for job in jobs) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.startswith("paper-")])
def test_paper_profiles_dry_run_offline(profile, monkeypatch, tmp_path, capsys):
    """`kvlib reproduce --profile paper-* --dry-run` validates the paper's configurations without weights, an
    API key or the network, writes nothing, and says what each notebook's models need."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dry-run-secret-0123456789")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kvlib import cli

    assert cli.main(["reproduce", "--profile", profile, "--dry-run", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{len(NOTEBOOKS)} notebooks, params valid" in out
    assert out.count("would run (no previous run)") + out.count("not for this profile (") == len(NOTEBOOKS)
    assert "Hugging Face hub" in out or "$OPENAI_API_KEY set" in out  # the paper's models are not local
    assert "sk-dry-run-secret" not in out
    assert not any(tmp_path.iterdir()), "a dry run must not write results"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_sources_are_clean(name):
    nb = json.loads(NOTEBOOKS[name].read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "clear outputs before committing"
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), "needs a `parameters` cell"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_every_param_a_profile_sets_reaches_the_notebook(name):
    """papermill injects whatever a params file holds, and reproduce validates it against the params class, but
    a key the notebook never passes on is silently ignored: each key some profile sets must be declared in
    the parameters cell and used by the code after it."""
    import re

    from kvlib.config import load_yaml

    nb = json.loads(NOTEBOOKS[name].read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params_cell = next(c for c in code if "parameters" in c.get("metadata", {}).get("tags", []))
    declared = "".join(params_cell["source"])
    body = "\n".join("".join(c["source"]) for c in code if c is not params_cell)
    keys = set()
    for profile in PROFILES:
        path = ROOT / "params" / profile / f"{name}.yaml"
        data = load_yaml(path) if path.is_file() else {}
        keys |= set(data) - {reproduce.SKIP_KEY}
    for key in sorted(keys):
        assert re.search(rf"^{key} = ", declared, re.M), f"{key}: set by a profile, not in the parameters cell"
        assert re.search(rf"\b{key}\b", body), f"{key}: set by a profile, never used by the notebook"


@pytest.mark.slow
def test_smoke_profile_runs_every_notebook(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # notebooks write generated data relative to the repo root (runs/, git-ignored)
    rc = reproduce.run_profile("smoke", results_root=tmp_path, params_root=ROOT / "params",
                               notebooks_dir=ROOT / "notebooks")
    assert rc == 0
    manifest = json.loads((tmp_path / "smoke" / "manifest.json").read_text())
    for name in NOTEBOOKS:
        entry = manifest["notebooks"][name]
        assert entry["status"] == "ok"
        assert (tmp_path / "smoke" / f"{name}.html").is_file()
        for out in entry["outputs"]:
            assert (tmp_path / "smoke" / out).is_file()
    tables = (tmp_path / "smoke" / "01_synthetic_data" / "token_lengths.csv").read_text()
    assert "simple-template" in tables and "multisubkey-template" in tables
