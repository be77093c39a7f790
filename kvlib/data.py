"""Where evaluation and source data live. kvlib never ships data: it reads a data directory laid out
like the official releases (see README "Data"). Loaders for each benchmark live here too."""
from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "KVLIB_DATA_DIR"
# A checkout of this repo next to a `shared/` folder (this project's CI layout) finds its data there.
_SIBLING = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """The data directory: `explicit`, else $KVLIB_DATA_DIR, else ../shared/data beside the repo."""
    for source, candidate in (("argument", explicit), (DATA_ENV, os.environ.get(DATA_ENV))):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"data directory from {source} does not exist: {path}")
            return path
    if _SIBLING.is_dir():
        return _SIBLING
    raise FileNotFoundError(
        f"no data directory: pass one, set ${DATA_ENV}, or place the data at {_SIBLING}. "
        "README.md, section 'Data', lists where to download each official file."
    )
