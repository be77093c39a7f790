"""`kvlib verify`: the comparison of regenerated with committed results (tables within a documented tolerance,
claims' verdicts, figures) on fixtures, and the command end to end on stand-in notebooks (no kernel)."""
from __future__ import annotations

import json
from pathlib import Path

import nbformat
import papermill
import pytest

from kvlib.engine.config import InputError
from kvlib.pipeline import cli, plan, verify
from test_faults import REGISTRY, build_repo, out_dir, snapshot

PROFILE = "tiny"


@pytest.fixture(autouse=True)
def registry(monkeypatch):
    monkeypatch.setattr(plan, "NOTEBOOKS", dict(REGISTRY))


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# ---------------------------------------------------------------------------------------------- tables


@pytest.mark.parametrize("then, now, status, describe", [
    ("a,b\nx,0.5\n", "a,b\nx,0.5\n", "identical", "identical"),
    ("a,b\nx,0.1\n", "a,b\nx,0.10000000000000002\n", "within tolerance",
     "equal within tolerance (largest absolute difference 1.39e-17)"),
    ("a,b\nx,100.0\n", "a,b\nx,100.00000001\n", "within tolerance", None),  # 1e-10 relative
    ("a,b\nx,nan\n", "a,b\nx,NaN\n", "within tolerance", None),
    ("a,b\nx,0.5\ny,2\n", "a,b\nx,0.5\ny,2.25\n", "differs",
     "differs (1 of 6 cells; largest absolute difference 0.25; first at row 2, column 'b': '2' then, '2.25' now)"),
    ("a,b\nx,1\n", "a,b\nz,1\n", "differs", "differs (1 of 4 cells; largest absolute difference 0; first at row 1, "
                                            "column 'a': 'x' then, 'z' now)"),
    ("a,b\nx,1\n", "a,b\nx,1\ny,2\n", "differs", "differs (4 of 4 cells; 2x2 cells then, 3x2 now)"),
    ("a,b\nx,1.0\n", "a,b\nx,1.000001\n", "differs", None),  # 1e-6 relative: outside 1e-9
    # a column added: the shared columns are compared by name
    ("a,b\nx,1\ny,2\n", "a,c,b\nx,q,1\ny,r,2\n", "columns changed",
     "columns changed (columns added now: c; the 2 shared columns: equal)"),
    ("a,b,d\nx,1,5\ny,2,6\n", "b,a\n1,x\n2.5,y\n", "columns changed",
     "columns changed (columns removed: d; the 2 shared columns: 1 of 6 cells differ, largest absolute difference "
     "0.5, first at row 2, column 'b': '2' then, '2.5' now)"),
    ("a,b\nx,1\n", "a,c\nx,1\ny,2\n", "differs", "differs (4 of 4 cells; 2x2 cells then, 3x2 now)"),  # rows differ
], ids=["identical", "float-noise", "relative", "nan", "value", "text", "shape", "outside-tolerance",
        "column-added", "column-removed-and-value", "columns-and-rows"])
def test_tables_are_compared_cell_by_cell_with_a_relative_tolerance(tmp_path, then, now, status, describe):
    result = verify.compare_tables("t.csv", write(tmp_path / "a.csv", then), write(tmp_path / "b.csv", now))
    assert result.status == status
    if describe is not None:
        assert result.describe() == describe


def test_a_table_missing_now_or_new_now(tmp_path):
    there = write(tmp_path / "a.csv", "a\n1\n")
    assert verify.compare_tables("t", there, tmp_path / "none.csv").status == "missing now"
    assert verify.compare_tables("t", tmp_path / "none.csv", there).status == "new now"


