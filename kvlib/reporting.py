"""Report I/O for the notebooks: one home for where results go and how they are written.

Everything here writes deterministic files (fixed float formats, PNG without a version stamp, sorted JSON)
so that re-running a notebook with the same inputs gives a clean `git diff` on `results/`.
Heavy libraries (pandas, matplotlib) are only touched through the objects the caller passes in, so importing
this module stays cheap.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from matplotlib.figure import Figure

INPUTS_FILE = "inputs.json"
FACTS_FILE = "facts.json"  # facts a run produced that belong in the manifest (e.g. a fine-tuned model name)
BOOKKEEPING_FILES = (INPUTS_FILE, FACTS_FILE)  # merged into the manifest, not outputs
FIGURE_DPI = 120
CSV_FLOAT_FORMAT = "%.6g"  # machine-readable copy: enough digits for any accuracy/latency we report
DISPLAY_DIGITS = 4  # significant digits in the markdown/LaTeX tables meant for reading

# ((resolved path, size, mtime_ns), ...) -> sha256; files are hashed once per process unless they change.
_SHA256_CACHE: dict[tuple, str] = {}
_SHA256_LOCK = threading.Lock()  # evaluation threads may hash model files concurrently


def atomic_write_text(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same directory, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A plain open() (not mkstemp) so the file gets the usual umask permissions, not 0600.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def dumps_json(data: Any) -> str:
    """The one JSON style for report files: sorted keys, indent 2, trailing newline."""
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def files_sha256(paths: Iterable[str | Path]) -> str:
    """sha256 over the bytes of `paths` in order (one file: its plain sha256, as `sha256sum` prints it),
    streamed (weights and datasets are large) and cached by each file's (path, size, mtime)."""
    paths = [Path(p) for p in paths]
    key = tuple((str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    with _SHA256_LOCK:
        if key in _SHA256_CACHE:
            return _SHA256_CACHE[key]
    h = hashlib.sha256()
    for path in paths:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    with _SHA256_LOCK:
        _SHA256_CACHE[key] = h.hexdigest()
    return _SHA256_CACHE[key]


def file_sha256(path: str | Path) -> str:
    return files_sha256([path])


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def notebook_output_dir(results_dir: str | Path, name: str) -> Path:
    """`results_dir/name/`, created: where notebook `name` puts its tables and figures."""
    if not name or Path(name).name != name:
        raise ValueError(f"notebook output name must be a plain directory name, got {name!r}")
    out = Path(results_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    return out


def save_table(df: "pd.DataFrame", stem: str | Path, digits: int = DISPLAY_DIGITS) -> list[Path]:
    """Write `df` as stem.csv (full data), stem.md and stem.tex (floats to `digits` significant digits)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    spec = f".{digits}g"
    # Appended, not with_suffix(): a stem like `acc.v2` must keep its dot.
    csv, md, tex = (stem.with_name(f"{stem.name}{ext}") for ext in (".csv", ".md", ".tex"))
    atomic_write_text(csv, df.to_csv(index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n"))
    atomic_write_text(md, df.to_markdown(index=False, floatfmt=spec) + "\n")
    # escape=True: column names like `acc_%` must not break the LaTeX build.
    atomic_write_text(tex, df.to_latex(index=False, float_format=lambda x: format(x, spec), escape=True))
    return [csv, md, tex]


def save_figure(fig: "Figure", path: str | Path, dpi: int = FIGURE_DPI) -> Path:
    """Save `fig` as PNG without the matplotlib version stamp, so identical plots give identical bytes."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG; got {path.name!r} (use a .png name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return path


def _expand_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files named in `paths`, with directories expanded to the files under them (a dataset is often a dir)."""
    files: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"record_inputs: {p} does not exist")
    return files


# Recorded data-file paths start with this instead of the data directory's location on the recording machine,
# so a clone whose data lives elsewhere ($KVLIB_DATA_DIR) still finds them (kvlib.reproduce.locate_input).
DATA_DIR_PREFIX = "$KVLIB_DATA_DIR/"


def _portable_path(path: Path) -> str:
    """Path relative to the working directory (the repo root when run by `kvlib reproduce`), else
    `$KVLIB_DATA_DIR/<path in the data directory>`, else absolute."""
    from kvlib.data import resolve_data_dir

    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        pass
    try:
        return DATA_DIR_PREFIX + resolved.relative_to(resolve_data_dir().resolve()).as_posix()
    except (FileNotFoundError, ValueError):
        return resolved.as_posix()


def read_inputs(results_dir: str | Path, name: str) -> list[dict]:
    """The inputs recorded so far for notebook `name` (empty when none)."""
    path = Path(results_dir) / name / INPUTS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def input_record(path: Path, name: str) -> dict:
    """One recorded input: the file at `path`, recorded under `name` (a portable path), with sha256 and size."""
    return {"path": name, "sha256": file_sha256(path), "bytes": path.stat().st_size}


def merge_inputs(*groups: Iterable[dict]) -> list[dict]:
    """Input records merged by path (a later group's record wins), sorted by path."""
    merged = {item["path"]: item for group in groups for item in group}
    return [merged[k] for k in sorted(merged)]


def record_inputs(results_dir: str | Path, name: str, paths: Iterable[str | Path]) -> list[dict]:
    """Record the data files notebook `name` read, with sha256, in `results_dir/name/inputs.json`.

    Call it once per data source; entries are merged by path (the latest hash wins) and kept sorted, and
    `kvlib reproduce` copies them into the run manifest. Returns the full list now recorded.
    """
    entries = merge_inputs(read_inputs(results_dir, name),
                           [input_record(f, _portable_path(f)) for f in _expand_files(paths)])
    atomic_write_text(notebook_output_dir(results_dir, name) / INPUTS_FILE, dumps_json(entries))
    return entries


def read_facts(results_dir: str | Path, name: str) -> dict:
    """The facts recorded so far for notebook `name` (empty when none)."""
    path = Path(results_dir) / name / FACTS_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def record_facts(results_dir: str | Path, name: str, facts: dict) -> dict:
    """Merge `facts` (plain JSON data) into `results_dir/name/facts.json`; `kvlib reproduce` copies them into
    the notebook's manifest entry. Returns everything recorded so far."""
    merged = {**read_facts(results_dir, name), **facts}
    atomic_write_text(notebook_output_dir(results_dir, name) / FACTS_FILE, dumps_json(merged))
    return merged


# ---------------------------------------------------------------------------------------- index page

INDEX_FILE = "index.html"
_INDEX_STYLE = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;padding:0 1em}"
                "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
                "vertical-align:top;text-align:left}code{font-size:90%}.failed{color:#b00}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _wall_time(entry: Mapping[str, Any]) -> str:
    """A notebook's wall time; when its results took several runs or attempts with these params (interrupted
    and resumed, or re-rendered from cached answers), their sum too."""
    text = _duration(entry.get("wall_seconds"))
    if (entry.get("attempts") or 1) > 1:
        text += (f" (the last run; {entry['attempts']} runs and attempts with these params: "
                 f"{_duration(entry.get('wall_seconds_all_attempts'))})")
    return text


def entry_wall_seconds(entry: Mapping[str, Any]) -> float:
    """What a notebook's latest results cost: every run and attempt behind them (manifests written before
    attempts were counted have only the last run's `wall_seconds`)."""
    return entry.get("wall_seconds_all_attempts", entry.get("wall_seconds")) or 0


def wall_seconds_total(entries: Mapping[str, Mapping[str, Any]]) -> float:
    """What a profile's results cost: `entry_wall_seconds` summed over its notebooks."""
    return sum(entry_wall_seconds(entry) for entry in entries.values())


def wall_time_summary(entries: Mapping[str, Mapping[str, Any]], notebooks: Sequence[str] = (),
                      changed: Mapping[str, str] | None = None) -> str:
    """One line for the README under a profile's map: the total and each notebook's share, in minutes, with the
    profile's `notebooks` that have not finished yet named (a total over a partial profile must not read as the
    whole), and those whose params or notebook `changed` since they ran (they run again)."""
    done = {n: e for n, e in sorted(entries.items()) if e.get("status") == "ok"}
    parts = ", ".join(f"{n.split('_', 1)[0]} {entry_wall_seconds(e) / 60:.1f}" for n, e in done.items())
    pending = sorted(n for n in {*entries, *notebooks}
                     if (entries.get(n) or {}).get("status") not in ("ok", "skipped"))
    text = (f"Wall time on this machine (manifest.json: all runs and attempts behind the latest results): "
            f"{wall_seconds_total(done) / 3600:.1f} h for {len(done)} notebooks (minutes: {parts}).")
    if pending:
        text += f" Not finished yet: {', '.join(pending)}."
    if changed:
        text += " To run again (changed since they ran): " + ", ".join(
            f"{n} ({reason})" for n, reason in sorted(changed.items())) + "."
    return text


def _markdown_links_to_html(text: str) -> str:
    """`[text](href), ...` (the reproduction map's cells) as escaped HTML links."""
    import re
    from html import escape

    parts, last = [], 0
    for m in re.finditer(r"\[([^\]]*)\]\(([^)]*)\)", text):
        parts += [escape(text[last:m.start()]), f'<a href="{escape(m.group(2))}">{escape(m.group(1))}</a>']
        last = m.end()
    return "".join(parts) + escape(text[last:])


def render_index(manifest: dict, map_rows: list[dict] | None = None, repo_prefix: str = "../../") -> str:
    """`results/<profile>/index.html` from the run manifest: every rendered notebook linked, with its status,
    wall time, seeds, params file, tables and figures, input data hashes and recorded facts, under the
    environment (versions, commit) that produced them. `repo_prefix` leads from the page to the repo root.
    `map_rows` (kvlib.paper.reproduction_map, links relative to this page) adds the paper-artifact map on top.
    Deterministic: the same manifest gives the same bytes."""
    from html import escape as e

    entries = manifest.get("notebooks", {})
    git = manifest.get("git") or {}
    commit = git.get("commit") or "not a git checkout"
    rows = []
    for name in sorted(entries):
        entry = entries[name]
        ok = entry.get("status") == "ok"
        status = str(entry.get("status")) + (f": {entry['reason']}" if entry.get("reason") else "")
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
            f"<td>{title}</td><td class=\"{'' if ok else 'failed'}\">{e(status)}</td>"
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
        f"<p>Produced by <code>kvlib reproduce --profile {e(profile)}</code>; "
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
