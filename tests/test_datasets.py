"""The data registry (kvlib/engine/datasets.yaml) and `kvlib data status|fetch|table`, offline: downloads go to a
loopback HTTP server in a thread (127.0.0.1, every request bounded by a short timeout) that serves small
generated fixture files and, for real registry entries, the files of the offline data directory; the hub
dataset comes from a pre-populated huggingface_hub cache. The check before compute runs `kvlib reproduce
--profile smoke` on an empty data directory (params validation only: no model, no kernel)."""
from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import threading
from pathlib import Path

import pytest

from kvlib.pipeline import cli
from kvlib.engine import data
from kvlib.engine import datasets
from kvlib.tasks import general
from kvlib.pipeline import data_needs
from kvlib.pipeline import plan

REPO = Path(__file__).resolve().parents[1]
SHARED = data._SIBLING
HAVE_SHARED = (SHARED / "mdqa" / "qa_data" / "nq-open-oracle.jsonl.gz").is_file()
needs_shared = pytest.mark.skipif(not HAVE_SHARED, reason=f"offline data directory {SHARED} not available")


def _sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


# ---------------------------------------------------------------------------------------------- registry


def test_registry_entries_are_complete_and_pinned():
    registry = datasets.load_registry()
    assert {"mdqa-oracle", "mdqa-20docs", "mdqa-random", "kv-retrieval-75", "flenqa", "mmlu", "hellaswag", "gsm8k",
            "triviaqa", "nq_open", "niah-essays", "hotpotqa", "2wikimultihopqa", "squad"} <= set(registry)
    for ds in registry.values():
        assert ds.title and ds.used_for and ds.licence and ds.source and ds.records > 0, ds.name
        for spec in ds.files:
            url = ds.url(spec)
            if "raw.githubusercontent.com" in url:  # a GitHub file is pinned to a commit
                assert re.search(r"/[0-9a-f]{40}/", url), url
                assert spec.git_sha1 or spec.sha256, url
            elif ds.hub_repo is None:
                assert "unversioned" in ds.source, ds.name  # said, not hidden
    assert datasets.get("triviaqa").hub_repo == "mandarjoshi/trivia_qa"


def test_registry_paths_are_where_the_loaders_read():
    """Every registry path (official and substitutes) is one the code reads: a benchmark's default files, the
    baseline sources, the MDQA and key-value layouts."""
    from kvlib.tasks import baseline_sets as baselines

    registry = datasets.load_registry()
    for task, name in data_needs.GENERAL_DATASETS.items():
        ds = registry[name]
        spec = general.TASKS[task]
        paths = [f.path for f in ds.files] + [f.path for s in ds.substitutes for f in s.files]
        for path in paths:
            assert any(path == rel or path.startswith(rel + "/") for rel in spec.default_files), (task, path)
        # the complete official file comes first, so it is read when present
        official = ds.files[0].path
        first = next(i for i, rel in enumerate(spec.default_files) if official == rel or official.startswith(rel + "/"))
        assert all(first <= next(i for i, rel in enumerate(spec.default_files) if p == rel or p.startswith(rel + "/"))
                   for p in paths)
    for name, files in baselines._MULTIHOP_FILES.items():
        assert set(files) == {f.path for f in registry[name].files}
    assert [f.path for f in registry["squad"].files] == [baselines._SQUAD_FILE]
    assert {str(Path(f.path).parent) for f in registry["niah-essays"].files} == {baselines._ESSAYS_DIR}
    assert registry["mdqa-20docs"].files[0].path == "mdqa/" + data._OFFICIAL_20DOCS.format(0)
    assert registry["mdqa-20docs"].substitutes[0].files[0].path == "mdqa/" + data._SUBSET_20DOCS.format(0)
    for keys in (75, 140, 300):
        assert registry[f"kv-retrieval-{keys}"].files[0].path == f"mdqa/kv_retrieval_data/kv-retrieval-{keys}_keys.jsonl.gz"
    for kind, names in data_needs.BASELINE_SOURCES.items():
        assert kind in baselines.KINDS and set(names) <= set(registry)


