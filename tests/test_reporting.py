"""Report helpers: deterministic tables and figures, input recording."""
from __future__ import annotations

import hashlib
import json

import pytest

from kvlib.report import tables as reporting
from kvlib.pipeline import manifest
from kvlib.engine import io as kvio


def test_notebook_output_dir_creates_and_rejects_paths(tmp_path):
    out = reporting.notebook_output_dir(tmp_path / "results", "03_eval")
    assert out == tmp_path / "results" / "03_eval" and out.is_dir()
    with pytest.raises(ValueError, match="plain directory name"):
        reporting.notebook_output_dir(tmp_path, "../escape")


def test_save_table_writes_csv_markdown_latex(tmp_path):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"model": ["base", "ft_%"], "accuracy": [0.123456789, 1 / 3], "n": [10, 20]})
    paths = reporting.save_table(df, tmp_path / "tables" / "acc")
    assert [p.name for p in paths] == ["acc.csv", "acc.md", "acc.tex"]
    csv = (tmp_path / "tables" / "acc.csv").read_text()
    assert csv == "model,accuracy,n\nbase,0.123457,10\nft_%,0.333333,20\n"
    md = (tmp_path / "tables" / "acc.md").read_text()
    assert "0.1235" in md and "0.3333" in md and md.startswith("| model")
    tex = (tmp_path / "tables" / "acc.tex").read_text()
    assert r"ft\_\%" in tex and "0.1235" in tex and r"\toprule" in tex
    before = [p.read_bytes() for p in paths]
    reporting.save_table(df, tmp_path / "tables" / "acc")
    assert [p.read_bytes() for p in paths] == before


def test_save_figure_is_byte_identical_across_saves(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [0.2, 0.5, 0.4])
    a = reporting.save_figure(fig, tmp_path / "a.png")
    b = reporting.save_figure(fig, tmp_path / "sub" / "b.png")
    plt.close(fig)
    assert a.read_bytes() == b.read_bytes()
    assert b"Matplotlib" not in a.read_bytes()  # no version stamp that would change with upgrades
    with pytest.raises(ValueError, match="PNG"):
        reporting.save_figure(fig, tmp_path / "c.pdf")


def test_record_inputs_hashes_files_and_directories_and_merges(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "ds").mkdir(parents=True)
    (tmp_path / "data" / "ds" / "train.jsonl").write_text("a\n")
    (tmp_path / "data" / "ds" / "eval.jsonl").write_text("b\n")
    (tmp_path / "data" / "extra.txt").write_text("c\n")
    results = tmp_path / "results"

    manifest.record_inputs(results, "02_x", ["data/ds"])
    entries = manifest.record_inputs(results, "02_x", [tmp_path / "data" / "extra.txt", "data/ds/eval.jsonl"])
    assert [e["path"] for e in entries] == ["data/ds/eval.jsonl", "data/ds/train.jsonl", "data/extra.txt"]
    assert entries[2] == {"path": "data/extra.txt", "sha256": hashlib.sha256(b"c\n").hexdigest(), "bytes": 2}
    assert json.loads((results / "02_x" / "inputs.json").read_text()) == entries
    assert manifest.read_inputs(results, "02_x") == entries
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        manifest.record_inputs(results, "02_x", ["data/missing.txt"])


def test_file_sha256_notices_changed_content(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    assert kvio.file_sha256(f) == hashlib.sha256(b"one").hexdigest()
    f.write_bytes(b"two!")  # different size, so the (path, size, mtime) cache key changes
    assert kvio.file_sha256(f) == hashlib.sha256(b"two!").hexdigest()