def test_a_notebook_compares_tables_claims_and_figures(tmp_path):
    then_dir, now_dir = tmp_path / "then", tmp_path / "now"
    for folder, value, verdict, png in ((then_dir, "0.5", "holds", b"png-1"), (now_dir, "0.75", "inconclusive",
                                                                                 b"png-2")):
        write(folder / "03_mdqa" / "acc.csv", f"model,acc\noriginal,{value}\n")
        write(folder / "03_mdqa" / "same.csv", "model,acc\noriginal,1\n")
        write(folder / "03_mdqa" / "fig.png", png)
    write(then_dir / "03_mdqa" / "gone.png", b"png")
    claims = lambda verdict: {"claims": [  # noqa: E731
        {"artifact": "fig5", "claim": "improves MDQA", "model": "finetuned", "verdict": verdict},
        {"artifact": "fig10", "claim": "does not improve", "model": "finetuned", "verdict": "inconclusive"}]}
    outputs = ["03_mdqa.ipynb", "03_mdqa/acc.csv", "03_mdqa/same.csv", "03_mdqa/fig.png"]
    then = {"status": "ok", "outputs": outputs + ["03_mdqa/gone.png"], "facts": claims("holds")}
    now = {"status": "ok", "outputs": outputs, "facts": claims("inconclusive")}
    result = verify.compare_notebook("03_mdqa", then_dir, now_dir, then, now, "notebook changed")
    assert [(t.name, t.status) for t in result.tables] == [("03_mdqa/acc.csv", "differs"),
                                                           ("03_mdqa/same.csv", "identical")]
    assert [(c["artifact"], c["then"], c["now"]) for c in result.claims] == [
        ("fig10", "inconclusive", "inconclusive"), ("fig5", "holds", "inconclusive")]
    assert result.figures == [("03_mdqa/fig.png", "regenerated, other bytes"), ("03_mdqa/gone.png", "not regenerated")]
    assert not result.matches
    report = verify.format_report(PROFILE, [result], "results/tiny", "results/.verify/tiny")
    assert "| 03_mdqa/acc.csv | differs (1 of 4 cells; largest absolute difference 0.25;" in report
    assert "| fig5 | improves MDQA | finetuned | holds | inconclusive (changed) |" in report
    assert "| 03_mdqa/gone.png | not regenerated |" in report
    assert "The committed result is stale (notebook changed since it ran)" in report
    assert "1e-12 + 1e-09 x max(|a|, |b|)" in report
    assert verify.summary_line([result]) == (
        "0 of 1 notebooks reproduce their committed results; tables: 1 identical, 0 within tolerance, 1 differ; "
        "claims: 1 same verdict, 1 changed; figures: 1 regenerated (0 byte-identical), 1 not regenerated")


# --------------------------------------------------------------------------------------- the command


def stand_in_notebooks(monkeypatch, value: float, verdict: str = "holds"):
    """papermill without a kernel: each notebook writes a table (its seed and `value`), a figure and a claim."""

    def execute(input_path, output_path, parameters, **kwargs):
        params, name = parameters["kvlib_params"], Path(input_path).stem
        folder = Path(kwargs["cwd"]) / params["results_dir"] / name
        write(folder / "table.csv", f"seed,value\n{params['seed']},{value}\n")
        write(folder / "figure.png", b"\x89PNG fixed bytes")
        write(folder / "facts.json", json.dumps({"claims": [
            {"artifact": "fig5", "claim": f"{name} claim", "model": "m", "verdict": verdict}]}))
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
            "print(results_dir)", outputs=[nbformat.v4.new_output("stream", text=params["results_dir"] + "\n")])])
        nbformat.write(nb, output_path)
        return nb

    monkeypatch.setattr(papermill, "execute_notebook", execute)


def verify_cli(root: Path, *extra: str) -> int:
    return cli.main(["verify", "--profile", PROFILE, "--results", str(root / "results"), "--params-dir",
                     str(root / "params"), "--notebooks", str(root / "notebooks"), *extra])