def test_bad_registry_entries_fail_naming_them(tmp_path):
    bad = tmp_path / "reg.yaml"
    bad.write_text("datasets:\n  x: {title: t, used_for: u, licence: l, source: s, records: 1, coverage: complete,\n"
                   "      files: [{path: ../escape.txt, url: 'http://127.0.0.1:9/x'}]}\n")
    with pytest.raises(datasets.DataError, match="reg.yaml:x.files.0.: path must be relative"):
        datasets.load_registry(bad)
    bad.write_text("datasets:\n  x: {title: t, used_for: u, licence: l, source: s, records: 1, coverage: complete,\n"
                   "      files: [{path: a.txt, url: 'http://127.0.0.1:9/x', sha256: abc}]}\n")
    with pytest.raises(datasets.DataError, match="sha256 must be 64"):
        datasets.load_registry(bad)


def test_readme_data_table_is_the_generated_one():
    assert datasets.readme_block(REPO / "README.md") == datasets.registry_table(), (
        "README.md's data table is stale: run `kvlib data table --update README.md`")


@needs_shared
def test_status_of_the_offline_data_directory():
    root, statuses = datasets.status(data_dir=SHARED)
    by_name = {s.name: s for s in statuses}
    assert root == SHARED
    for s in statuses:
        if not s.optional:
            assert s.usable, s  # present, a subset or a substitute kvlib reads: the profiles run on it
    assert by_name["mdqa-oracle"].state == "present" and by_name["mdqa-oracle"].verified
    assert by_name["mmlu"].state == "present" and by_name["mmlu"].verified
    assert by_name["mdqa-20docs"].state == "subset" and "441 of 2655" in by_name["mdqa-20docs"].detail
    assert by_name["triviaqa"].state == "subset" and "1000 of 11313" in by_name["triviaqa"].detail
    assert by_name["hellaswag"].state == "substitute"
    assert by_name["mdqa-20docs"].fix == f"kvlib data fetch mdqa-20docs --data-dir {SHARED}"
    assert by_name["flenqa"].state == "missing" and by_name["flenqa"].optional
    text = datasets.format_status(root, statuses)
    assert "441 of 2655 records" in text and "-> the official files: kvlib data fetch mdqa-20docs --data-dir" in text


# ---------------------------------------------------------------------------------------------- loopback server


class _Handler(http.server.BaseHTTPRequestHandler):
    """/files/<rel>: the fixture files; /shared/<rel>: the offline data directory; /cut/<rel>: announces the
    whole file, sends half of it and drops the connection; anything else: 404."""

    roots: dict[str, Path] = {}
    requests: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.requests.append(self.path)
        prefix, _, rel = self.path.lstrip("/").partition("/")
        root = self.roots.get("files" if prefix == "cut" else prefix)
        path = (root / rel) if root is not None else None
        if path is None or ".." in Path(rel).parts or not path.is_file():
            self.send_error(404, "Not Found")
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if prefix == "cut":
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    files = tmp_path_factory.mktemp("served")
    (files / "toy").mkdir()
    (files / "toy" / "a.txt").write_bytes(b"alpha\n" * 2000)
    (files / "toy" / "b.jsonl").write_bytes(b'{"question": "q", "answer": ["a"]}\n' * 50)
    _Handler.roots = {"files": files, "shared": SHARED}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.timeout = 5
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", files
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the with-block ends: nothing listens there


def _toy_registry(tmp_path: Path, base: str, files: Path, **overrides) -> dict:
    a, b = (files / "toy" / "a.txt").read_bytes(), (files / "toy" / "b.jsonl").read_bytes()
    entry = {"title": "toy", "used_for": "tests", "licence": "CC0", "source": "loopback", "records": 50,
             "coverage": "complete", "url_base": f"{base}/files/",
             "files": [{"path": "toy/a.txt", "src": "toy/a.txt", "size": len(a), "sha256": _sha256(a)},
                       {"path": "toy/nested/b.jsonl", "src": "toy/b.jsonl", "size": len(b), "sha256": _sha256(b)}]}
    entry.update(overrides)
    registry = tmp_path / "registry.yaml"
    import yaml

    registry.write_text(yaml.safe_dump({"datasets": {"toy": entry}}))
    return datasets.load_registry(registry)


