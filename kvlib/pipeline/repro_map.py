"""The reproduction map (one row per paper artifact with its notebook, results and verdict) for the README
and each profile's `index.html`, written from the manifest.
"""
from __future__ import annotations

import csv
import json
import os
import re
from html import escape
from html import escape as e
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvlib.engine.config import InputError
from kvlib.engine.io import atomic_write_text, dumps_json, replace_marked_block
from kvlib.engine.models import DEFAULT_MODEL
from kvlib.pipeline.manifest import (
    MANIFEST_FILE,
    _duration,
    _wall_time,
    changed_since_run,
    failure_note,
    load_manifest_entries,
    redact,
    wall_seconds_total,
    wall_time_summary,
    write_manifest,
)
from kvlib.pipeline import rejudge
from kvlib.pipeline.plan import discover_notebooks
from kvlib.report import paper, plots
from kvlib.report.paper import artifact_verdict, load, verdict_category
from kvlib.report.tables import save_figure

INDEX_FILE = "index.html"
CLAIMS_FIGURE = "claims.png"  # results/<profile>/claims.png: every claim of the profile at a glance



_INDEX_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                "vertical-align:top;text-align:left}code{font-size:90%}.failed{color:#b00}"
                ".claims img{max-width:100%;border:1px solid #ddd}figcaption{font-size:90%;color:#444}"
                ".gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{width:270px;margin:0;"
                "border:1px solid #ddd;padding:6px}.gallery img{width:100%;height:170px;object-fit:contain}")



def _markdown_links_to_html(text: str) -> str:
    """`[text](href), ...` (the reproduction map's cells) as escaped HTML links."""

    parts, last = [], 0
    for m in re.finditer(r"\[([^\]]*)\]\(([^)]*)\)", text):
        parts += [escape(text[last:m.start()]), f'<a href="{escape(m.group(2))}">{escape(m.group(1))}</a>']
        last = m.end()
    return "".join(parts) + escape(text[last:])



def main_figure(name: str, entry: Mapping[str, Any]) -> str | None:
    """The figure that stands for notebook `name` in the index (a path under results/<profile>/): the first PNG
    of the paper artifacts it reproduces (params/paper_reference.yaml's `results`), else its first PNG output."""
    outputs = [o for o in entry.get("outputs", []) if o.endswith(".png")]
    listed = [r for a in load().artifacts if a["notebook"] == name for r in a["results"] if r.endswith(".png")]
    return next((r for r in listed if r in outputs), outputs[0] if outputs else None)


CLAIMS_CAPTION = ("Every claim of the paper this profile checks, grouped by figure and table: our difference "
                  "(finetuned minus original) with its 95% interval, coloured by verdict (Holm-adjusted within each "
                  "artifact; pre-registered primary claims, in bold with the half-width reached, in a family of their "
                  "own); open markers: the paper's own published differences; grey band: the equivalence margin "
                  "({margin:.2f} points) that \u201closes nothing\u201d and \u201cdoes not improve\u201d claims must "
                  "rule out. Each notebook's claims table has the p-values and the original's level.")


def _claims_html(claims_figure: str | None) -> str:
    if not claims_figure:
        return ""
    caption = CLAIMS_CAPTION.format(margin=100 * paper.equivalence_margin())
    return (f'<figure class="claims"><a href="{e(claims_figure)}"><img src="{e(claims_figure)}" '
            f'alt="the claims of this profile with their 95% intervals and verdicts"></a>'
            f"<figcaption>{e(caption)}</figcaption></figure>\n")


