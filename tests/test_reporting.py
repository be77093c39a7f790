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


def test_save_table_latex_is_citable(tmp_path):
    """Every table is also LaTeX a paper can \\input: a caption and a label (defaults from the stem), one fixed
    precision per float column, empty cells for missing values, special characters escaped."""
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"model": ["base", "ft_%", None], "accuracy": [0.5, 0.123456, float("nan")],
                       "delta_points": [12.3456, -1.5, 0.0], "n": [10.0, 20.0, float("nan")],
                       "note": ["a|b", float("nan"), "two\nlines"]})
    reporting.save_table(df, tmp_path / "05_general_benchmarks" / "claims")
    tex = (tmp_path / "05_general_benchmarks" / "claims.tex").read_text()
    assert r"\label{tab:05_general_benchmarks-claims}" in tex
    assert r"\caption{The paper's claims" in tex and r"05\_general\_benchmarks" in tex  # escaped
    assert "nan" not in tex
    body = tex.split(r"\midrule", 1)[1].split(r"\bottomrule", 1)[0].strip().splitlines()
    assert body[0].split(" & ")[:4] == ["base", "0.5000", "12.35", "10"]  # per column: 4, 2, 0 decimals
    assert body[1].split(" & ")[:4] == [r"ft\_\%", "0.1235", "-1.50", "20"]
    assert body[2].split(" & ")[:4] == ["", "", "0.00", ""]  # missing values are empty cells
    assert len(body) == 3  # a line break inside a cell does not break the row
    reporting.save_table(df, tmp_path / "t" / "acc", caption="Accuracy 95% by model", label="tab:acc",
                         precision={"accuracy": 1})
    tex = (tmp_path / "t" / "acc.tex").read_text()
    assert r"\caption{Accuracy 95\% by model}" in tex and r"\label{tab:acc}" in tex and " 0.5 " in tex
    assert reporting.default_caption(tmp_path / "03_mdqa" / "mdqa_accuracy") == "Mdqa accuracy (notebook 03_mdqa)."
    with pytest.raises(ValueError, match="precision"):
        reporting.save_table(df, tmp_path / "t" / "acc", precision={"acuracy": 1})


def test_markdown_tables_render_as_tables():
    """A `|` inside a cell (e.g. MMLU's scored choices ' A' | ' B') is escaped and line breaks become <br>, so
    the Markdown table is a table in nbconvert's HTML, not raw `|---|` text; missing values are empty."""
    pd = pytest.importorskip("pandas")
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    df = pd.DataFrame({"benchmark": ["MMLU", "GSM8K"], "prompt": ["[' A' | ' B']", "Q: x\nA:"],
                       "acc": [0.25, float("nan")]})
    text = reporting.markdown_table(df)
    assert r"' A' \| ' B'" in text and "Q: x<br>A:" in text and "nan" not in text
    html = markdown2html_mistune(text)
    assert html.count("<tr>") == 3 and "<td>[' A' | ' B']</td>" in html.replace(' style="text-align:left"', "")
    assert reporting.show(df).data == text


def test_clean_outputs_strips_progress_bars_and_keeps_other_stderr():
    nbformat = pytest.importorskip("nbformat")
    from kvlib.pipeline.reproduce import _clean_outputs

    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("load()")
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stderr", text=(
            "/venv/lib/python3.11/site-packages/tqdm/auto.py:21: TqdmWarning: IProgress not found. Please update "
            "jupyter and ipywidgets. See https://ipywidgets.readthedocs.io/en/stable/user_install.html\n"
            "  from .autonotebook import tqdm as notebook_tqdm\n")),
        nbformat.v4.new_output("stream", name="stderr", text="\rLoading weights:  30%|██▉       | 81/272 [00:00<00:00, 770.52it/s]"),
        nbformat.v4.new_output("stream", name="stderr", text="\rLoading weights: 100%|██████████| 272/272 [00:00<00:00, 754.39it/s]"),
        nbformat.v4.new_output("stream", name="stderr", text="\n"),
        nbformat.v4.new_output("stream", name="stderr", text="\x1b[A"),  # tqdm's cursor-up after a nested bar
        nbformat.v4.new_output("stream", name="stdout", text="original [hits 114]\n"),
        nbformat.v4.new_output("stream", name="stderr", text="Map: 100%|##########| 3/3 [00:00<00:00, 9.1 examples/s]\n"
                                                             "\x1b[AUserWarning: something a reader should see\n"),
        nbformat.v4.new_output("display_data", data={"application/vnd.jupyter.widget-view+json": {"model_id": "x"},
                                                     "text/plain": "HBox()"}),
    ]
    nb.cells = [cell]
    nb.metadata["widgets"] = {"state": {}}
    _clean_outputs(nb)
    assert [(o["output_type"], o.get("name"), o.get("text")) for o in nb.cells[0].outputs] == [
        ("stream", "stdout", "original [hits 114]\n"),
        ("stream", "stderr", "UserWarning: something a reader should see\n")]
    assert "widgets" not in nb.metadata


def test_citation_metadata_matches_the_package():
    """CITATION.cff, LICENSE and the README's BibTeX agree with the package: its version and its MIT licence."""
    from pathlib import Path

    import yaml

    import kvlib

    root = Path(__file__).resolve().parents[1]
    cff = yaml.safe_load((root / "CITATION.cff").read_text())
    assert cff["version"] == kvlib.__version__ and cff["license"] == "MIT" and cff["cff-version"] == "1.2.0"
    assert cff["references"][0]["identifiers"][0]["value"] == "arXiv:2406.19292"
    assert 'license = { text = "MIT" }' in (root / "pyproject.toml").read_text()
    assert (root / "LICENSE").read_text().startswith("MIT License")
    readme = (root / "README.md").read_text()
    assert f"version = {{{kvlib.__version__}}}" in readme and "eprint        = {2406.19292}" in readme
