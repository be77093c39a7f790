"""Report I/O for the notebooks: one home for where results go and how they are written.

Everything here writes deterministic files (fixed float formats, PNG without a version stamp, sorted JSON)
so that re-running a notebook with the same inputs gives a clean `git diff` on `results/`.
Heavy libraries (pandas, matplotlib) are only touched through the objects the caller passes in, so importing
this module stays cheap.
"""
from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from tabulate import tabulate

from kvlib.engine.io import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover - typing only
    import pandas as pd
    from matplotlib.figure import Figure

FIGURE_DPI = 120
CSV_FLOAT_FORMAT = "%.6g"  # machine-readable copy: enough digits for any accuracy/latency we report
DISPLAY_DIGITS = 4  # significant digits in the markdown/LaTeX tables meant for reading


def notebook_output_dir(results_dir: str | Path, name: str) -> Path:
    """`results_dir/name/`, created: where notebook `name` puts its tables and figures."""
    if not name or Path(name).name != name:
        raise ValueError(f"notebook output name must be a plain directory name, got {name!r}")
    out = Path(results_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    return out


# Captions of the tables every notebook of a kind writes, by stem (save_table's default; "{notebook}" is filled in).
DEFAULT_CAPTIONS = {
    "claims": "The paper's claims judged from paired differences (ours minus the original) with 95% intervals, "
              "Holm-adjusted within each artifact (notebook {notebook}).",
    "table": "Headline scores in percent with 95% intervals, and paired differences from the original "
             "(notebook {notebook}).",
}
LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                 "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    """`text` with LaTeX's special characters escaped (captions; pandas escapes the cells)."""
    return "".join(LATEX_SPECIAL.get(c, c) for c in str(text))


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def column_decimals(values, digits: int = DISPLAY_DIGITS) -> int:
    """Decimals that show a float column's largest magnitude with `digits` significant digits (0 to 6; 0 for
    whole numbers): one fixed precision per column, so the numbers of a column line up."""
    finite = [abs(float(v)) for v in values if not _missing(v) and math.isfinite(float(v))]
    if not finite or all(v.is_integer() for v in finite):
        return 0
    top = max(finite)
    return min(max(digits - 1 - math.floor(math.log10(top)), 0), 6) if top > 0 else digits - 1


def markdown_table(df: "pd.DataFrame", digits: int = DISPLAY_DIGITS) -> str:
    """`df` as a Markdown table that renders as a table everywhere (GitHub, JupyterLab, nbconvert): `|` inside a
    cell escaped, line breaks as `<br>`, missing values as empty cells, floats to `digits` significant digits."""
    def cell(value):
        if _missing(value):
            return None
        if isinstance(value, str):
            return value.replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")
        return value.item() if hasattr(value, "item") else value  # numpy scalars as Python numbers

    rows = [[cell(v) for v in row] for row in df.itertuples(index=False, name=None)]
    return tabulate(rows, headers=[cell(str(c)) for c in df.columns], tablefmt="pipe", floatfmt=f".{digits}g",
                    missingval="") + "\n"


def latex_table(df: "pd.DataFrame", caption: str, label: str, digits: int = DISPLAY_DIGITS,
                precision: Mapping[str, int] | None = None) -> str:
    """`df` as a LaTeX table (booktabs) with `caption` (plain text, escaped here) and `label`: every float column
    at one fixed number of decimals (`precision[column]`, else `column_decimals`), empty cells for missing values,
    special characters escaped."""
    precision = dict(precision or {})
    unknown = sorted(set(precision) - set(df.columns))
    if unknown:
        raise ValueError(f"precision: no column {unknown} in the table (columns: {list(df.columns)})")
    formatters = {}
    # one line per row: a line break inside a cell would end the LaTeX row's source line, not the cell
    df = df.apply(lambda c: c.map(lambda v: v.replace("\r\n", " ").replace("\n", " ") if isinstance(v, str) else v)
                  if c.dtype.kind not in "biufcmM" else c)
    for column in df.columns:
        if df[column].dtype.kind != "f":
            continue
        decimals = precision.get(column, column_decimals(df[column], digits))
        formatters[column] = lambda v, d=decimals: "" if _missing(v) else f"{v:.{d}f}"
    return df.to_latex(index=False, formatters=formatters, na_rep="", escape=True, caption=latex_escape(caption),
                       label=label)


def default_caption(stem: Path) -> str:
    notebook = stem.parent.name
    known = DEFAULT_CAPTIONS.get(stem.name)
    if known:
        return known.format(notebook=notebook)
    what = stem.name.replace("_", " ").strip()
    return f"{what[:1].upper()}{what[1:]}" + (f" (notebook {notebook})." if notebook else ".")


def default_label(stem: Path) -> str:
    """`tab:<notebook>-<stem>`: unique across a profile's tables (LaTeX allows `_` and `-` in labels)."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", stem.name)
    notebook = re.sub(r"[^A-Za-z0-9_.-]", "-", stem.parent.name)
    return f"tab:{notebook}-{name}" if notebook else f"tab:{name}"


def save_table(df: "pd.DataFrame", stem: str | Path, digits: int = DISPLAY_DIGITS, caption: str | None = None,
               label: str | None = None, precision: Mapping[str, int] | None = None) -> list[Path]:
    """Write `df` as stem.csv (full data), stem.md (floats to `digits` significant digits) and stem.tex: a LaTeX
    table to cite, with `caption` (default from the stem, e.g. "Mdqa accuracy (notebook 03_mdqa)."), `label`
    (default `tab:<notebook>-<stem>`, the notebook being the stem's folder), each float column at a fixed
    precision (`precision`: column -> decimals; default `column_decimals`) and empty cells for missing values."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix(): a stem like `acc.v2` must keep its dot.
    csv, md, tex = (stem.with_name(f"{stem.name}{ext}") for ext in (".csv", ".md", ".tex"))
    atomic_write_text(csv, df.to_csv(index=False, float_format=CSV_FLOAT_FORMAT, lineterminator="\n"))
    atomic_write_text(md, markdown_table(df, digits))
    # escape=True: column names like `acc_%` must not break the LaTeX build.
    atomic_write_text(tex, latex_table(df, default_caption(stem) if caption is None else caption,
                                       default_label(stem) if label is None else label, digits, precision))
    return [csv, md, tex]


def show(df: "pd.DataFrame", digits: int = DISPLAY_DIGITS):
    """`df` for a notebook's output as a Markdown table (`markdown_table`): rendered as a table in the HTML report
    and JupyterLab, no cell cut short (a DataFrame's HTML cuts text at 50 characters)."""
    from IPython.display import Markdown

    return Markdown(markdown_table(df, digits))


def save_figure(fig: "Figure", path: str | Path, dpi: int = FIGURE_DPI, caption: str | None = None,
                show: bool = True) -> Path:
    """Save `fig` as PNG without the matplotlib version stamp, so identical plots give identical bytes. Inside a
    notebook (an IPython kernel) and with `show`, the saved PNG is displayed, with `caption` (Markdown) under it,
    and the figure closed: the report shows exactly the file the results hold."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG; got {path.name!r} (use a .png name)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    if show and _in_kernel():
        import matplotlib.pyplot as plt
        from IPython.display import Image, Markdown, display

        display(Image(filename=str(path)))
        if caption:
            display(Markdown(caption))
        plt.close(fig)
    return path


def _in_kernel() -> bool:
    """Whether this runs in a Jupyter kernel (papermill's included), not in plain Python or a terminal IPython."""
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return bool(shell) and type(shell).__name__ == "ZMQInteractiveShell"


# ---------------------------------------------------------------------------------------- index page