def _gallery_html(entries: Mapping[str, Mapping[str, Any]]) -> str:
    """Each finished notebook's main figure as a thumbnail linked to its rendered report."""
    cards = []
    for name in sorted(entries):
        entry = entries[name]
        if entry.get("status") != "ok":
            continue
        figure = main_figure(name, entry)
        image = (f'<a href="{e(name)}.html"><img src="{e(figure)}" alt="{e(name)}: {e(Path(figure).name)}"></a>'
                 if figure else "")
        cards.append(f'<figure>{image}<figcaption><a href="{e(name)}.html">{e(name)}</a>'
                     f'{" &middot; " + e(Path(figure).name) if figure else ""}</figcaption></figure>')
    return ("<h2>Reports</h2>\n<div class=\"gallery\">" + "".join(cards) + "</div>\n") if cards else ""


def render_index(manifest: dict, map_rows: list[dict] | None = None, repo_prefix: str = "../../",
                 claims_figure: str | None = None) -> str:
    """`results/<profile>/index.html` from the run manifest: every rendered notebook linked, with its status,
    wall time, seeds, params file, tables and figures, input data hashes and recorded facts, under the
    environment (versions, commit) that produced them. `repo_prefix` leads from the page to the repo root.
    `map_rows` (kvlib.report.paper.reproduction_map, links relative to this page) adds the paper-artifact map on top.
    `claims_figure` (a path relative to the page, e.g. CLAIMS_FIGURE) heads the page, followed by each notebook's
    main figure as a thumbnail linked to its report. Deterministic: the same manifest gives the same bytes."""

    entries = manifest.get("notebooks", {})
    variant = manifest.get("variant") or {}  # --model/--set: results/<profile>/<slug>/, one folder deeper
    if variant and repo_prefix == "../../":
        repo_prefix = "../../../"
    git = manifest.get("git") or {}
    commit = git.get("commit") or "not a git checkout"
    rows = []
    for name in sorted(entries):
        entry = entries[name]
        ok = entry.get("status") == "ok"
        status = str(entry.get("status")) + (f": {entry['reason']}" if entry.get("reason") else "")
        note = failure_note(entry)  # the last good result stands; a later run failed
        if note:
            status += f" (the last good result, shown); {note}"
        title = (f'<a href="{e(name)}.html">{e(name)}</a>' if ok else e(name))
        outputs = [o for o in entry.get("outputs", []) if o.endswith((".csv", ".png"))]
        inputs = "<br>".join(f"<code>{e(i['path'])}</code> {e(i['sha256'][:12])}" for i in entry.get("inputs", []))
        seeds = ", ".join(f"{k}={v}" for k, v in sorted((entry.get("seeds") or {}).items()))
        facts = entry.get("facts")
        ran_at = entry.get("git") or {}  # the commit this notebook ran at (the header names the latest run's)
        ran_at = (f"<br><code>{e(ran_at['commit'][:12])}</code>{' (uncommitted changes)' if ran_at.get('dirty') else ''}"
                  if ran_at.get("commit") else "")
        links = "<br>".join(f'<a href="{e(o)}">{e(o)}</a>' for o in outputs)
        rows.append(
            "<tr>"
            f"<td>{title}</td><td class=\"{'' if ok and not note else 'failed'}\">{e(status)}</td>"
            f"<td>{e(str(entry.get('finished', '')))}{ran_at}</td><td>{e(_wall_time(entry))}</td>"
            f"<td>{e(seeds)}</td>"
            f"<td><a href=\"{e(repo_prefix + entry.get('params_file', ''))}\">{e(entry.get('params_file', ''))}</a></td>"
            f"<td>{links}</td>"
            f"<td>{inputs}</td>"
            f"<td>{'<pre>' + e(dumps_json(facts)) + '</pre>' if facts else ''}</td>"
            "</tr>")
    total = wall_seconds_total(entries)
    packages = ", ".join(f"{k} {v}" for k, v in sorted((manifest.get("packages") or {}).items()) if v)
    profile = str(manifest.get("profile", ""))
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>kvlib results: {e(profile)}</title><style>{_INDEX_STYLE}</style></head><body>\n"
        f"<h1>kvlib results: profile <code>{e(profile)}</code></h1>\n"
        + _claims_html(claims_figure) + _gallery_html(entries)
        + f"<h2>Environment</h2>\n<p>Produced by <code>{e(variant.get('command') or 'kvlib reproduce --profile ' + profile)}</code>"
        + (f" (base model {e(str(variant.get('base_model')))} replaced by {e(str(variant.get('model')))})"
           if variant.get("model") and variant.get("model") != variant.get("base_model") else "") + "; "
        f"<a href=\"manifest.json\">manifest.json</a> has every field below and the full params.</p>\n"
        "<table>"
        f"<tr><th>kvlib</th><td>{e(str(manifest.get('kvlib_version', '')))}</td></tr>"
        f"<tr><th>commit (latest run)</th><td><code>{e(commit)}</code>{' (uncommitted changes)' if git.get('dirty') else ''}</td></tr>"
        f"<tr><th>python</th><td>{e(str(manifest.get('python', '')))}</td></tr>"
        f"<tr><th>platform</th><td>{e(str(manifest.get('platform', '')))}</td></tr>"
        f"<tr><th>packages</th><td>{e(packages)}</td></tr>"
        f"<tr><th>wall time</th><td>{_duration(total)} over {len(entries)} notebooks (all runs and attempts behind their latest results)</td></tr>"
        "</table>\n"
        + ("" if not map_rows else
           "<h2>Paper artifacts</h2>\n<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in map_rows[0]) + "</tr>\n"
           + "\n".join("<tr>" + "".join(f"<td>{_markdown_links_to_html(str(v))}</td>" for v in r.values()) + "</tr>"
                       for r in map_rows) + "\n</table>\n<h2>Notebooks</h2>\n")
        + "<table><tr><th>notebook</th><th>status</th><th>finished (UTC), commit</th><th>wall time</th><th>seeds</th>"
        "<th>params</th><th>tables and figures</th><th>input data (sha256)</th><th>facts</th></tr>\n"
        + "\n".join(rows) + "\n</table>\n</body></html>\n")


