"""`kvlib verify`: run a profile again into a scratch results folder and compare with its committed results.

    results/<profile>/ (committed)  vs  results/.verify/<profile>/ (regenerated now, git-ignored)

The scratch run is an ordinary `kvlib reproduce` into another results folder (`run_profile`), so it validates,
checks its data, locks its folder, resumes when interrupted and skips what it already regenerated. It uses the
profile's params as they are, and with them what `runs/` holds on this machine: generated datasets, trained
models and cached answers are reused when present (a fresh clone has none, so everything is recomputed; move
`runs/` aside to force that elsewhere). The comparison, per notebook:

- tables (every CSV): identical bytes, equal within the tolerance (numbers: |a - b| <= ABS_TOL + REL_TOL *
  max(|a|, |b|); text cells exactly), or different, with the largest absolute difference and the first cell
  that differs;
- claims (the verdicts the notebook recorded, `facts.claims`): the verdict then and now;
- figures (every PNG): regenerated with identical bytes, regenerated with other bytes (a figure's pixels follow
  its table), or not regenerated.

The report is printed short and written in full as Markdown beside the scratch results
(`results/.verify/<profile>/verify.md`). Committed results change only with `update=True` (`--update`): then the
regenerated notebooks replace them, each in one journaled step (kvlib.pipeline.reproduce.publish).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvlib.engine.config import InputError
from kvlib.engine.io import atomic_write_text
from kvlib.pipeline.manifest import (
    MANIFEST_FILE,
    carry_over_cost,
    changed_since_run,
    load_manifest_entries,
    repo_relative,
)
from kvlib.pipeline.notebooks import STAGING
from kvlib.pipeline.repro_map import write_results_record
from kvlib.pipeline.reproduce import one_run_per_folder, publish, recover, run_profile

SCRATCH = ".verify"  # results/.verify/<profile>/: where `kvlib verify` regenerates a profile (git-ignored)
REPORT_FILE = "verify.md"
REL_TOL = 1e-9  # two numbers in a table are equal when |a - b| <= ABS_TOL + REL_TOL * max(|a|, |b|)
ABS_TOL = 1e-12
TEXT_SUFFIXES = (".ipynb", ".html", ".md", ".tex", ".json", ".csv", ".txt")


# ------------------------------------------------------------------------------------------ comparing


@dataclass
class TableComparison:
    name: str  # path relative to the results folder
    status: str  # identical | within tolerance | columns changed | differs | missing now | new now
    max_abs_diff: float | None = None
    cells: int = 0
    cells_differing: int = 0
    first: str = ""  # where it first differs

    def describe(self) -> str:
        if self.status == "identical":
            return "identical"
        if self.status == "within tolerance":
            return f"equal within tolerance (largest absolute difference {self.max_abs_diff:.3g})"
        if self.status == "differs":
            largest = "" if self.max_abs_diff is None else f"; largest absolute difference {self.max_abs_diff:.6g}"
            return f"differs ({self.cells_differing} of {self.cells} cells{largest}; {self.first})"
        if self.status == "columns changed":
            return f"columns changed ({self.first})"
        return self.status


@dataclass
class NotebookComparison:
    name: str
    status_then: str
    status_now: str
    stale_then: str | None = None  # the committed result came from an earlier params or notebook version
    tables: list[TableComparison] = field(default_factory=list)
    claims: list[dict] = field(default_factory=list)  # {artifact, claim, model, then, now}
    figures: list[tuple[str, str]] = field(default_factory=list)  # (path, what happened)

    @property
    def matches(self) -> bool:
        return (self.status_now == "ok" and all(t.status in ("identical", "within tolerance") for t in self.tables)
                and all(c["then"] == c["now"] for c in self.claims)
                and all(f != "not regenerated" for _, f in self.figures))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return abs(a - b) <= ABS_TOL + REL_TOL * max(abs(a), abs(b))


def _compare_cells(a: list[list[str]], b: list[list[str]], header: list[str]) -> tuple[int, float, str]:
    """(cells differing beyond the tolerance, largest absolute numeric difference, where it first differs) of two
    tables of the same shape; `header` names the columns (row 0 of both)."""
    largest, differing, first = 0.0, 0, ""
    for i, (row_a, row_b) in enumerate(zip(a, b)):
        for j, (x, y) in enumerate(zip(row_a, row_b)):
            if x == y:
                continue
            fx, fy = _number(x), _number(y)
            if fx is not None and fy is not None:
                if not (math.isnan(fx) or math.isnan(fy) or math.isinf(fx) or math.isinf(fy)):
                    largest = max(largest, abs(fx - fy))
                if _close(fx, fy):
                    continue
            differing += 1
            if not first:
                column = header[j] if i > 0 and j < len(header) else str(j + 1)
                first = f"first at row {i}, column {column!r}: {x!r} then, {y!r} now"
    return differing, largest, first


def _shared_columns(a: list[list[str]], b: list[list[str]]) -> tuple[list[list[str]], list[list[str]], str] | None:
    """Both tables cut to the columns they share, in the committed order, and a note of the columns added and
    removed; None when the header is not a set of distinct names or the row counts differ (nothing to align)."""
    head_a, head_b = a[0], b[0]
    if len(a) != len(b) or len(set(head_a)) != len(head_a) or len(set(head_b)) != len(head_b):
        return None
    shared = [c for c in head_a if c in head_b]
    if not shared:
        return None
    ia, ib = [head_a.index(c) for c in shared], [head_b.index(c) for c in shared]
    if any(len(r) != len(head_a) for r in a) or any(len(r) != len(head_b) for r in b):
        return None
    added, removed = [c for c in head_b if c not in head_a], [c for c in head_a if c not in head_b]
    note = "; ".join(part for part in (f"columns added now: {', '.join(added)}" if added else "",
                                       f"columns removed: {', '.join(removed)}" if removed else "") if part)
    return [[r[i] for i in ia] for r in a], [[r[i] for i in ib] for r in b], note or "columns reordered"


def compare_tables(name: str, then: Path, now: Path) -> TableComparison:
    """One CSV of the committed results (`then`) against the regenerated one (`now`). Tables whose columns changed
    (added, removed, reordered) but whose rows line up are compared on their shared columns ("columns changed")."""
    if not now.is_file():
        return TableComparison(name, "missing now")
    if not then.is_file():
        return TableComparison(name, "new now")
    a_bytes, b_bytes = then.read_bytes(), now.read_bytes()
    a = list(csv.reader(io.StringIO(a_bytes.decode("utf-8"))))
    b = list(csv.reader(io.StringIO(b_bytes.decode("utf-8"))))
    cells = sum(len(r) for r in a)
    if a_bytes == b_bytes:
        return TableComparison(name, "identical", 0.0, cells)
    shape_a, shape_b = (len(a), max(map(len, a), default=0)), (len(b), max(map(len, b), default=0))
    if a and b and a[0] != b[0]:
        shared = _shared_columns(a, b)
        if shared is not None:
            sa, sb, note = shared
            differing, largest, first = _compare_cells(sa, sb, sa[0])
            values = (f"the {len(sa[0])} shared columns: " + ("equal" if not differing else
                      f"{differing} of {sum(len(r) for r in sa)} cells differ, largest absolute difference "
                      f"{largest:.6g}, {first}"))
            return TableComparison(name, "columns changed", largest, cells, differing, f"{note}; {values}")
    if shape_a != shape_b:
        return TableComparison(name, "differs", None, cells, cells,
                               f"{shape_a[0]}x{shape_a[1]} cells then, {shape_b[0]}x{shape_b[1]} now")
    differing, largest, first = _compare_cells(a, b, a[0] if a else [])
    if differing:
        return TableComparison(name, "differs", largest, cells, differing, first)
    return TableComparison(name, "within tolerance", largest, cells)


def _claims(entry: Mapping[str, Any] | None) -> dict[tuple, str]:
    claims = ((entry or {}).get("facts") or {}).get("claims") or []
    return {(c.get("artifact"), c.get("claim"), c.get("model")): c.get("verdict") for c in claims}


def _outputs(entry: Mapping[str, Any] | None, suffix: str) -> set[str]:
    return {o for o in (entry or {}).get("outputs", []) if o.endswith(suffix)}


def compare_notebook(name: str, then_dir: Path, now_dir: Path, then: Mapping[str, Any] | None,
                     now: Mapping[str, Any] | None, stale_then: str | None = None) -> NotebookComparison:
    result = NotebookComparison(name, (then or {}).get("status", "absent"), (now or {}).get("status", "not run"),
                                stale_then)
    for table in sorted(_outputs(then, ".csv") | _outputs(now, ".csv")):
        result.tables.append(compare_tables(table, then_dir / table, now_dir / table))
    claims_then, claims_now = _claims(then), _claims(now)
    for key in sorted(claims_then.keys() | claims_now.keys(), key=lambda k: tuple(str(x) for x in k)):
        result.claims.append({"artifact": key[0], "claim": key[1], "model": key[2],
                              "then": claims_then.get(key, "-"), "now": claims_now.get(key, "-")})
    for figure in sorted(_outputs(then, ".png") | _outputs(now, ".png")):
        a, b = then_dir / figure, now_dir / figure
        if not b.is_file():
            what = "not regenerated"
        elif not a.is_file():
            what = "new now"
        else:
            what = "regenerated, identical bytes" if a.read_bytes() == b.read_bytes() else "regenerated, other bytes"
        result.figures.append((figure, what))
    return result


def compare_results(then_dir: Path, now_dir: Path, names: Sequence[str] | None = None,
                    stale: Mapping[str, str] | None = None) -> list[NotebookComparison]:
    """Every notebook of the committed results folder `then_dir` (or the `names` given) against `now_dir`."""
    then_entries, now_entries = load_manifest_entries(Path(then_dir)), load_manifest_entries(Path(now_dir))
    names = sorted(names if names is not None else then_entries.keys() | now_entries.keys())
    return [compare_notebook(n, Path(then_dir), Path(now_dir), then_entries.get(n), now_entries.get(n),
                             (stale or {}).get(n)) for n in names]


# -------------------------------------------------------------------------------------------- reporting


def _counts(results: Sequence[NotebookComparison]) -> dict[str, int]:
    tables = [t for r in results for t in r.tables]
    claims = [c for r in results for c in r.claims]
    figures = [f for r in results for _, f in r.figures]
    return {
        "notebooks": len(results), "notebooks matching": sum(r.matches for r in results),
        "tables identical": sum(t.status == "identical" for t in tables),
        "tables within tolerance": sum(t.status == "within tolerance" for t in tables),
        "tables differing": sum(t.status not in ("identical", "within tolerance") for t in tables),
        "tables differing only by columns": sum(t.status == "columns changed" and not t.cells_differing
                                                for t in tables),
        "claims same verdict": sum(c["then"] == c["now"] for c in claims),
        "claims changed": sum(c["then"] != c["now"] for c in claims),
        "figures regenerated": sum(f.startswith("regenerated") for f in figures),
        "figures identical": sum(f == "regenerated, identical bytes" for f in figures),
        "figures not regenerated": sum(f == "not regenerated" for f in figures),
    }


def summary_line(results: Sequence[NotebookComparison]) -> str:
    c = _counts(results)
    by_columns = (f" ({c['tables differing only by columns']} of them only by added or removed columns, their shared "
                  f"columns equal)" if c["tables differing only by columns"] else "")
    return (f"{c['notebooks matching']} of {c['notebooks']} notebooks reproduce their committed results; tables: "
            f"{c['tables identical']} identical, {c['tables within tolerance']} within tolerance, "
            f"{c['tables differing']} differ{by_columns}; claims: {c['claims same verdict']} same verdict, {c['claims changed']} "
            f"changed; figures: {c['figures regenerated']} regenerated ({c['figures identical']} byte-identical), "
            f"{c['figures not regenerated']} not regenerated")


def _cell(text: Any) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def format_report(profile: str, results: Sequence[NotebookComparison], then_dir: str, now_dir: str,
                  then_header: Mapping[str, Any] | None = None, now_header: Mapping[str, Any] | None = None) -> str:
    """The full reproduction report (Markdown)."""

    def commit(header: Mapping[str, Any] | None) -> str:
        git = (header or {}).get("git") or {}
        return (git.get("commit") or "no commit")[:12] + (" (uncommitted changes)" if git.get("dirty") else "")

    lines = [f"# Reproduction report: profile `{profile}`", "",
             f"Committed results `{then_dir}` (commit {commit(then_header)}) against the same profile run again "
             f"into `{now_dir}` (commit {commit(now_header)}), by `kvlib verify --profile {profile}`.", "",
             f"Tables are compared cell by cell: numbers are equal when |a - b| <= {ABS_TOL:g} + {REL_TOL:g} x "
             f"max(|a|, |b|), text cells must match exactly. Claims compare the verdict each notebook recorded. "
             f"Figures are compared byte for byte (a figure whose table matches may still differ in its bytes). "
             f"The run again reused the datasets, trained models and cached answers under `runs/` that this "
             f"machine had.", "",
             f"**{summary_line(results)}.**", ""]
    for r in results:
        head = f"## {r.name}: {'reproduces' if r.matches else 'differs'} (status then {r.status_then}, now {r.status_now})"
        lines += [head, ""]
        if r.stale_then:
            lines += [f"The committed result is stale ({r.stale_then} since it ran)"
                      + (", and still reproduces." if r.matches else ": differences are expected."), ""]
        if r.tables:
            lines += ["| table | comparison |", "|---|---|"]
            lines += [f"| {_cell(t.name)} | {_cell(t.describe())} |" for t in r.tables] + [""]
        if r.claims:
            lines += ["| artifact | claim | model | verdict then | verdict now |", "|---|---|---|---|---|"]
            lines += [f"| {_cell(c['artifact'])} | {_cell(c['claim'])} | {_cell(c['model'])} | {_cell(c['then'])} | "
                      f"{_cell(c['now'])}{'' if c['then'] == c['now'] else ' (changed)'} |" for c in r.claims] + [""]
        if r.figures:
            lines += ["| figure | comparison |", "|---|---|"]
            lines += [f"| {_cell(f)} | {_cell(what)} |" for f, what in r.figures] + [""]
    return "\n".join(lines).rstrip() + "\n"


def print_summary(results: Sequence[NotebookComparison], report: Path) -> None:
    for r in results:
        tables = [t for t in r.tables if t.status not in ("identical", "within tolerance")]
        claims = [c for c in r.claims if c["then"] != c["now"]]
        detail = []
        if tables:
            detail.append(f"{len(tables)} of {len(r.tables)} tables differ (e.g. {tables[0].name}: "
                          f"{tables[0].describe()})")
        if claims:
            detail.append(f"{len(claims)} claims changed verdict (e.g. {claims[0]['artifact']} {claims[0]['model']}: "
                          f"{claims[0]['then']} -> {claims[0]['now']})")
        if r.status_now != "ok":
            detail.append(f"status now {r.status_now}")
        stale = f" [committed result stale: {r.stale_then}]" if r.stale_then else ""
        print(f"  {r.name}: {'reproduces' if r.matches else 'differs'}{stale}"
              + (": " + "; ".join(detail) if detail else ""), flush=True)
    print(f"kvlib verify: {summary_line(results)}; report: {report}", flush=True)


# -------------------------------------------------------------------------------------------- the command


def _copy_for_publish(scratch: Path, committed: Path, name: str, repo_root: Path) -> None:
    """Stage notebook `name` of the scratch results in the committed folder the way `run_job` stages a result
    (its folder under .staging/, the notebook and HTML under their running names), with paths that named the
    scratch folder naming the committed one."""
    # the scratch folder's name, wherever it stands as a whole path component ("results/.verify/quick/x.csv",
    # or the bare folder in the params table), becomes the committed folder's
    old = re.compile(re.escape(repo_relative(scratch, repo_root)) + r"(?![\w.-])")
    new = repo_relative(committed, repo_root)
    staging = committed / STAGING / name
    shutil.rmtree(staging, ignore_errors=True)
    if (scratch / name).is_dir():
        shutil.copytree(scratch / name, staging)
    else:
        staging.mkdir(parents=True)
    for suffix in (".ipynb", ".html"):
        text = old.sub(new, (scratch / f"{name}{suffix}").read_bytes().decode("utf-8"))
        atomic_write_text(committed / f".{name}.running{suffix}", text)
    for path in staging.rglob("*"):
        if path.is_file() and path.suffix in TEXT_SUFFIXES:
            text = path.read_bytes().decode("utf-8", "surrogateescape")
            if old.search(text):
                path.write_bytes(old.sub(new, text).encode("utf-8", "surrogateescape"))


def update_committed(profile: str, scratch: Path, committed: Path, names: Sequence[str], params_root: Path,
                     notebooks_dir: Path) -> list[str]:
    """Replace the committed results of notebooks `names` with the regenerated ones (each in one journaled
    step), under the committed folder's lock. Returns the names updated. A regenerated result with the params of
    the committed one carries its cost (kvlib.pipeline.manifest.carry_over_cost): a run again fed by cached
    answers does not make the results look cheap."""
    repo_root = Path(notebooks_dir).resolve().parent
    header = {k: v for k, v in json.loads((scratch / MANIFEST_FILE).read_text(encoding="utf-8")).items()
              if k != "notebooks"}
    scratch_entries = load_manifest_entries(scratch)
    done = []
    with one_run_per_folder(committed, f"verify --profile {profile} --update"):
        recover(committed, params_root, notebooks_dir)
        for name in names:
            entry = scratch_entries.get(name)
            if not entry or entry.get("status") != "ok":
                continue
            entries = load_manifest_entries(committed)
            previous = entries.get(name) or {}
            if (previous.get("started"), previous.get("finished")) == (entry.get("started"), entry.get("finished")):
                continue  # this regenerated result is the committed one already (an earlier --update)
            _copy_for_publish(scratch, committed, name, repo_root)
            entry = dict(entry)
            carry_over_cost(entry, entries.get(name))
            entries[name] = entry

            def commit(entries: dict = entries) -> None:
                write_results_record(committed, header, entries, params_root, notebooks_dir)

            publish(committed, name, entry, commit)
            done.append(name)
    return done


def verify_profile(profile: str, only: list[str] | None = None, results_root: Path = Path("results"),
                   params_root: Path = Path("params"), notebooks_dir: Path = Path("notebooks"), force: bool = False,
                   update: bool = False, lock: bool = False) -> int:
    """Run `profile` again into `results_root/.verify/<profile>/` and compare it with the committed
    `results_root/<profile>/` (see the module docstring). Returns 0 when every selected notebook reproduces its
    committed results (tables within tolerance, same verdicts, figures regenerated), 1 when something differs or
    a notebook failed, 2 when the run could not start (missing data). `force`: regenerate even what an earlier
    verify already regenerated with the same params, code and inputs. `update`: then replace the committed
    results of the notebooks that ran with the regenerated ones; 0 once they are replaced (the report still says
    what differed), since what was asked is done, 1 when the run did not finish and nothing was replaced."""
    results_root, params_root, notebooks_dir = Path(results_root), Path(params_root), Path(notebooks_dir)
    committed = (results_root / profile).resolve()
    if not (committed / MANIFEST_FILE).is_file():
        raise InputError(f"{committed / MANIFEST_FILE}: no committed results to verify; run `kvlib reproduce "
                         f"--profile {profile}` to produce them")
    scratch_root = results_root / SCRATCH
    scratch = (scratch_root / profile).resolve()
    print(f"kvlib verify: running profile {profile} again into {scratch}", flush=True)
    # verifying re-runs the committed configuration: the pre-registered power is checked when results are made
    rc = run_profile(profile, only, scratch_root, params_root, notebooks_dir, force=force, lock=lock,
                     allow_underpowered=True)
    if rc == 2:
        return 2
    names = only or None
    if names is not None:
        names = [Path(n).name.removesuffix(".ipynb") for n in names]
    stale = changed_since_run(profile, load_manifest_entries(committed), params_root, notebooks_dir)
    results = compare_results(committed, scratch, names, stale)
    repo_root = notebooks_dir.resolve().parent
    headers = []
    for folder in (committed, scratch):
        try:
            headers.append(json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8")))
        except (OSError, ValueError):
            headers.append({})
    report = scratch / REPORT_FILE
    atomic_write_text(report, format_report(profile, results, repo_relative(committed, repo_root),
                                            repo_relative(scratch, repo_root), *headers))
    print_summary(results, Path(os.path.relpath(report)) if report.is_relative_to(Path.cwd()) else report)
    if update:
        if rc != 0:
            print("kvlib verify: committed results not updated: the run again did not finish", flush=True)
        else:
            done = update_committed(profile, scratch, committed, [r.name for r in results], params_root,
                                    notebooks_dir)
            print(f"kvlib verify: committed results updated ({committed}): {', '.join(done) or 'none'}", flush=True)
            return 0
    return 0 if rc == 0 and all(r.matches for r in results) else 1