def _leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_fetch_installs_verified_files_where_the_registry_says(server, tmp_path, capsys):
    base, files = server
    registry = _toy_registry(tmp_path, base, files)
    root = tmp_path / "data"
    datasets.fetch(["toy"], root, registry=registry, timeout=5)
    assert (root / "toy" / "a.txt").read_bytes() == (files / "toy" / "a.txt").read_bytes()
    assert (root / "toy" / "nested" / "b.jsonl").is_file()
    assert _leftovers(root) == ["toy/a.txt", "toy/nested/b.jsonl"]  # no temp files left beside them
    out = capsys.readouterr()
    assert "sha256 verified" in out.out and "100%" in out.err  # progress bar (tqdm, on stderr)
    _, (st,) = datasets.status(["toy"], root, registry=registry)
    assert (st.state, st.verified, st.fix) == ("present", True, None)
    # a second fetch finds everything in place and downloads nothing
    before = len(_Handler.requests)
    datasets.fetch(["toy"], root, registry=registry, timeout=5)
    assert len(_Handler.requests) == before


@needs_shared
def test_cli_fetch_real_entries_from_a_mirror_of_the_offline_data_directory(server, tmp_path, capfd):
    base, _ = server
    root = tmp_path / "data"
    rc = cli.main(["data", "fetch", "nq_open", "kv-retrieval-75", "mdqa-20docs", "--data-dir", str(root),
                   "--mirror", f"{base}/shared"])
    assert rc == 0
    subset = "mdqa/derived_20docs_first441/nq-open-20_total_documents_gold_at_0.first441.jsonl.gz"
    assert (root / subset).read_bytes() == (SHARED / subset).read_bytes()  # the mirror holds the subset only
    out = capfd.readouterr()
    assert "100%" in out.err
    for rel in ("nq_open/NQ-open.dev.jsonl", "mdqa/kv_retrieval_data/kv-retrieval-75_keys.jsonl.gz"):
        assert (root / rel).read_bytes() == (SHARED / rel).read_bytes()
    assert cli.main(["data", "status", "nq_open", "kv-retrieval-75", "gsm8k", "--data-dir", str(root)]) == 0
    text = capfd.readouterr().out
    assert re.search(r"nq_open\s+present .*checksums verified", text)
    assert re.search(r"gsm8k\s+missing .*-> kvlib data fetch gsm8k --data-dir", text)
    items, report = general.load_nq_open(root / "nq_open/NQ-open.dev.jsonl")
    assert report.records == 3610


def test_a_mirror_without_the_official_files_gives_the_substitute(server, tmp_path, capsys):
    """A mirror of an offline data directory holds a documented subset, not the official file: fetch installs the
    first substitute it holds (verified), says so, and status reads it as that subset; a mirror holding neither
    fails with one line and installs nothing."""
    base, files = server
    b = (files / "toy" / "b.jsonl").read_bytes()
    sub = {"title": "the b file alone", "kind": "subset", "records": 50,
           "files": [{"path": "toy/b.jsonl", "size": len(b), "sha256": _sha256(b)}]}
    registry = _toy_registry(tmp_path, base, files, substitutes=[sub])
    root = tmp_path / "data"
    datasets.fetch(["toy"], root, mirror=f"{base}/files", registry=registry, timeout=5, progress=False)
    # toy/a.txt is served (installed, verified), toy/nested/b.jsonl is not: the subset's file comes instead
    assert _leftovers(root) == ["toy/a.txt", "toy/b.jsonl"]
    assert "installed its subset instead: the b file alone (50 records)" in capsys.readouterr().out
    _, (st,) = datasets.status(["toy"], root, registry=registry)
    assert st.state == "subset"
    missing = dict(sub, files=[{"path": "toy/none.jsonl", "size": 1, "sha256": "0" * 64}])
    registry = _toy_registry(tmp_path, base, files, substitutes=[missing])
    empty = tmp_path / "empty"
    with pytest.raises(datasets.NotOnServer, match="holds neither its official files nor a substitute"):
        datasets.fetch(["toy"], empty, mirror=f"{base}/files", registry=registry, timeout=5, progress=False)
    assert _leftovers(empty) == ["toy/a.txt"]  # only verified files, nothing half-written


def test_mirror_from_the_environment(server, tmp_path, monkeypatch):
    base, files = server
    registry = _toy_registry(tmp_path, "http://127.0.0.1:9/never-used", files)
    monkeypatch.setenv(datasets.MIRROR_ENV, f"{base}/files/mirror")  # a data directory copy: <mirror>/<path>
    (files / "mirror" / "toy" / "nested").mkdir(parents=True, exist_ok=True)
    (files / "mirror" / "toy" / "a.txt").write_bytes((files / "toy" / "a.txt").read_bytes())
    (files / "mirror" / "toy" / "nested" / "b.jsonl").write_bytes((files / "toy" / "b.jsonl").read_bytes())
    datasets.fetch(["toy"], tmp_path / "data", registry=registry, progress=False, timeout=5)
    assert _leftovers(tmp_path / "data") == ["toy/a.txt", "toy/nested/b.jsonl"]