def _model_of(entry: Mapping[str, Any]) -> str:
    """The base model(s) a notebook ran on: 02's base_model, else the `model` entries of its models."""
    params = entry.get("params") or {}
    if "runs" in params or "base_model" in params:  # 02_finetune: kvlib.engine.train's default base is the embedded model

        return str(params.get("base_model") or DEFAULT_MODEL)
    models = params.get("models") or {}
    names = [str(m["model"]) for m in models.values() if isinstance(m, Mapping) and m.get("model")]
    return ", ".join(dict.fromkeys(names))



def primary_note(claims: Sequence[Mapping[str, Any]]) -> str:
    """The pre-registered primary claims among an artifact's claims (ROLE primary; claims-table rows: a notebook's
    facts, or a re-judged record's claims through kvlib.pipeline.rejudge.figure_claims), for its verdict cell: their
    verdict and each one's interval half-width reached against the one pre-registered, "primary: inconclusive at
    this n (finetuned (template), improves MDQA, random distractors: inconclusive, +-2.80 of +-3 points, rules out
    differences outside [-3.0, +2.6])"; '' when none is primary.
    An inconclusive claim names the differences its 95% interval rules out, because at the pre-registered width
    that bound is the informative result."""
    primary = [c for c in claims if c.get(paper.ROLE) == paper.PRIMARY]
    if not primary:
        return ""
    verdicts = [str(c.get("verdict") or "not measured") for c in primary]
    parts = []
    for c, verdict in zip(primary, verdicts):
        half, limit = c.get(paper.HALF_WIDTH), c.get(paper.MAX_HALF_WIDTH)
        verdict_text = verdict_category(verdict)
        text = (f"{c.get('model')}, {_claim_subject(str(c.get('claim', '')))}: {verdict_text}, "
                + paper.half_width_text(half, limit) + ("" if limit is None else " points"))
        lo, hi = paper.claim_interval(c)
        if verdict_text == "inconclusive" and lo is not None:
            text += f", rules out differences outside [{lo:+.1f}, {hi:+.1f}]"
        parts.append(text)
    return f"primary: {artifact_verdict(verdicts)} ({'; '.join(parts)})"


