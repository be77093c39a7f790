"""The data registry (`kvlib/engine/datasets.yaml`): every input file kvlib reads, its official source (a URL pinned
to a commit or release, or a Hugging Face dataset repo), its size and checksum, its licence, what kvlib uses it
for and where it lands in the data directory (kvlib.engine.data.resolve_data_dir).

- `load_registry`, `get`: the registry as `Dataset` records (unknown names fail listing the known ones).
- `status` / `format_status` (`kvlib data status`): per dataset present / missing / subset (with counts) /
  substitute / checksum mismatch, and the command that fixes it.
- `fetch` (`kvlib data fetch`): downloads what is missing with a progress bar, verifies size and checksum,
  and installs each file atomically: it is written beside its target as `.<name>.partial` and renamed only
  once verified, so the data directory never holds a half-written file under a real name, and a fetch that
  was interrupted simply starts that file again. `mirror` (or $KVLIB_DATA_MIRROR) replaces every source by
  `<mirror>/<path in the data directory>`: a copy of a data directory served over HTTP.
- `needs_for` / `missing_for` / `check_inputs`: what each notebook reads, given its validated params, and the
  one message `kvlib reproduce` stops with before any training or evaluation when something is missing.
- `registry_table` / `update_readme`: README.md's "Data" table, generated from the registry.

The registry also lists files kvlib accepts in place of the official ones (`substitutes`, e.g. the
441-question MDQA subset of the offline data directory); the loaders say which one they read and how many
records it holds (kvlib.engine.data.mdqa_paths, kvlib.tasks.mdqa.build_eval_sets, kvlib.tasks.general.LoadReport).
"""
from __future__ import annotations

import difflib
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import requests
import yaml

from kvlib.engine.data import data_dir_for_writing, resolve_data_dir
from kvlib.engine.io import marked_block, replace_marked_block

REGISTRY_FILE = Path(__file__).with_name("datasets.yaml")
MIRROR_ENV = "KVLIB_DATA_MIRROR"
PARTIAL_SUFFIX = ".partial"
DOWNLOAD_TIMEOUT = 60  # seconds without data before a download counts as failed
_CHUNK = 1 << 20


class DataError(Exception):
    """A data problem with a one-line message (unknown dataset, failed download, bad registry entry)."""


class UnknownDataset(DataError):
    pass


class FetchError(DataError):
    pass


class NotOnServer(FetchError):
    """The server answered 404: it does not hold this file (a mirror may hold a substitute instead)."""


# ---------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class FileSpec:
    """One file: `path` in the data directory; `src` its name under the dataset's url_base or hub repo, or
    `url` in full; `size` in bytes and `sha256` / `git_sha1` (the git blob id at the pinned commit) where
    known; `records` where the file alone holds a known number of records."""

    path: str
    src: str | None = None
    url: str | None = None
    size: int | None = None
    sha256: str | None = None
    git_sha1: str | None = None
    records: int | None = None

    @property
    def checksum(self) -> str:
        if self.sha256:
            return f"sha256 {self.sha256}"
        if self.git_sha1:
            return f"git blob {self.git_sha1}"
        return "no checksum in the registry"


@dataclass(frozen=True)
class Substitute:
    """Files kvlib reads in place of a dataset's official ones (kind: subset | reformatted)."""

    title: str
    kind: str
    records: int
    files: tuple[FileSpec, ...]


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    used_for: str
    licence: str
    source: str
    records: int
    coverage: str
    files: tuple[FileSpec, ...]
    substitutes: tuple[Substitute, ...] = ()
    optional: bool = False
    url_base: str | None = None
    hub_repo: str | None = None
    hub_revision: str | None = None
    note: str = ""

    def url(self, spec: FileSpec, mirror: str | None = None) -> str:
        """Where `spec` is downloaded from: the mirror's copy, its own URL, url_base + src, or the hub."""
        if mirror:
            return f"{mirror.rstrip('/')}/{spec.path}"
        if spec.url:
            return spec.url
        if self.url_base:
            return self.url_base + spec.src
        revision = self.hub_revision or "main"
        return f"https://huggingface.co/datasets/{self.hub_repo}/resolve/{revision}/{spec.src}"

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if None in sizes else sum(sizes)


