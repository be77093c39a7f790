"""Small file helpers every layer uses: sha256 of files (cached) and texts, atomic writes, the one JSON style.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable

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



def replace_marked_block(path: str | Path, start: str, end: str, body: str) -> bool:
    """Replace the text between the marker lines `start` and `end` of the file at `path` with `body` (generated
    README sections: the data table, the reproduction maps, the benchmark table); returns whether the file
    changed. The markers must already be there: where a section belongs is the author's choice. Raises
    FileNotFoundError or ValueError, which callers turn into their own one-line errors."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{path}: no markers; add the lines `{start}` and `{end}` where the section belongs")
    head, rest = text.split(start, 1)
    new = f"{head}{start}\n{body}{end}{rest.split(end, 1)[1]}"
    if new != text:
        atomic_write_text(path, new)
    return new != text


def marked_block(path: str | Path, start: str, end: str) -> str:
    """The text between the marker lines `start` and `end` of the file at `path` (what replace_marked_block wrote)."""
    return Path(path).read_text(encoding="utf-8").split(start, 1)[1].split(end, 1)[0].removeprefix("\n")