# ---------------------------------------------------------------------------------------------- bad cases


def _one_line_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_checksum_mismatch_installs_nothing(server, tmp_path):
    base, files = server
    registry = _toy_registry(tmp_path, base, files)
    good = registry["toy"]
    wrong = [good.files[0].__class__(**{**good.files[0].__dict__, "sha256": "0" * 64})]
    registry = {"toy": good.__class__(**{**good.__dict__, "files": tuple(wrong)})}
    root = tmp_path / "data"
    with pytest.raises(datasets.FetchError) as exc:
        datasets.fetch(["toy"], root, registry=registry, progress=False, timeout=5)
    assert re.search(r"checksum mismatch for http://127\.0\.0\.1:\d+/files/toy/a\.txt: sha256 [0-9a-f]{64}, "
                     r"expected 0{64}; nothing was installed", _one_line_error(exc))
    assert _leftovers(root) == []


def test_connection_cut_mid_file_installs_nothing_and_a_rerun_restarts_cleanly(server, tmp_path):
    base, files = server
    root = tmp_path / "data"
    cut = _toy_registry(tmp_path, base, files, url_base=f"{base}/cut/")
    with pytest.raises(datasets.FetchError) as exc:
        datasets.fetch(["toy"], root, registry=cut, progress=False, timeout=5)
    assert "broke off" in _one_line_error(exc) and "run the same command again" in str(exc.value)
    assert _leftovers(root) == []
    # a fetch killed outright leaves its .partial file behind: the next one starts that file again
    (root / "toy" / ".a.txt.partial").write_bytes(b"half a download")
    datasets.fetch(["toy"], root, registry=_toy_registry(tmp_path, base, files), progress=False, timeout=5)
    assert _leftovers(root) == ["toy/a.txt", "toy/nested/b.jsonl"]


def test_404_installs_nothing(server, tmp_path):
    base, files = server
    registry = _toy_registry(tmp_path, base, files, url_base=f"{base}/files/nowhere/")
    with pytest.raises(datasets.FetchError) as exc:
        datasets.fetch(["toy"], tmp_path / "data", registry=registry, progress=False, timeout=5)
    assert re.search(r"toy: http://127\.0\.0\.1:\d+/files/nowhere/toy/a\.txt answered 404", _one_line_error(exc))
    assert _leftovers(tmp_path / "data") == []


def test_no_network_names_the_url_and_how_to_place_the_file_by_hand(server, tmp_path):
    _, files = server
    url = f"http://127.0.0.1:{_closed_port()}/"
    registry = _toy_registry(tmp_path, url.rstrip("/"), files, url_base=url)
    root = tmp_path / "data"
    with pytest.raises(datasets.FetchError) as exc:
        datasets.fetch(["toy"], root, registry=registry, progress=False, timeout=5)
    message = _one_line_error(exc)
    assert f"cannot reach {url}toy/a.txt" in message
    assert f"place it at {root / 'toy' / 'a.txt'} (sha256 " in message and "kvlib data status" in message
    assert _leftovers(root) == []


