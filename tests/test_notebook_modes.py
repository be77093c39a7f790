"""The three ways of running a notebook (see kvlib.pipeline.notebooks): by `kvlib reproduce` (tests/test_notebooks.py
renders the smoke profile), opened as it is (the quick profile into results/interactive/, whatever the kernel's
working directory), and by plain papermill (a params YAML is refused; a committed profile's results are never
written around the runner)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from kvlib.engine.config import ParamError
from kvlib.pipeline import notebooks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    """notebooks/ and params/ of this repository in a scratch folder (what a notebook run reads and writes)."""
    for folder in ("notebooks", "params"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path / "notebooks")  # a kernel started from JupyterLab's file browser
    return tmp_path


def test_start_without_injection_takes_the_quick_profile_into_results_interactive(repo_copy):
    P = notebooks.start("01_synthetic_data", None, {})
    assert Path.cwd() == repo_copy  # paths resolve from the repository root
    assert P.profile == notebooks.INTERACTIVE_PROFILE
    assert Path(P.results_dir) == Path("results/interactive/quick")
    assert P.datasets, "the quick profile's datasets"


def test_start_refuses_a_yaml_injected_key_by_key(repo_copy):
    with pytest.raises(ParamError, match=r"papermill with -f .*kvlib reproduce --profile <profile> --only 03_mdqa"):
        notebooks.start("03_mdqa", None, {"num_questions": 30, "positions": [1, 20]})


def test_start_refuses_to_write_a_committed_profile_directly(repo_copy):
    with pytest.raises(ParamError, match=r"only `kvlib reproduce --profile quick --only 01_synthetic_data`"):
        notebooks.start("01_synthetic_data", {"profile": "quick", "results_dir": "results/quick"}, {})
    staged = notebooks.start("01_synthetic_data", {"profile": "quick", "results_dir": "results/quick/.staging",
                                                   "datasets": {}}, {})
    assert staged.results_dir == "results/quick/.staging"  # the runner's staging folder; validated by the runner


def test_start_names_an_unknown_notebook():
    with pytest.raises(ParamError, match="unknown '09_nope'; known: 01_synthetic_data"):
        notebooks.start("09_nope", None, {})


@pytest.mark.slow
def test_notebook_opened_as_is_and_papermill_by_hand(repo_copy):
    """Run all cells of notebook 01 with no injection, from notebooks/: it finishes with the quick profile and
    writes only under results/interactive/ (and the git-ignored runs/). papermill with a profile's YAML stops in
    the first code cell with the `kvlib reproduce` command, before writing anything."""
    import papermill

    out = repo_copy / "executed.ipynb"
    papermill.execute_notebook(str(repo_copy / "notebooks" / "01_synthetic_data.ipynb"), str(out),
                               kernel_name="python3", cwd=str(repo_copy / "notebooks"), progress_bar=False)
    written = sorted(p.relative_to(repo_copy).as_posix() for p in (repo_copy / "results").rglob("*") if p.is_file())
    assert written and all(p.startswith("results/interactive/quick/01_synthetic_data/") for p in written), written
    assert not (repo_copy / "notebooks" / "results").exists() and not (repo_copy / "notebooks" / "runs").exists()

    with pytest.raises(papermill.PapermillExecutionError, match="kvlib reproduce --profile <profile> --only"):
        papermill.execute_notebook(str(repo_copy / "notebooks" / "03_mdqa.ipynb"), str(out),
                                   parameters={"num_questions": 3}, kernel_name="python3",
                                   cwd=str(repo_copy / "notebooks"), progress_bar=False)
    assert not (repo_copy / "results" / "quick").exists()
