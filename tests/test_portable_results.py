"""No committed result holds an absolute path of the machine that produced it (a home folder, a checkout, a data
directory, a virtual environment): a clone elsewhere must read, verify and re-run them as they are."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import find_absolute_paths
from kvlib.pipeline import manifest as kv_manifest

ROOT = Path(__file__).resolve().parents[1]
BINARY = (".png", ".jpg", ".pdf", ".sqlite", ".gz", ".parquet")


def committed_results() -> list[Path]:
    proc = subprocess.run(["git", "ls-files", "-z", "results"], cwd=ROOT, capture_output=True)
    if proc.returncode != 0:
        pytest.skip("not a git checkout")
    return [ROOT / p for p in proc.stdout.decode().split("\0") if p and not p.endswith(BINARY)]


def test_committed_results_hold_no_absolute_path():
    files = committed_results()
    machine = (str(ROOT), sys.prefix)
    bad = {}
    for path in files:
        found = find_absolute_paths(path.read_bytes().decode("utf-8", "replace"), machine)
        if found:
            bad[path.relative_to(ROOT).as_posix()] = sorted(set(found))[:3]
    assert not bad, f"absolute paths in committed results: {bad}"


def test_portable_text_rewrites_machine_paths_and_nothing_else(tmp_path, monkeypatch):
    repo, data = tmp_path / "checkout", tmp_path / "data"
    (repo / "results").mkdir(parents=True)
    data.mkdir()
    monkeypatch.setenv("KVLIB_DATA_DIR", str(data))
    site = kv_manifest.machine_paths(repo)
    site_packages = next(prefix for prefix, name in site if name == "<site-packages>")
    text = (f"PosixPath('{repo}/results/quick/x.png') {repo} {repo}-other/a {data}/mmlu/test.csv "
            f"{site_packages}/tqdm/auto.py:21: TqdmWarning 0.123456789 {tmp_path}/elsewhere/file")
    out = kv_manifest.portable_text(text, repo)
    assert out.startswith("PosixPath('results/quick/x.png') . ")
    assert "checkout-other/a" in out  # another folder whose name starts the same: not made relative
    assert "$KVLIB_DATA_DIR/mmlu/test.csv" in out and "<site-packages>/tqdm/auto.py:21" in out
    assert "0.123456789" in out
    assert find_absolute_paths(out, (str(repo), str(data), site_packages, str(tmp_path))) == []  # `<tmp>/...`
    assert kv_manifest.portable_text(out, repo) == out  # idempotent


def test_committed_results_never_name_the_verify_scratch_folder():
    """`kvlib verify --update` publishes results regenerated in results/.verify/<profile>/: every mention of that
    scratch folder (the injected results_dir included) must name the committed folder instead."""
    bad = [p.relative_to(ROOT).as_posix() for p in committed_results()
           if b"results/.verify" in p.read_bytes()]
    assert not bad, f"committed results naming the verify scratch folder: {bad[:5]}"
