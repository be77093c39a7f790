"""The real notebooks: params for every profile validate, sources carry no outputs, and the `smoke`
profile executes every notebook end to end (so a broken notebook fails CI)."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from kvlib.pipeline import notebooks, plan, reproduce

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = plan.discover_notebooks(ROOT / "notebooks")
PROFILES = sorted(p.name for p in (ROOT / "params").iterdir() if p.is_dir())


@pytest.mark.parametrize("profile", PROFILES)
def test_every_notebook_has_valid_params_for_every_profile(profile, monkeypatch, tmp_path):
    """The runner's own planning (what `kvlib reproduce` checks before running anything) passes for
    every notebook of every profile."""
    assert NOTEBOOKS, "no notebooks found"
    assert {"smoke", "quick", "cpu"} <= set(PROFILES)
    monkeypatch.chdir(ROOT)  # params refer to each other relative to the repo root
    jobs = plan.plan_profile(profile, None, ROOT / "params", ROOT / "notebooks", tmp_path)
    assert sorted(job.name for job in jobs) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.startswith("paper-")])
def test_paper_profiles_dry_run_offline(profile, monkeypatch, tmp_path, capsys):
    """`kvlib reproduce --profile paper-* --dry-run` validates the paper's configurations without weights, an
    API key or the network, writes nothing, and says what each notebook's models need."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-dry-run-secret-0123456789")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from kvlib.pipeline import cli

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
def test_one_parameter_contract(name):
    """The parameters cell declares one mapping and the next cell turns it into params with one call: defaults
    live in the params class alone, never in the notebook."""
    import ast

    nb = json.loads(NOTEBOOKS[name].read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    params_cell = "".join(code[0]["source"])
    assert "parameters" in code[0]["metadata"].get("tags", [])
    assigned = [n.targets[0].id for n in ast.parse(params_cell).body if isinstance(n, ast.Assign)]
    assert assigned == [notebooks.INJECTED], f"the parameters cell declares {assigned}"
    assert f"P = notebooks.start(NAME, {notebooks.INJECTED}, globals())" in "".join(code[1]["source"])
    assert f'NAME = "{name}"' in "".join(code[1]["source"])


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_every_param_reaches_the_notebook(name):
    """A field of a notebook's params class that nothing reads after validation (the notebook as `P.<field>`, the
    pipeline functions it hands `P` to, or the class's own methods other than `validate`) would be checked and
    then silently ignored; a field the notebook does not support must be rejected by `validate` instead."""
    import ast
    import dataclasses
    import inspect
    import re
    import textwrap

    nb = json.loads(NOTEBOOKS[name].read_text())
    used = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    used += "\n".join(p.read_text() for p in (ROOT / "kvlib" / "pipeline").glob("*.py")  # functions taking P
                       if p.name != "notebooks.py")
    cls = notebooks.NOTEBOOKS[name]
    validate = ""
    for klass in cls.__mro__:
        if not klass.__module__.startswith("kvlib"):
            continue
        for node in ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body:
            if isinstance(node, ast.FunctionDef):
                if node.name == "validate":
                    validate += ast.unparse(node)
                else:
                    used += ast.unparse(node)
    unread = [f.name for f in dataclasses.fields(cls)
              if not re.search(rf"\b(P|self)\.{f.name}\b|['\"]{f.name}['\"]", used)
              and not re.search(rf"fail\(['\"]{f.name}['\"]", validate)]
    assert not unread, f"{name}: params never read after validation (and not rejected): {unread}"


def test_notebook_names_live_in_one_place():
    assert list(notebooks.NOTEBOOKS) == sorted(NOTEBOOKS), "kvlib.pipeline.notebooks.NOTEBOOKS vs notebooks/"


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
    # no absolute path of this machine in anything the run wrote: the checkout, the data directory, the Python
    # environment, the temp directory (where these results are), the kvlib model cache
    import sys
    import tempfile

    from conftest import find_absolute_paths
    from kvlib.engine.data import resolve_data_dir
    from kvlib.engine.models import cache_dir

    machine = (str(ROOT), str(resolve_data_dir()), sys.prefix, str(tmp_path), tempfile.gettempdir() + "/",
               str(cache_dir()))
    bad = {}
    for path in sorted((tmp_path / "smoke").rglob("*")):
        if path.is_file() and path.suffix != ".png":
            found = find_absolute_paths(path.read_bytes().decode("utf-8", "replace"), machine)
            if found:
                bad[path.relative_to(tmp_path).as_posix()] = sorted(set(found))[:3]
    assert not bad, f"absolute paths in rendered results: {bad}"
    check_rendered_reports(tmp_path / "smoke")


PROGRESS = re.compile(r"\d+%\|.*\||it/s\]|s/it\]|IProgress not found")


def check_rendered_reports(out_dir: Path) -> None:
    """What a reader of a rendered profile gets: reports without progress bars, the parameters once (a table
    after `start`; the parameters cells hidden in the HTML), code folded in the HTML but kept in the .ipynb,
    Markdown tables that render as tables, figures inline; every table also as LaTeX with caption and label;
    index.html headed by the claims figure, with each notebook's main figure linked to its report."""
    from nbconvert.filters.markdown_mistune import markdown2html_mistune

    for name in NOTEBOOKS:
        nb = json.loads((out_dir / f"{name}.ipynb").read_text())
        html = (out_dir / f"{name}.html").read_text()
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        outputs = [o for c in code for o in c.get("outputs", [])]
        stderr = "".join("".join(o["text"]) for o in outputs if o.get("name") == "stderr")
        assert not PROGRESS.search(stderr), (name, stderr[:500])
        assert not PROGRESS.search(html), name
        assert any("notebooks.start(" in "".join(c["source"]) for c in code)  # the .ipynb keeps the code
        assert '<details class="kvlib-code"><summary>code</summary>' in html and "kvlib_params =" not in html
        params = [c for c in code if "params_table(P)" in "".join(c["source"])]
        assert len(params) == 1, name
        shown = "".join(params[0]["outputs"][0]["data"]["text/markdown"])
        assert shown.startswith("| parameter") and "| profile " in shown and "| smoke " in shown
        for o in outputs:
            text = "".join(o.get("data", {}).get("text/markdown", ""))
            if "\n|" in text or text.startswith("|"):
                assert "<table>" in markdown2html_mistune(text), (name, text[:300])
        if any(o.endswith(".png") for o in json.loads((out_dir / "manifest.json").read_text())
               ["notebooks"][name]["outputs"]):
            assert any("image/png" in o.get("data", {}) for o in outputs), f"{name}: no figure in the report"
            assert "data:image/png;base64," in html
    for tex in sorted(out_dir.glob("*/*.tex")):
        text = tex.read_text()
        assert "\\caption{" in text and f"\\label{{tab:{tex.parent.name}-{tex.stem}}}" in text, tex
        assert not re.search(r"(?<![A-Za-z])nan(?![A-Za-z])", text), tex
    index = (out_dir / "index.html").read_text()
    assert (out_dir / "claims.png").read_bytes().startswith(b"\x89PNG")
    assert index.index('<img src="claims.png"') < index.index("<h2>Environment</h2>")
    assert '<a href="03_mdqa.html"><img src="03_mdqa/mdqa_by_position.png"' in index




@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_every_kvlib_name_a_notebook_uses_exists(name):
    """`module.attr` for every kvlib module a notebook imports: a renamed or moved function fails here, in seconds,
    instead of hours into a profile run."""
    import ast
    import importlib

    nb = json.loads(NOTEBOOKS[name].read_text())
    source = "\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code")
    modules = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvlib"):
            for alias in node.names:
                target = importlib.import_module(node.module)
                value = getattr(target, alias.name, None)
                if value is None:
                    value = importlib.import_module(f"{node.module}.{alias.name}")
                modules[alias.asname or alias.name] = value
    used = {(n.value.id, n.attr) for n in ast.walk(ast.parse(source))
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    missing = sorted(f"{alias}.{attr}" for alias, attr in used
                     if alias in modules and isinstance(modules[alias], type(json)) and not hasattr(modules[alias], attr))
    assert not missing, f"{name} uses names its kvlib modules do not have: {missing}"


@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_every_name_a_notebook_reads_is_defined(name):
    """Every name a notebook's code reads is imported, assigned or a builtin somewhere in it (a module used without
    its import, e.g. `runs.open_model`, fails here in seconds instead of in the middle of a profile run)."""
    import ast
    import builtins

    nb = json.loads(NOTEBOOKS[name].read_text())
    tree = ast.parse("\n".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"))
    defined = set(dir(builtins)) | {"display", "get_ipython", notebooks.INJECTED}  # IPython's own globals
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            defined |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
            defined.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            defined.add(node.name)
    read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    assert not read - defined, f"{name} reads names it never defines: {sorted(read - defined)}"


def test_params_table_shows_the_values_a_run_used(monkeypatch):
    """One row per parameter with every default filled in, nested values as JSON, and the results folder where
    the run publishes it, not its staging folder."""
    monkeypatch.chdir(ROOT)
    params = notebooks.start("03_mdqa", None)
    params.results_dir = f"results/smoke/{notebooks.STAGING}"
    table = notebooks.params_table(params).set_index("parameter")["value"]
    assert table["results_dir"] == "results/smoke" and table["profile"] == "quick"
    assert table["models"].splitlines()[0] == 'original: {"model": "smollm2-135m-instruct"}'  # one model a line
    assert table["settings"] == '["random", "retrieved"]'
    assert table["max_new_tokens"] == str(params.max_new_tokens)
    assert list(table.index) == [f.name for f in dataclasses.fields(params)]