def not_tested_note(claims: Sequence[Mapping[str, Any]]) -> str:
    """Why an artifact's claims were not tested, for its verdict cell: each finetune that did not learn its own task
    with the held-out accuracy measured (kvlib.report.paper.mark_not_tested puts it in the verdict), "not tested:
    finetuned (long) (held-out value accuracy 0.0% of 40 < 50%)"; '' when every claim was tested. The count of
    not-tested claims alone would hide how far from learning the finetune was."""
    reasons: dict[str, list[str]] = {}
    for c in claims:
        why = paper.not_tested_reason(str(c.get("verdict") or ""))
        if why:
            reasons.setdefault(why, []).append(str(c.get("model")))
    if not reasons:
        return ""
    return "not tested: " + ", ".join(f"{', '.join(dict.fromkeys(models))} ({why})" for why, models in reasons.items())


def _claim_subject(claim: str) -> str:
    """What a claim is about, shortly: its text after "synthetic finetuning" up to its first parenthesis."""
    return claim.removeprefix("synthetic finetuning ").split(" (")[0]


def rejudged_verdict(summary: Mapping[str, Any], old_text: str) -> str:
    """An artifact's verdict cell from its record (kvlib.pipeline.rejudge.artifact_summary): the verdict its claims
    get re-judged from the committed items, next to the one the notebook wrote (`old_text`), and how many claims
    only a re-run can judge."""
    parts = []
    if summary["new"] is not None:
        counts = ", ".join(f"{n} {v}" for v, n in summary["new_counts"].items())
        collapsed = (f"; {summary['collapsed']} on a zero-width interval" if summary["collapsed"] else "")
        parts.append(f"re-judged from the committed items: {summary['new']} ({counts}) (was: {old_text}{collapsed})")
    if summary["rerun"]:
        parts.append(f"{summary['rerun']} of {summary['claims']} claims to be re-run"
                     + ("" if summary["new"] is not None else f" (was: {old_text})"))
    return "; ".join(parts) or old_text


