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
from typing import TYPE_CHECKING, Any, Iterable

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


def _portable_path(path: Path) -> str:
    """Path relative to the working directory (the repo root when run by `kvlib reproduce`), else absolute."""
    resolved = path.resolve()
    try:
        return resolved.relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return resolved.as_posix()


def read_inputs(results_dir: str | Path, name: str) -> list[dict]:
    """The inputs recorded so far for notebook `name` (empty when none)."""
    path = Path(results_dir) / name / INPUTS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text(encoding="utf-8"))


def record_inputs(results_dir: str | Path, name: str, paths: Iterable[str | Path]) -> list[dict]:
    """Record the data files notebook `name` read, with sha256, in `results_dir/name/inputs.json`.

    Call it once per data source; entries are merged by path (the latest hash wins) and kept sorted, and
    `kvlib reproduce` copies them into the run manifest. Returns the full list now recorded.
    """
    recorded = {e["path"]: e for e in read_inputs(results_dir, name)}
    for f in _expand_files(paths):
        entry = {"path": _portable_path(f), "sha256": file_sha256(f), "bytes": f.stat().st_size}
        recorded[entry["path"]] = entry
    entries = [recorded[k] for k in sorted(recorded)]
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