def test_unknown_dataset_lists_the_known_ones(tmp_path, capsys):
    assert cli.main(["data", "fetch", "mdqa-oracel", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    assert "unknown dataset 'mdqa-oracel' (did you mean 'mdqa-oracle'?); known: mdqa-oracle, mdqa-20docs" in err
    with pytest.raises(datasets.UnknownDataset, match="known: .*triviaqa"):
        datasets.get("trivia")


def test_a_corrupted_file_is_reported_and_replaced(server, tmp_path):
    base, files = server
    registry = _toy_registry(tmp_path, base, files)
    root = tmp_path / "data"
    datasets.fetch(["toy"], root, registry=registry, progress=False, timeout=5)
    (root / "toy" / "a.txt").write_bytes(b"x" * registry["toy"].files[0].size)  # same size, other bytes
    _, (st,) = datasets.status(["toy"], root, registry=registry)
    assert st.state == "checksum mismatch" and "toy/a.txt: sha256" in st.detail and st.fix.startswith("kvlib data fetch toy")
    datasets.fetch(["toy"], root, registry=registry, progress=False, timeout=5)
    assert datasets.status(["toy"], root, registry=registry)[1][0].state == "present"


# ---------------------------------------------------------------------------------------------- the hub


HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"


def _triviaqa_parquet(path: Path) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"question": f"Which number is {i}?", "question_id": f"tq_{i}",
             "answer": {"aliases": [str(i), f"number {i}"], "value": str(i)}} for i in range(7)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path.read_bytes()


def test_hub_dataset_from_a_prepopulated_offline_cache(tmp_path, monkeypatch):
    """A registry entry on the hub (like triviaqa) goes through huggingface_hub.hf_hub_download: here offline
    ($HF_HUB_OFFLINE), from its cache at the pinned revision. The installed parquet is what kvlib's TriviaQA
    task reads first."""
    import yaml
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    repo = cache / "datasets--kvlib-test--trivia"
    src = "unfiltered.nocontext/validation-00000-of-00001.parquet"
    blob = _triviaqa_parquet(repo / "snapshots" / HUB_REVISION / src)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    target = general.TASKS["triviaqa"].default_files[0]
    entry = {"title": "t", "used_for": "u", "licence": "Apache-2.0", "source": "hub", "records": 7,
             "coverage": "complete", "hub": {"repo": "kvlib-test/trivia", "revision": HUB_REVISION},
             "files": [{"path": target, "src": src, "size": len(blob), "sha256": _sha256(blob)}]}
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump({"datasets": {"triviaqa": entry}}))
    registry = datasets.load_registry(tmp_path / "reg.yaml")
    root = tmp_path / "data"
    (root / "triviaqa").mkdir(parents=True)
    (root / "triviaqa" / "test.jsonl").write_text('{"id": "s", "question": "q", "golden_answers": ["a"]}\n')
    datasets.fetch(["triviaqa"], root, registry=registry, hub_cache=cache, progress=False)
    assert (root / target).read_bytes() == blob
    assert datasets.status(["triviaqa"], root, registry=registry)[1][0].state == "present"
    task = general.prepare_task("triviaqa", {}, root)  # the complete file wins over the subset beside it
    assert task.path == root / target and task.report.records == 7 and task.items[0].answers == ("0", "number 0")
    # not in the cache and no network: one line, saying how to place the file by hand
    missing = {**entry, "hub": {"repo": "kvlib-test/other", "revision": HUB_REVISION}}
    (tmp_path / "reg.yaml").write_text(yaml.safe_dump({"datasets": {"triviaqa": missing}}))
    other = tmp_path / "other"
    with pytest.raises(datasets.FetchError) as exc:
        datasets.fetch(["triviaqa"], other, registry=datasets.load_registry(tmp_path / "reg.yaml"), hub_cache=cache,
                       progress=False)
    assert "not in the local hub cache" in _one_line_error(exc) and f"place it at {other / target}" in str(exc.value)
    assert _leftovers(other) == []


# ---------------------------------------------------------------------------------------------- MDQA inputs


@pytest.fixture
def official_layout(tmp_path):
    """A data directory whose 20-document file sits at LitM's official name (the subset's records under it)."""
    root = tmp_path / "data"
    (root / "mdqa" / "qa_data" / "20_total_documents").mkdir(parents=True)
    shutil.copyfile(SHARED / "mdqa/qa_data/nq-open-oracle.jsonl.gz", root / "mdqa" / "qa_data" / "nq-open-oracle.jsonl.gz")
    shutil.copyfile(SHARED / "mdqa" / data._SUBSET_20DOCS.format(0), root / "mdqa" / data._OFFICIAL_20DOCS.format(0))
    return root


@needs_shared
def test_mdqa_paths_say_which_20_document_file_they_use(official_layout):
    shared = data.mdqa_paths(SHARED)
    assert (shared["retrieved_20docs_source"], shared["retrieved_20docs_questions"]) == ("subset", 441)
    assert set(shared["retrieved_20docs"]) == {0, 4, 9, 14, 19} and shared["partial_copy"] is not None
    official = data.mdqa_paths(official_layout)
    assert (official["retrieved_20docs_source"], official["retrieved_20docs_questions"]) == ("official", 2655)
    assert official["retrieved_20docs"] == {0: official_layout / "mdqa" / data._OFFICIAL_20DOCS.format(0)}
    assert official["partial_copy"] is None and official["random_documents"] is None
    (official_layout / "mdqa" / data._OFFICIAL_20DOCS.format(0)).unlink()
    with pytest.raises(FileNotFoundError, match=r"gold_at_0\.jsonl\.gz.*kvlib data fetch mdqa-20docs"):
        data.mdqa_paths(official_layout)