_FILE_KEYS = {"path", "src", "url", "size", "sha256", "git_sha1", "records"}
_DATASET_KEYS = {"title", "used_for", "licence", "source", "records", "coverage", "files", "substitutes",
                 "optional", "url_base", "hub", "note"}


def _file(raw: Any, where: str, needs_source: bool) -> FileSpec:
    if not isinstance(raw, Mapping) or not isinstance(raw.get("path"), str):
        raise DataError(f"{where}: expected a mapping with a path, got {raw!r}")
    unknown = set(raw) - _FILE_KEYS
    if unknown:
        raise DataError(f"{where}: unknown keys {sorted(unknown)}")
    path = raw["path"]
    if Path(path).is_absolute() or ".." in Path(path).parts:
        raise DataError(f"{where}: path must be relative to the data directory, got {path!r}")
    spec = FileSpec(**{k: raw.get(k) for k in _FILE_KEYS})
    if needs_source and not (spec.src or spec.url):
        raise DataError(f"{where}: {path} needs src (under url_base or the hub repo) or url")
    for key, length in (("sha256", 64), ("git_sha1", 40)):
        value = getattr(spec, key)
        if value is not None and (len(value) != length or any(c not in "0123456789abcdef" for c in value)):
            raise DataError(f"{where}: {key} must be {length} lower-case hex digits, got {value!r}")
    return spec


def _dataset(name: str, raw: Any, where: str) -> Dataset:
    if not isinstance(raw, Mapping):
        raise DataError(f"{where}: expected a mapping, got {raw!r}")
    unknown = set(raw) - _DATASET_KEYS
    if unknown:
        raise DataError(f"{where}: unknown keys {sorted(unknown)}")
    missing = [k for k in ("title", "used_for", "licence", "source", "records", "coverage", "files") if k not in raw]
    if missing:
        raise DataError(f"{where}: missing {missing}")
    hub = raw.get("hub") or {}
    if raw.get("url_base") and hub:
        raise DataError(f"{where}: give url_base or hub, not both")
    files = tuple(_file(f, f"{where}.files[{i}]", True) for i, f in enumerate(raw["files"] or ()))
    if not files:
        raise DataError(f"{where}: no files")
    if any(f.src and not (f.url or raw.get("url_base") or hub) for f in files):
        raise DataError(f"{where}: a file with src needs the dataset's url_base or hub")
    substitutes = []
    for i, sub in enumerate(raw.get("substitutes") or ()):
        sw = f"{where}.substitutes[{i}]"
        if not isinstance(sub, Mapping) or not {"title", "kind", "records", "files"} <= set(sub):
            raise DataError(f"{sw}: expected title, kind, records and files")
        if sub["kind"] not in ("subset", "reformatted"):
            raise DataError(f"{sw}: kind must be subset or reformatted, got {sub['kind']!r}")
        substitutes.append(Substitute(sub["title"], sub["kind"], int(sub["records"]),
                                      tuple(_file(f, f"{sw}.files[{j}]", False) for j, f in enumerate(sub["files"]))))
    return Dataset(name=name, title=raw["title"], used_for=raw["used_for"], licence=raw["licence"],
                   source=raw["source"], records=int(raw["records"]), coverage=str(raw["coverage"]), files=files,
                   substitutes=tuple(substitutes), optional=bool(raw.get("optional", False)),
                   url_base=raw.get("url_base"), hub_repo=hub.get("repo"), hub_revision=hub.get("revision"),
                   note=raw.get("note", ""))


def load_registry(path: str | Path | None = None) -> dict[str, Dataset]:
    """The registry (default: kvlib/engine/datasets.yaml), validated; a bad entry raises DataError naming it."""
    if path is None:
        return dict(_default_registry())
    return _read_registry(Path(path))


@lru_cache(maxsize=1)
def _default_registry() -> dict[str, Dataset]:
    return _read_registry(REGISTRY_FILE)