def reproduction_map(profile: str, results_root: str | Path = "results", params_root: str | Path = "params",
                     link_root: str | Path | None = None, entries: Mapping[str, dict] | None = None,
                     changed: Mapping[str, str] | None = None, results_dir: str | Path | None = None,
                     rejudged: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """One row per paper artifact for `profile`, from its manifest's notebook entries (`entries`, default: read
    from results/<profile>/manifest.json): the notebook (its html), params file, result files and model, and the
    verdict aggregated from the claims the notebook recorded. Links are relative to `link_root` (default: the
    working directory, i.e. the repository root) and are given only for files that exist, so every link
    resolves. `changed` (kvlib.pipeline.reproduce.changed_since_run: notebook -> reason) marks the verdicts of results
    that an earlier params or notebook version produced, so they are not read as the current configuration's.
    `rejudged` (kvlib.pipeline.rejudge.load_record, default: read from the results folder): per notebook, the
    protocol changes its results predate, named in the stale mark, and its claims re-judged from the committed
    items, shown next to the verdict the notebook wrote."""


    results_dir = Path(results_dir) if results_dir is not None else Path(results_root) / profile  # or a variant's
    link_root = Path(link_root) if link_root is not None else Path.cwd()
    if entries is None:
        entries = load_manifest_entries(results_dir)
    if rejudged is None:
        rejudged = rejudge.load_record(results_dir)
    changed = changed or {}

    def link(path: Path, text: str) -> str:
        if not path.is_file():
            return ""
        return f"[{text}]({Path(os.path.relpath(path.resolve(), link_root.resolve())).as_posix()})"

    rows = []
    for art in load().artifacts:
        nb = art["notebook"]
        entry = entries.get(nb)
        ok = entry is not None and entry.get("status") == "ok"
        claims = [c for c in ((entry or {}).get("facts") or {}).get("claims", []) if c.get("artifact") == art["id"]]
        if entry is not None and entry.get("status") == "skipped":
            verdict_text = f"not for this profile: {entry.get('reason', '')}"
        elif not ok:
            verdict_text = "not run in this profile yet"
        elif not art["claims"]:
            verdict_text = "shown (illustration)"
        elif claims:
            verdict_text = artifact_verdict([c["verdict"] for c in claims])
            categories = [verdict_category(c["verdict"]) for c in claims]
            counts = {v: categories.count(v) for v in dict.fromkeys(categories)}
            verdict_text += " (" + ", ".join(f"{n} {v}" for v, n in counts.items()) + ")"
        else:
            verdict_text = "not measured (no claim recorded)"
        record = rejudged.get(nb) if ok else None
        if record is not None and art["claims"]:
            verdict_text = rejudged_verdict(rejudge.artifact_summary(record, art["id"]), verdict_text)
            # as claims-table rows (verdict, ci), the shape the claims figure reads them in
            claims = [c for c in rejudge.figure_claims(record, [])
                      if c["artifact"] == art["id"] and c["verdict"] != rejudge.STALE_RERUN]
        for note in (primary_note(claims), not_tested_note(claims)) if ok and art["claims"] else ():
            if note:
                verdict_text += f"; {note}"
        reasons = ([f"{changed[nb]} since this run"] if ok and nb in changed else []) + (
            [s["reason"] for s in record.get("stale", [])] if record is not None else [])
        if reasons:
            # a changed notebook is stale for `kvlib reproduce` too; one that only rejudge finds stale (e.g. it
            # evaluated an earlier training of a run) is up to date for the manifest, so it is re-run on request
            how = "kvlib reproduce" if nb in changed else f"kvlib reproduce --only {nb} --force"
            verdict_text = f"stale ({'; '.join(reasons)}; {how} re-runs it): {verdict_text}"
        if ok and failure_note(entry):  # the verdict is the last good result's; say that a later run failed
            verdict_text += f"; {failure_note(entry)}"
        files = [link(results_dir / r, Path(r).name) for r in art["results"]] if ok else []
        rows.append({
            "artifact": art["title"],
            "notebook": link(results_dir / f"{nb}.html", nb) or nb,
            "params": link(Path(params_root) / profile / f"{nb}.yaml", f"{profile}/{nb}.yaml"),
            "results": ", ".join(f for f in files if f),
            "model": _model_of(entry) if ok else "",
            "verdict": verdict_text,
            "offline": " ".join(str(art.get("offline", "")).split()),
        })
    return rows



def profile_claims(results_dir: str | Path, entries: Mapping[str, Mapping[str, Any]],
                   rejudged: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict]:
    """The claims of a profile's finished notebooks, for the claims figure: each notebook's claims.csv (with the
    difference, its interval and the paper's published differences), else the claims its manifest entry recorded
    (`facts`; verdicts only, drawn without an interval). A notebook in `rejudged` (kvlib.pipeline.rejudge.load_record)
    gives its claims as re-judged from the committed items, those left to a re-run marked
    (kvlib.pipeline.rejudge.figure_claims)."""
    claims: list[dict] = []
    for name in sorted(entries):
        entry = entries[name]
        if entry.get("status") != "ok":
            continue
        path = Path(results_dir) / name / "claims.csv"
        if path.is_file():
            with path.open(newline="", encoding="utf-8") as fh:
                own = list(csv.DictReader(fh))
        else:
            own = [dict(c) for c in (entry.get("facts") or {}).get("claims", [])]
        record = (rejudged or {}).get(name)
        claims += rejudge.figure_claims(record, own) if record is not None and record.get("claims") else own
    return claims


def figure_notes(changed: Mapping[str, str] | None, rejudged: Mapping[str, Mapping[str, Any]] | None
                 ) -> dict[str, str]:
    """artifact id -> the note on its heading in the claims figure: "stale" for a notebook changed since it ran or
    predating a protocol change, with what its claims are there (re-judged from the committed items, to be
    re-run)."""
    notes = {}
    for art in load().artifacts:
        nb, record = art["notebook"], (rejudged or {}).get(art["notebook"])
        parts = ["stale"] if nb in (changed or {}) or (record or {}).get("stale") else []
        if record is not None and art["claims"]:
            summary = rejudge.artifact_summary(record, art["id"])
            if summary["new"] is not None:
                parts.append("re-judged from the committed items")
            if summary["rerun"]:
                parts.append(f"{summary['rerun']} claims to be re-run")
        if parts:
            notes[art["id"]] = ", ".join(parts) if len(parts) == 1 else f"{parts[0]}: {', '.join(parts[1:])}"
    return notes


def write_claims_figure(out_dir: str | Path, entries: Mapping[str, Mapping[str, Any]] | None = None,
                        changed: Mapping[str, str] | None = None) -> Path | None:
    """results/<profile>/claims.png (kvlib.report.plots.claims_forest) from the profile's recorded claims
    (`profile_claims`; `entries` default: the manifest's), with the artifacts of notebooks that `changed` since
    they ran, or that the profile's record (kvlib.pipeline.rejudge.load_record) finds predating a protocol change,
    marked "(stale ...)" (the reproduction map says why): their claims drawn as re-judged from the committed items,
    or as "stale: to be re-run". Returns its path, or None (and no file) when the profile recorded no claim."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    if entries is None:
        entries = load_manifest_entries(out_dir)
    rejudged = rejudge.load_record(out_dir)
    claims = profile_claims(out_dir, entries, rejudged)
    path = out_dir / CLAIMS_FIGURE
    if not claims:
        path.unlink(missing_ok=True)
        return None
    fig = plots.claims_forest(paper.forest_rows(claims, figure_notes(changed, rejudged)),
                              title=f"The paper's claims checked in profile {out_dir.name}: "
                                    f"our differences with 95% intervals")
    save_figure(fig, path, show=False)
    plt.close(fig)
    return path


def map_markdown(rows: Sequence[Mapping[str, str]]) -> str:
    """The reproduction map as a Markdown table (README)."""
    cols = ["artifact", "notebook", "params", "results", "model", "verdict", "offline"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]).replace("|", "\\|") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"



MAP_START = "<!-- reproduction-map:{profile}:start (kvlib map --profile {profile} --update README.md) -->"



MAP_END = "<!-- reproduction-map:{profile}:end -->"



def readme_map_section(profile: str, results_root: str | Path = "results", params_root: str | Path = "params",
                       link_root: str | Path | None = None, notebooks_dir: str | Path = "notebooks") -> str:
    """What goes between a profile's map markers in the README: the claims figure (results/<profile>/claims.png,
    when written) as an image link, the map, then the profile's wall time from its
    manifest (what the results cost on this machine, with the notebooks `kvlib reproduce` runs from
    `notebooks_dir` that have not finished yet named, and those to run again: changed since they ran, or with a
    protocol change that only a re-run settles, e.g. an earlier training of a run they evaluated)."""

    entries = load_manifest_entries(Path(results_root) / profile)
    changed = changed_since_run(profile, entries, Path(params_root), Path(notebooks_dir))
    rerun = {name: f"{reason} since it ran" for name, reason in changed.items()}
    rejudged = rejudge.load_record(Path(results_root) / profile)  # read once: it hashes every item file
    for name, record in rejudged.items():
        reasons = [s["reason"] for s in record.get("stale", []) if not s["rejudged"]]
        if reasons and name not in rerun and (entries.get(name) or {}).get("status") == "ok":
            rerun[name] = "; ".join(reasons)
    text = map_markdown(reproduction_map(profile, results_root, params_root, link_root, entries=entries,
                                         changed=changed, rejudged=rejudged))
    figure = Path(results_root) / profile / CLAIMS_FIGURE
    if figure.is_file():
        href = Path(os.path.relpath(figure.resolve(), Path(link_root or Path.cwd()).resolve())).as_posix()
        text = (f"[![The {profile} profile's claims: our differences with 95% intervals, by verdict]({href})]({href})"
                f"\n\n{text}")
    if entries:
        text += "\n" + wall_time_summary(entries, list(discover_notebooks(Path(notebooks_dir))), rerun) + "\n"
    return text



def update_readme_map(readme: str | Path, profile: str, results_root: str | Path = "results",
                      params_root: str | Path = "params", notebooks_dir: str | Path = "notebooks") -> bool:
    """Replace the text between the profile's map markers in `readme` with `readme_map_section` (links relative
    to the README's folder), after writing the profile's claims figure and index.html afresh from its manifest
    (`write_index`), so committed results get them without running a model. Returns whether the README changed;
    the markers must already be there."""
    readme = Path(readme)
    if not readme.is_file():
        raise InputError(f"{readme}: file not found (--update names the README that holds the map)")
    start, end = MAP_START.format(profile=profile), MAP_END.format(profile=profile)
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:  # checked before the index is rewritten
        raise InputError(f"{readme}: no markers for the {profile} map; add the lines `{start}` and `{end}` where "
                         f"it belongs")
    out_dir = Path(results_root) / profile
    if (out_dir / MANIFEST_FILE).is_file():  # the claims figure and index.html from the manifest, no model run
        write_index(out_dir, Path(params_root), notebooks_dir=Path(notebooks_dir))
    section = readme_map_section(profile, results_root, params_root, readme.parent, notebooks_dir)
    try:
        return replace_marked_block(readme, start, end, section)
    except ValueError as exc:
        raise InputError(str(exc)) from None


def write_index(out_dir: Path, params_root: Path = Path("params"), manifest: dict | None = None,
                notebooks_dir: Path = Path("notebooks")) -> Path:
    """index.html from the manifest (default: read from out_dir/manifest.json), headed by the claims figure
    (`write_claims_figure`, written here), with the reproduction map (kvlib.report.paper) when the profile ran any
    notebook of the paper's artifacts; results whose params or notebook changed since they ran are marked stale
    there (`changed_since_run`)."""

    out_dir = Path(out_dir)
    if manifest is None:
        manifest = json.loads((out_dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    entries = manifest.get("notebooks", {})
    profile = str(manifest.get("profile") or out_dir.name)  # a run with --model/--set: results/<profile>/<slug>/
    map_rows = None
    changed = changed_since_run(profile, entries, Path(params_root), Path(notebooks_dir))
    if {a["notebook"] for a in paper.load().artifacts} & set(entries):
        map_rows = reproduction_map(profile, out_dir.parent, params_root, link_root=out_dir,
                                    entries=entries, changed=changed, results_dir=out_dir)
    figure = write_claims_figure(out_dir, entries, changed)
    # links to params files go through the repository root (the notebooks' parent), wherever the folder is
    repo_prefix = Path(os.path.relpath(Path(notebooks_dir).resolve().parent, out_dir.resolve())).as_posix() + "/"
    return atomic_write_text(out_dir / INDEX_FILE, redact(render_index(manifest, map_rows, repo_prefix,
                                                                       claims_figure=figure and figure.name)))



def write_results_record(out_dir: Path, header: dict, entries: dict[str, dict], params_root: Path = Path("params"),
                         notebooks_dir: Path = Path("notebooks")) -> None:
    """manifest.json and the index.html page rendered from it, always together."""
    write_index(out_dir, params_root, write_manifest(out_dir, header, entries), notebooks_dir)