@needs_shared
def test_mdqa_eval_sets_record_their_source_and_counts(official_layout):
    from kvlib.tasks import mdqa

    retrieved = mdqa.build_eval_sets(["retrieved"], 5, 4, 0, 0, official_layout)["retrieved"]
    assert (retrieved.questions_from, retrieved.pool_questions) == ("official", 441)
    assert "4 questions drawn with seed 0 from mdqa/qa_data/20_total_documents/" in retrieved.source
    assert "(LitM official: 441 of 2655 questions)" in retrieved.source
    # LitM's random-distractor file, when present, is used if it holds the drawn questions with enough documents
    random_file = official_layout / "mdqa" / "nq-open-random-documents.jsonl.gz"
    mdqa.write_mdqa(retrieved.examples, random_file)
    sets = mdqa.build_eval_sets(["random", "retrieved"], 5, 4, 0, 0, official_layout)
    assert "distractors: LitM's random-distractor file mdqa/nq-open-random-documents.jsonl.gz" in sets["random"].source
    assert random_file in sets["random"].files
    assert [e.documents for e in sets["random"].examples] == [e.documents for e in retrieved.examples]
    alone = mdqa.build_eval_sets(["random"], 5, 4, 0, 0, official_layout)["random"]  # drawn from all 2655
    assert (alone.questions_from, alone.pool_questions) == ("oracle", 2655)
    assert "not used: 4 of the 4 questions are not in it" in alone.source and "distractors derived" in alone.source


# ---------------------------------------------------------------------------------------------- before compute


def _jobs(profile: str, only=None):
    from kvlib.pipeline import reproduce

    return plan.plan_profile(profile, only, REPO / "params", REPO / "notebooks", REPO / "results" / profile)


def test_what_each_notebook_reads():
    jobs = {job.name: job for job in _jobs("quick")}
    needs = {name: {n.dataset for n in data_needs.needs_for(name, job.config)} for name, job in jobs.items()}
    assert needs["01_synthetic_data"] == needs["02_finetune"] == set()
    assert needs["03_mdqa"] == needs["08_longer_context"] == {"mdqa-oracle", "mdqa-20docs"}
    assert needs["04_flenqa"] == {"mdqa-oracle"}  # regenerated; its "different" padding reads the oracle passages
    assert needs["05_general_benchmarks"] == {"mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open"}
    assert needs["06_baselines"] == {"mdqa-oracle", "mdqa-20docs", "mmlu", "hellaswag", "gsm8k", "triviaqa",
                                     "nq_open", "hotpotqa", "2wikimultihopqa", "squad", "niah-essays"}
    assert needs["07_kv_retrieval"] == {"kv-retrieval-75"}
    assert data_needs.needs_for("99_unknown", object()) == []


def test_reproduce_stops_before_any_training_naming_every_missing_input(tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.DATA_ENV, str(empty))
    results = tmp_path / "results"
    rc = cli.main(["reproduce", "--profile", "smoke", "--results", str(results), "--params-dir", str(REPO / "params"),
                   "--notebooks", str(REPO / "notebooks"), "--concurrent"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("kvlib reproduce --profile smoke: 11 data inputs are missing; nothing was trained or evaluated")
    for name in ("mdqa-oracle", "mdqa-20docs", "mmlu", "hellaswag", "gsm8k", "triviaqa", "nq_open", "niah-essays",
                 "squad", "hotpotqa", "kv-retrieval-75"):
        assert re.search(rf"^    {re.escape(name)} \(missing\), read by ", err, re.M), name
    assert "Fetch them with: kvlib data fetch mdqa-oracle mdqa-20docs " in err
    assert not results.exists()  # nothing ran, nothing was written


@needs_shared
def test_offline_data_directory_serves_every_profile_and_fetch_profile_is_a_noop(monkeypatch, capsys):
    monkeypatch.setenv(data.DATA_ENV, str(SHARED))
    for profile in ("smoke", "quick", "cpu"):
        assert data_needs.check_inputs(_jobs(profile)) is None, profile
    monkeypatch.chdir(REPO)
    assert data_needs.fetch_profile("quick", progress=False) == []
    assert "profile quick: every data input is present" in capsys.readouterr().out