def _read_registry(path: Path) -> dict[str, Dataset]:

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, Mapping) or not isinstance(data.get("datasets"), Mapping):
        raise DataError(f"{path}: expected a mapping with `datasets`")
    registry = {str(name): _dataset(str(name), raw, f"{path.name}:{name}") for name, raw in data["datasets"].items()}
    paths: dict[str, str] = {}
    for ds in registry.values():
        for spec in list(ds.files) + [f for s in ds.substitutes for f in s.files]:
            if spec.path in paths and paths[spec.path] != ds.name:
                raise DataError(f"{path.name}: {spec.path} is listed by both {paths[spec.path]} and {ds.name}")
            paths[spec.path] = ds.name
    return registry


def get(name: str, registry: Mapping[str, Dataset] | None = None) -> Dataset:
    registry = load_registry() if registry is None else registry
    if name not in registry:

        close = difflib.get_close_matches(name, list(registry), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UnknownDataset(f"unknown dataset {name!r}{hint}; known: {', '.join(registry)}")
    return registry[name]


# ---------------------------------------------------------------------------------------------- checking


def digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, in one pass."""
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha256.update(chunk)
            sha1.update(chunk)
    return sha256.hexdigest(), sha1.hexdigest()


def file_problem(path: Path, spec: FileSpec, verify: bool = True) -> str | None:
    """None when `path` is the registry's file; else what is wrong ("missing", a size or checksum mismatch).
    verify=False compares sizes only (fast)."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if spec.size is not None and size != spec.size:
        return f"size {size} bytes, expected {spec.size}"
    if verify and (spec.sha256 or spec.git_sha1):
        sha256, sha1 = digests(path)
        if spec.sha256 and sha256 != spec.sha256:
            return f"sha256 {sha256}, expected {spec.sha256}"
        if spec.git_sha1 and sha1 != spec.git_sha1:
            return f"git blob {sha1}, expected {spec.git_sha1}"
    return None


def _complete(root: Path, files: Sequence[FileSpec], verify: bool) -> list[tuple[FileSpec, str]]:
    return [(f, p) for f in files if (p := file_problem(root / f.path, f, verify)) is not None]


@dataclass
class DatasetStatus:
    """One dataset in one data directory. state: present | subset | substitute | checksum mismatch | missing;
    `verified`: every official file matched a checksum; `fix`: the command that makes it complete."""

    name: str
    state: str
    detail: str
    fix: str | None = None
    optional: bool = False
    verified: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """kvlib can read it (the official files, or a subset/substitute it accepts)."""
        return self.state in ("present", "subset", "substitute")


def fetch_command(names: Iterable[str], data_dir: str | Path | None = None) -> str:
    cmd = "kvlib data fetch " + " ".join(names)
    return cmd + (f" --data-dir {data_dir}" if data_dir is not None else "")


def dataset_status(ds: Dataset, root: Path | None, verify: bool = True,
                   data_dir_arg: str | Path | None = None) -> DatasetStatus:
    """The state of `ds` in the data directory `root` (None: there is none)."""
    fix = fetch_command([ds.name], data_dir_arg)
    where = "" if root is None else f" in {root}"
    if root is None:
        return DatasetStatus(ds.name, "missing", "no data directory", fix, ds.optional)
    problems = _complete(root, ds.files, verify)
    n_files = f"{len(ds.files)} file{'s' * (len(ds.files) != 1)}"
    if not problems:
        checked = all(f.sha256 or f.git_sha1 for f in ds.files)
        how = "checksums verified" if verify and checked else ("sizes checked" if not verify else
                                                                "present, NOT verified: no checksum in the registry")
        return DatasetStatus(ds.name, "present", f"{ds.records} records ({ds.coverage}), {n_files}, {how}", None,
                             ds.optional, verify and checked)
    mismatched = [f"{f.path}: {p}" for f, p in problems if p != "missing"]
    if mismatched:
        return DatasetStatus(ds.name, "checksum mismatch", "; ".join(mismatched), fix, ds.optional,
                             problems=mismatched)
    present = len(ds.files) - len(problems)
    for sub in ds.substitutes:
        if not _complete(root, sub.files, verify):
            counts = (f"{sub.records} of {ds.records} records" if sub.kind == "subset"
                      else f"{sub.records} records, reformatted")
            more = f" (+{len(sub.files) - 1} files)" if len(sub.files) > 1 else ""
            return DatasetStatus(ds.name, "subset" if sub.kind == "subset" else "substitute",
                                 f"{counts}: {sub.files[0].path}{more}", fix, ds.optional)
    detail = (f"{present} of {len(ds.files)} files{where}" if present else f"not{where}")
    return DatasetStatus(ds.name, "missing", detail, fix, ds.optional,
                         problems=[f"{f.path}: missing" for f, _ in problems])


def status(names: Sequence[str] | None = None, data_dir: str | Path | None = None, verify: bool = True,
           registry: Mapping[str, Dataset] | None = None) -> tuple[Path | None, list[DatasetStatus]]:
    """(data directory, the status of each named dataset, default all)."""

    registry = load_registry() if registry is None else registry
    chosen = [get(n, registry) for n in names] if names else list(registry.values())
    try:
        root = resolve_data_dir(data_dir)
    except FileNotFoundError:
        root = None
    return root, [dataset_status(ds, root, verify, data_dir) for ds in chosen]


def format_status(root: Path | None, statuses: Sequence[DatasetStatus]) -> str:
    lines = [f"data directory: {root if root is not None else 'none (kvlib data fetch creates one)'}"]
    width = max((len(s.name) for s in statuses), default=8)
    states = [s.state + (" (optional)" if s.optional and s.state == "missing" else "") for s in statuses]
    swidth = max((len(s) for s in states), default=8)
    for s, state in zip(statuses, states):
        line = f"  {s.name:<{width}}  {state:<{swidth}}  {s.detail}"
        if s.fix:
            line += f"  -> {'the official files: ' if s.usable else ''}{s.fix}"
        lines.append(line)
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- fetching


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _partial(target: Path) -> Path:
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def _verify_download(ds: Dataset, spec: FileSpec, tmp: Path, url: str) -> str:
    """Checks a downloaded file against the registry; returns how it was verified or raises FetchError."""
    size = tmp.stat().st_size
    if spec.size is not None and size != spec.size:
        raise FetchError(f"{ds.name}: {url} gave {size} bytes, expected {spec.size}; nothing was installed")
    sha256, sha1 = digests(tmp)
    if spec.sha256 and sha256 != spec.sha256:
        raise FetchError(f"{ds.name}: checksum mismatch for {url}: sha256 {sha256}, expected {spec.sha256}; "
                         f"nothing was installed")
    if spec.git_sha1 and sha1 != spec.git_sha1:
        raise FetchError(f"{ds.name}: checksum mismatch for {url}: git blob {sha1}, expected {spec.git_sha1}; "
                         f"nothing was installed")
    if spec.sha256:
        return "sha256 verified"
    if spec.git_sha1:
        return f"git blob verified; sha256 {sha256} (pin it in kvlib/engine/datasets.yaml)"
    return f"NOT verified (no checksum in the registry): sha256 {sha256}, {size} bytes (pin them in kvlib/engine/datasets.yaml)"


def _by_hand(ds: Dataset, spec: FileSpec, target: Path) -> str:
    return (f"without network, download it on a machine that has one and place it at {target} "
            f"({spec.checksum}), then run `kvlib data status`")


def _http_download(ds: Dataset, spec: FileSpec, url: str, tmp: Path, target: Path, progress: bool,
                   timeout: float) -> None:
    import pooch

    try:
        pooch.HTTPDownloader(progressbar=progress, timeout=timeout)(url, str(tmp), None)
    except requests.exceptions.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else "?"
        reason = exc.response.reason if exc.response is not None else ""
        error = NotOnServer if code == 404 else FetchError
        raise error(f"{ds.name}: {url} answered {code} {reason}; nothing was installed "
                    f"({target} is unchanged)") from None
    except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
        raise FetchError(f"{ds.name}: the download of {url} broke off ({_one_line(exc, 120)}); nothing was "
                         f"installed, run the same command again") from None
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        raise FetchError(f"{ds.name}: cannot reach {url} ({_one_line(exc, 120)}); "
                         f"{_by_hand(ds, spec, target)}") from None
    except requests.exceptions.RequestException as exc:
        raise FetchError(f"{ds.name}: downloading {url} failed ({_one_line(exc, 120)}); nothing was installed") from None


def _hub_download(ds: Dataset, spec: FileSpec, tmp: Path, target: Path, progress: bool,
                  hub_cache: str | Path | None) -> str:
    """Downloads through huggingface_hub (its cache, endpoint $HF_ENDPOINT, offline mode $HF_HUB_OFFLINE) and
    copies the file to `tmp`; returns the commit it came from."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"HF dataset {ds.hub_repo}, file {spec.src}, revision {ds.hub_revision or 'main'}"
    disabled = None
    if not progress:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

        disabled = are_progress_bars_disabled()
        disable_progress_bars()
    try:
        cached = hf_hub_download(ds.hub_repo, spec.src, repo_type="dataset", revision=ds.hub_revision,
                                 cache_dir=hub_cache)
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:  # (the first is an EntryNotFoundError)
        raise FetchError(f"{ds.name}: cannot reach the hub for {where} and it is not in the local hub cache "
                         f"({type(exc).__name__}); {_by_hand(ds, spec, target)}") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise FetchError(f"{ds.name}: {where} not found ({type(exc).__name__}); nothing was installed") from None
    except (HfHubHTTPError, OSError) as exc:
        raise FetchError(f"{ds.name}: downloading {where} failed ({_one_line(exc, 120)}); "
                         f"{_by_hand(ds, spec, target)}") from None
    finally:
        if disabled is False:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()
    shutil.copyfile(cached, tmp)
    parts = Path(cached).parts
    return parts[parts.index("snapshots") + 1] if "snapshots" in parts else "?"


def fetch_file(ds: Dataset, spec: FileSpec, root: Path, mirror: str | None = None, progress: bool = True,
               hub_cache: str | Path | None = None, timeout: float = DOWNLOAD_TIMEOUT,
               out: Callable[[str], None] = print) -> Path:
    """Download one file into `root`, verify it and move it into place (see the module docstring)."""
    target = root / spec.path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _partial(target)
    hub = ds.hub_repo is not None and not mirror and not spec.url
    url = f"hf://datasets/{ds.hub_repo}/{spec.src}" if hub else ds.url(spec, mirror)
    out(f"{ds.name}: {spec.path} <- {url}")
    try:
        tmp.unlink(missing_ok=True)  # left by an interrupted fetch
        commit = None
        if hub:
            commit = _hub_download(ds, spec, tmp, target, progress, hub_cache)
        else:
            _http_download(ds, spec, url, tmp, target, progress, timeout)
        verified = _verify_download(ds, spec, tmp, url)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    out(f"  {verified}" + (f"; hub revision {commit}" if commit and not ds.hub_revision else "") + f" -> {target}")
    return target


def fetch(names: Sequence[str] | None = None, data_dir: str | Path | None = None, mirror: str | None = None,
          progress: bool = True, include_optional: bool = False, registry: Mapping[str, Dataset] | None = None,
          hub_cache: str | Path | None = None, timeout: float = DOWNLOAD_TIMEOUT,
          out: Callable[[str], None] = print) -> list[Path]:
    """Fetch the official files of the named datasets (default: every non-optional one; include_optional adds
    the rest) that are missing or do not match the registry; files already in place are left alone. Returns
    the files installed. Raises UnknownDataset or FetchError (one line; nothing half-written is left)."""

    registry = load_registry() if registry is None else registry
    chosen = ([get(n, registry) for n in dict.fromkeys(names)] if names
              else [ds for ds in registry.values() if include_optional or not ds.optional])
    mirror = mirror if mirror is not None else (os.environ.get(MIRROR_ENV) or None)
    root = data_dir_for_writing(data_dir)
    installed: list[Path] = []
    for ds in chosen:
        todo = [f for f in ds.files if file_problem(root / f.path, f) is not None]
        if not todo:
            out(f"{ds.name}: present ({len(ds.files)} file{'s' * (len(ds.files) != 1)})")
            continue
        try:
            for spec in todo:
                installed.append(fetch_file(ds, spec, root, mirror, progress, hub_cache, timeout, out))
        except NotOnServer:
            if not mirror:
                raise
            installed += _fetch_substitute(ds, root, mirror, progress, timeout, out)
    out(f"data directory {root}: {len(installed)} file{'s' * (len(installed) != 1)} installed")
    return installed


def _fetch_substitute(ds: Dataset, root: Path, mirror: str, progress: bool, timeout: float,
                      out: Callable[[str], None]) -> list[Path]:
    """A mirror that lacks `ds`'s official files (a copy of an offline data directory holding a documented subset):
    the first substitute whose files it holds, installed and verified like official files. Raises NotOnServer
    when it holds none of them."""
    for sub in ds.substitutes:
        todo = [f for f in sub.files if file_problem(root / f.path, f) is not None]
        try:
            installed = [fetch_file(ds, spec, root, mirror, progress, None, timeout, out) for spec in todo]
        except NotOnServer:
            continue
        out(f"{ds.name}: the mirror has no official files; installed its {sub.kind} instead: {sub.title} "
            f"({sub.records} records)")
        return installed
    raise NotOnServer(f"{ds.name}: the mirror {mirror} holds neither its official files nor a substitute "
                      f"({', '.join(f.path for f in ds.files)}); nothing was installed")


# ------------------------------------------------------------------------------- what each notebook reads


def data_root(data_dir: str | None) -> Path | None:

    try:
        return resolve_data_dir(data_dir)
    except FileNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- README


TABLE_START = "<!-- data-registry:start (kvlib data table --update README.md) -->"
TABLE_END = "<!-- data-registry:end -->"


def _size_text(size: int | None) -> str:
    if size is None:
        return "?"
    return f"{size / 1e6:.1f} MB" if size >= 100_000 else f"{size / 1e3:.0f} kB"


def _checksums_text(ds: Dataset) -> str:
    sha = sum(bool(f.sha256) for f in ds.files)
    blob = sum(bool(f.git_sha1) and not f.sha256 for f in ds.files)
    parts = []
    if sha:
        parts.append("sha256" if len(ds.files) == 1 else f"sha256 ({sha} of {len(ds.files)})")
    if blob:
        parts.append("git blob" if len(ds.files) == 1 else f"git blob ({blob} of {len(ds.files)})")
    return ", ".join(parts) or "none yet"


def _where(ds: Dataset) -> str:
    paths = [f.path for f in ds.files]
    if len(paths) == 1:
        return f"`{paths[0]}`"
    common = os.path.commonpath(paths)
    return f"`{common}/` ({len(paths)} files)"


def registry_table(registry: Mapping[str, Dataset] | None = None) -> str:
    """The registry as README.md's Markdown table (between TABLE_START and TABLE_END)."""
    registry = load_registry() if registry is None else registry
    rows = ["| dataset | used for | official source (pinned) | in the data directory | size, checksum | records | "
            "licence | also accepted |",
            "|---|---|---|---|---|---|---|---|"]
    for ds in registry.values():
        name = f"`{ds.name}`" + (" (optional)" if ds.optional else "")
        accepted = "; ".join(f"{s.kind}: {s.records} records, `{s.files[0].path}`"
                             + (f" (+{len(s.files) - 1})" if len(s.files) > 1 else "") for s in ds.substitutes)
        source = ds.source + (f" ({ds.note})" if ds.note else "")
        records = str(ds.records) if ds.coverage == "complete" else f"{ds.records} ({ds.coverage})"
        cells = [name, ds.used_for, source, _where(ds), f"{_size_text(ds.size)}, {_checksums_text(ds)}", records,
                 ds.licence, accepted or "-"]
        rows.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(rows) + "\n"


def update_readme(readme: str | Path, registry: Mapping[str, Dataset] | None = None) -> bool:
    """Rewrite the registry table between the markers of `readme`; returns whether the file changed."""
    try:
        return replace_marked_block(readme, TABLE_START, TABLE_END, registry_table(registry))
    except (OSError, ValueError) as exc:
        raise DataError(str(exc)) from None


def readme_block(readme: str | Path) -> str:
    """The text between the registry markers of `readme` (what update_readme writes)."""
    return marked_block(readme, TABLE_START, TABLE_END)


# ---------------------------------------------------------------------------------------------- CLI


