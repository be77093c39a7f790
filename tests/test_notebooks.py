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


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_sources_are_clean(name):
    nb = json.loads(NOTEBOOKS[name].read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert not any(c.get("outputs") or c.get("execution_count") for c in code), "clear outputs before committing"
    assert any("parameters" in c.get("metadata", {}).get("tags", []) for c in code), "needs a `parameters` cell"


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
