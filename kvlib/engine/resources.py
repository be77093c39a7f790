"""The notebooks and params (profiles, accelerate configs, the paper's numbers) kvlib runs with, wherever kvlib
is: the repository's notebooks/ and params/ when kvlib runs from its checkout, else the copies a wheel carries as
package data (kvlib/_resources, made by setup.py at build time from the same folders). `init_project` writes them
into a folder, so an installed kvlib can be run anywhere (`kvlib init DIR`)."""
from __future__ import annotations

import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1]
CHECKOUT = PACKAGE.parent  # the repository, when kvlib runs from it
PACKAGED = PACKAGE / "_resources"  # in an installed wheel
FOLDERS = ("notebooks", "params")


def _is_project(folder: Path) -> bool:
    return all((folder / name).is_dir() for name in FOLDERS)


def resource_root() -> Path:
    """The folder holding notebooks/ and params/: the checkout kvlib runs from, else the wheel's copies."""
    if _is_project(CHECKOUT):
        return CHECKOUT
    if _is_project(PACKAGED):
        return PACKAGED
    raise FileNotFoundError(f"kvlib's notebooks and params are neither in {CHECKOUT} (a checkout) nor in {PACKAGED} "
                            f"(an installed wheel); reinstall kvlib")


def resource_path(relative: str | Path) -> Path:
    """A file of the notebooks or params, e.g. `params/paper_reference.yaml`."""
    return resource_root() / relative


def resource_files() -> list[Path]:
    """Every notebook and params file, relative to resource_root()."""
    root = resource_root()
    files = sorted((root / "notebooks").glob("*.ipynb")) + sorted(p for p in (root / "params").rglob("*") if p.is_file())
    return [p.relative_to(root) for p in files if "__pycache__" not in p.parts]


def init_project(dest: str | Path, force: bool = False) -> list[Path]:
    """Write the notebooks and params into `dest` (created if missing), so `kvlib reproduce` runs there; returns the
    files written. An existing file is left as it is unless `force` (then it is replaced)."""
    dest, root = Path(dest), resource_root()
    if dest.resolve() == root.resolve():
        return []
    written = []
    for relative in resource_files():
        target = dest / relative
        if target.exists() and not force:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / relative, target)
        written.append(relative)
    return written