def test_verify_regenerates_compares_and_updates_only_when_asked(tmp_path, monkeypatch, capsys):
    root = build_repo(tmp_path / "repo")
    with pytest.raises(InputError, match="no committed results to verify; run `kvlib reproduce --profile tiny`"):
        verify.verify_profile(PROFILE, results_root=root / "results", params_root=root / "params",
                              notebooks_dir=root / "notebooks")
    stand_in_notebooks(monkeypatch, 0.5)
    assert cli.main(["reproduce", "--profile", PROFILE, "--results", str(root / "results"), "--params-dir",
                     str(root / "params"), "--notebooks", str(root / "notebooks")]) == 0
    committed = snapshot(out_dir(root))
    capsys.readouterr()

    assert verify_cli(root) == 0  # the same numbers again
    out = capsys.readouterr().out
    scratch = root / "results" / verify.SCRATCH / PROFILE
    report = (scratch / verify.REPORT_FILE).read_text()
    assert "2 of 2 notebooks reproduce their committed results; tables: 2 identical" in out
    assert "| 01_table/table.csv | identical |" in report and "| 01_table/figure.png | regenerated, identical bytes |" \
        in report
    assert snapshot(out_dir(root)) == committed

    stand_in_notebooks(monkeypatch, 0.75, verdict="inconclusive")  # the code now computes something else
    assert verify_cli(root, "--force") == 1
    out = capsys.readouterr().out
    assert "01_table: differs: 1 of 1 tables differ (e.g. 01_table/table.csv: differs (1 of 4 cells; largest " \
           "absolute difference 0.25" in out
    assert "claims changed verdict (e.g. fig5 m: holds -> inconclusive)" in out
    assert snapshot(out_dir(root)) == committed  # committed results change only with --update

    # the regenerated results (up to date: not run again) replace them; done as asked, so 0 (the report still says
    # what differed)
    assert verify_cli(root, "--update") == 0
    assert "committed results updated" in capsys.readouterr().out
    assert (out_dir(root) / "01_table" / "table.csv").read_text() == "seed,value\n1,0.75\n"
    executed = (out_dir(root) / "01_table.ipynb").read_text()
    assert "results/tiny/.staging" in executed and ".verify" not in executed  # paths name the committed folder
    manifest = json.loads((out_dir(root) / "manifest.json").read_text())
    entry = manifest["notebooks"]["01_table"]
    assert entry["facts"]["claims"][0]["verdict"] == "inconclusive"
    # every run with these params behind the result: the committed one, the first verify's, the forced one's
    assert entry["attempts"] == 3
    assert "../../params/tiny/01_table.yaml" in (out_dir(root) / "index.html").read_text()
    assert "../../../params/tiny/01_table.yaml" in (scratch / "index.html").read_text()  # links from the scratch
    assert verify_cli(root) == 0 and verify_cli(root, "--update") == 0
    assert json.loads((out_dir(root) / "manifest.json").read_text())["notebooks"]["01_table"]["attempts"] == 3


def test_update_replaces_nothing_when_the_run_again_fails(tmp_path, monkeypatch, capsys):
    root = build_repo(tmp_path / "repo")
    stand_in_notebooks(monkeypatch, 0.5)
    assert cli.main(["reproduce", "--profile", PROFILE, "--results", str(root / "results"), "--params-dir",
                     str(root / "params"), "--notebooks", str(root / "notebooks")]) == 0
    committed = snapshot(out_dir(root))

    def fail(*args, **kwargs):
        raise RuntimeError("the kernel died")

    monkeypatch.setattr(papermill, "execute_notebook", fail)
    capsys.readouterr()
    assert verify_cli(root, "--force", "--update") == 1
    assert "committed results not updated: the run again did not finish" in capsys.readouterr().out
    assert snapshot(out_dir(root)) == committed


def test_published_copies_name_the_committed_folder_not_the_scratch(tmp_path):
    repo = tmp_path / "repo"
    scratch, committed = repo / "results" / verify.SCRATCH / "tiny", repo / "results" / "tiny"
    (scratch / "01_table").mkdir(parents=True)
    committed.mkdir(parents=True)
    text = ("results_dir: results/.verify/tiny\n| results/.verify/tiny |\nfile results/.verify/tiny/01_table/t.csv\n"
            "other results/.verify/tinyx stays\n")
    for suffix in (".ipynb", ".html"):
        (scratch / f"01_table{suffix}").write_text(text)
    (scratch / "01_table" / "facts.json").write_text(text)
    verify._copy_for_publish(scratch, committed, "01_table", repo)
    expected = ("results_dir: results/tiny\n| results/tiny |\nfile results/tiny/01_table/t.csv\n"
                "other results/.verify/tinyx stays\n")
    assert (committed / ".01_table.running.ipynb").read_text() == expected
    assert (committed / ".01_table.running.html").read_text() == expected
    assert (committed / ".staging" / "01_table" / "facts.json").read_text() == expected
