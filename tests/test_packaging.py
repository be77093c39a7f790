"""An installed wheel works outside the repository: it carries the notebooks, the profiles and the paper's numbers
(kvlib/_resources, copied from notebooks/ and params/ at build time), `kvlib init DIR` writes them out, and
`kvlib --version` prints the version. Built offline from a copy of the sources (no build isolation, no index)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import kvlib
from kvlib.engine import resources
from kvlib.pipeline import cli

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("kvlib", "notebooks", "params", "pyproject.toml", "setup.py", "MANIFEST.in", "README.md")


def repo_files(folder: str, pattern: str) -> set[str]:
    return {p.relative_to(ROOT).as_posix() for p in (ROOT / folder).glob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            src.mkdir(exist_ok=True)
            shutil.copy(path, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(tmp / "dist"), str(src)], check=True, cwd=tmp)
    (built,) = (tmp / "dist").glob("kvlib-*.whl")
    return built


def test_the_wheel_carries_notebooks_profiles_and_the_papers_numbers(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert wheel.name.startswith(f"kvlib-{kvlib.__version__}-")
    packaged = {n.removeprefix("kvlib/_resources/") for n in names if n.startswith("kvlib/_resources/")}
    assert packaged == repo_files("notebooks", "*.ipynb") | repo_files("params", "**/*")
    assert "params/paper_reference.yaml" in packaged and "params/paper-mistral/accelerate_fsdp.yaml" in packaged
    assert {"kvlib/engine/datasets.yaml", "kvlib/tasks/templates/openai_system.txt"} <= names
    assert "kvlib/engine/resources.py" in names and not any(n.startswith(("params/", "notebooks/")) for n in names)


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"kvlib {kvlib.__version__}"


def test_init_writes_the_notebooks_and_profiles_and_keeps_edits(tmp_path, capsys):
    assert cli.main(["init", str(tmp_path / "project")]) == 0
    project = tmp_path / "project"
    written = {p.relative_to(project).as_posix() for p in project.rglob("*") if p.is_file()}
    assert written == repo_files("notebooks", "*.ipynb") | repo_files("params", "**/*")
    assert "wrote" in capsys.readouterr().out
    edited = project / "params" / "quick" / "03_mdqa.yaml"
    edited.write_text("num_questions: 1\n")
    assert resources.init_project(project) == []  # nothing replaced without --force
    assert edited.read_text() == "num_questions: 1\n"
    assert Path("params/quick/03_mdqa.yaml") in resources.init_project(project, force=True)
    assert edited.read_text() == (ROOT / "params" / "quick" / "03_mdqa.yaml").read_text()


def test_reproduce_outside_a_project_says_to_init(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["reproduce", "--profile", "quick", "--dry-run"]) == 2
    assert "kvlib init ." in capsys.readouterr().err


@pytest.mark.slow
def test_an_installed_wheel_runs_outside_the_repository(wheel, tmp_path):
    """Installed into a folder of its own and run from a folder outside the checkout: --version, init, and a
    profile's dry run there (the notebooks, params and paper reference all come from the wheel)."""
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--target",
                    str(site), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(site), "HF_HUB_OFFLINE": "1"}

    def kvlib_cli(*args, cwd):
        return subprocess.run([sys.executable, "-m", "kvlib", *args], cwd=cwd, env=env, capture_output=True,
                              text=True)

    where = subprocess.run([sys.executable, "-c", "import kvlib.engine.resources as r; print(r.resource_root())"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where == str(site / "kvlib" / "_resources")
    assert kvlib_cli("--version", cwd=tmp_path).stdout.strip() == f"kvlib {kvlib.__version__}"
    assert kvlib_cli("init", "project", cwd=tmp_path).returncode == 0
    dry = kvlib_cli("reproduce", "--profile", "paper-mistral", "--dry-run", cwd=tmp_path / "project")
    assert dry.returncode == 0, dry.stderr
    assert "8 notebooks, params valid" in dry.stdout and "accelerate launch" in dry.stdout
    assert not (tmp_path / "project" / "results").exists()
