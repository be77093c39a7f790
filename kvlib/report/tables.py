"""Report I/O for the notebooks: one home for where results go and how they are written.

Everything here writes deterministic files (fixed float formats, PNG without a version stamp, sorted JSON)
so that re-running a notebook with the same inputs gives a clean `git diff` on `results/`.
Heavy libraries (pandas, matplotlib) are only touched through the objects the caller passes in, so importing
this module stays cheap.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

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


# ---------------------------------------------------------------------------------------- index page


