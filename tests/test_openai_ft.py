"""kvlib.engine.openai_ft: chat-file validation, cost estimate, and the fine-tuning job flow (upload, create, poll,
resume, retries, failures, key hygiene) through the real `openai` SDK against a loopback fake server."""
from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
import yaml

from kvlib.engine import openai_ft
from kvlib.engine.config import ParamError
from kvlib.engine import io as kvio
from kvlib.engine.openai_ft import (
    ChatFileError,
    OpenAIFinetuneConfig,
    OpenAIFinetuneError,
    estimate_cost,
    load_config,
    load_state,
    main_cli,
    run_finetune,
    validate_chat_file,
)

DUMMY_KEY = "sk-kvlib-test-4f9c1e2b7a-never-leak"  # distinctive, so a leak anywhere is easy to grep
SYSTEM = "Write a response that appropriately completes the request."


# ------------------------------------------------------------------------------------- the fake server


class FakeOpenAIServer:
    """A FAKE of the OpenAI fine-tuning endpoints, not the OpenAI API: a stdlib HTTP server on 127.0.0.1
    (a free port) that the real `openai` SDK is pointed at through base_url, so the SDK's own request
    building, multipart upload, retries and response parsing are what the tests exercise.

    Implements POST /v1/files (multipart), POST /v1/fine_tuning/jobs, GET /v1/fine_tuning/jobs (metadata
    filter), GET /v1/fine_tuning/jobs/{id} and GET /v1/fine_tuning/jobs/{id}/events. Every retrieve moves a
    job one step along `script` (validating_files -> running ... -> succeeded or failed), adding events.
    `fail(method, path_regex, status, times)` answers the next `times` matching requests with that error
    status (429/500 carry Retry-After headers, short so the SDK's backoff stays fast). Everything is bounded:
    after `max_requests` requests it answers 400 with x-should-retry: false, so a runaway loop ends fast.
    """

    def __init__(self, max_requests: int = 300):
        self.lock = threading.Lock()
        self.max_requests = max_requests
        self.log: list[tuple[str, str]] = []  # (method, path) of every request, errors included
        self.auth_headers: set[str] = set()
        self.uploads: list[dict] = []
        self.creations: list[dict] = []  # request bodies of created jobs
        self.jobs: dict[str, dict] = {}
        self.events: dict[str, list[dict]] = {}
        self.failures: list[dict] = []
        self.script = ["validating_files", "running", "running", "running", "succeeded"]
        self.failure_message = "The job failed due to an invalid training file."
        self.lose_create_response = False  # create the job, then answer 500 (response "lost")
        self._ids = itertools.count(1)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    def fail(self, method: str, path_regex: str, status: int, times: int = 1) -> None:
        self.failures.append({"method": method, "path": re.compile(path_regex), "status": status, "left": times})

    def count(self, method: str, path_regex: str) -> int:
        return sum(1 for m, p in self.log if m == method and re.fullmatch(path_regex, p))

    # -------------------------------------------------------------- request handling (under self.lock)

    def handle(self, method: str, path: str, query: dict, headers, body: bytes) -> tuple[int, dict, dict]:
        self.log.append((method, path))
        self.auth_headers.add(headers.get("Authorization", ""))
        if len(self.log) > self.max_requests:
            return 400, _error("fake server request limit reached"), {"x-should-retry": "false"}
        for rule in self.failures:
            if rule["left"] > 0 and rule["method"] == method and rule["path"].fullmatch(path):
                rule["left"] -= 1
                return rule["status"], _error(f"injected {rule['status']}"), {"retry-after-ms": "10",
                                                                               "retry-after": "1"}
        route = {
            ("POST", "/v1/files"): lambda: self._upload(headers, body),
            ("POST", "/v1/fine_tuning/jobs"): lambda: self._create(json.loads(body)),
            ("GET", "/v1/fine_tuning/jobs"): lambda: self._list(query),
        }.get((method, path))
        if route is not None:
            return route()
        match = re.fullmatch(r"/v1/fine_tuning/jobs/([\w-]+)(/events)?", path)
        if method == "GET" and match and match.group(1) in self.jobs:
            job_id = match.group(1)
            return self._events(job_id, query) if match.group(2) else self._retrieve(job_id)
        return 404, _error(f"no route {method} {path}"), {}

    def _upload(self, headers, body: bytes) -> tuple[int, dict, dict]:
        raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
        parts = {p.get_param("name", header="content-disposition"): p for p in message.iter_parts()}
        upload = {"id": f"file-{next(self._ids)}", "purpose": parts["purpose"].get_content(),
                  "filename": parts["file"].get_filename(), "content": parts["file"].get_payload(decode=True)}
        self.uploads.append(upload)
        return 200, {"id": upload["id"], "object": "file", "bytes": len(upload["content"]), "created_at": 1,
                     "filename": upload["filename"], "purpose": upload["purpose"], "status": "processed"}, {}

    def _create(self, request: dict) -> tuple[int, dict, dict]:
        known = {u["id"] for u in self.uploads}
        if request.get("training_file") not in known:
            return 400, _error("training_file not found"), {"x-should-retry": "false"}
        job_id = f"ftjob-{next(self._ids)}"
        self.creations.append(request)
        hyper = request.get("method", {}).get("supervised", {}).get("hyperparameters", {})
        self.jobs[job_id] = {
            "id": job_id, "object": "fine_tuning.job", "created_at": 1000, "finished_at": None,
            "model": request["model"], "fine_tuned_model": None, "organization_id": "org-fake",
            "result_files": [], "seed": request.get("seed", 0), "status": "validating_files",
            "trained_tokens": None, "training_file": request["training_file"],
            "validation_file": request.get("validation_file"), "hyperparameters": hyper,
            "metadata": request.get("metadata"), "error": None, "_step": 0,
        }
        self.events[job_id] = []
        self._event(job_id, "info", f"Created fine-tuning job: {job_id}")
        if self.lose_create_response:
            return 500, _error("response lost after the job was created"), {"x-should-retry": "false"}
        return 200, _public(self.jobs[job_id]), {}

    def _list(self, query: dict) -> tuple[int, dict, dict]:
        wanted = {k[len("metadata["):-1]: v[0] for k, v in query.items() if k.startswith("metadata[")}
        data = [_public(j) for j in self.jobs.values()
                if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        return 200, {"object": "list", "data": data[::-1], "has_more": False}, {}

    def _retrieve(self, job_id: str) -> tuple[int, dict, dict]:
        job = self.jobs[job_id]
        if job["status"] not in openai_ft.TERMINAL_STATUSES:
            job["_step"] = min(job["_step"] + 1, len(self.script) - 1)
            status = self.script[job["_step"]]
            if status == "running":
                step = self.script[: job["_step"] + 1].count("running")
                total = self.script.count("running")
                self._event(job_id, "info", f"Step {step}/{total}: training loss=0.1", "metrics",
                            {"step": step, "total_steps": total, "train_loss": 0.1})
            if status != job["status"]:
                self._event(job_id, "info", f"Job status: {status}")
            job["status"] = status
            if status == "succeeded":
                job.update(fine_tuned_model=f"ft:{job['model']}:fake-org::{job_id[-4:]}", trained_tokens=12345,
                           finished_at=2000)
            elif status == "failed":
                job.update(error={"code": "invalid_training_file", "message": self.failure_message,
                                  "param": "training_file"}, finished_at=2000)
        return 200, _public(job), {}

    def _events(self, job_id: str, query: dict) -> tuple[int, dict, dict]:
        newest_first = self.events[job_id][::-1]
        if "after" in query:  # cursor: continue with the events older than `after`
            ids = [e["id"] for e in newest_first]
            newest_first = newest_first[ids.index(query["after"][0]) + 1:]
        limit = int(query.get("limit", ["20"])[0])
        return 200, {"object": "list", "data": newest_first[:limit], "has_more": len(newest_first) > limit}, {}

    def _event(self, job_id: str, level: str, message: str, kind: str = "message", data: dict | None = None):
        self.events[job_id].append({"id": f"ftevent-{next(self._ids)}", "object": "fine_tuning.job.event",
                                    "created_at": 1000 + len(self.events[job_id]), "level": level,
                                    "message": message, "type": kind, "data": data})

    def _handler_class(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                url = urlsplit(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with server.lock:
                    status, payload, headers = server.handle(method, url.path, parse_qs(url.query),
                                                             self.headers, body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802 (http.server's naming)
                self._serve("GET")

            def do_POST(self):  # noqa: N802
                self._serve("POST")

            def log_message(self, *args):  # keep test output clean
                pass

        return Handler


def _error(message: str) -> dict:
    return {"error": {"message": message, "type": "fake_error", "param": None, "code": None}}


def _public(job: dict) -> dict:
    return {k: v for k, v in job.items() if not k.startswith("_")}


# ------------------------------------------------------------------------------------------- fixtures


def chat_line(user: str = "What is the value of key 1?", answer: str = "The value is 2.", **overrides) -> str:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user},
                {"role": "assistant", "content": answer}]
    return json.dumps({"messages": overrides.get("messages", messages)})


def write_chat(path: Path, n: int = 12) -> Path:
    path.write_text("".join(chat_line(f"Key {i}?", f"Value {i}.") + "\n" for i in range(n)), encoding="utf-8")
    return path


@pytest.fixture
def fake_server():
    server = FakeOpenAIServer()
    yield server
    server.close()


@pytest.fixture
def api_env(monkeypatch):
    """A dummy key, and no proxy or base-URL settings that could send the SDK anywhere but the loopback."""
    monkeypatch.setenv("OPENAI_API_KEY", DUMMY_KEY)
    for name in ("OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
                 "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")


@pytest.fixture
def make_cfg(tmp_path, fake_server):
    def make(**overrides) -> OpenAIFinetuneConfig:
        fields = {"train_file": write_chat(tmp_path / "train.openai.jsonl"), "job_dir": tmp_path / "job",
                  "base_url": fake_server.base_url, "poll_interval_s": 0.01, "timeout_s": 5.0, "max_retries": 2,
                  **overrides}
        return OpenAIFinetuneConfig(**fields)

    return make


# ---------------------------------------------------------------------------------------- validation


def char_counter(texts):
    return [len(t) for t in texts]


def test_token_count_is_the_cookbook_formula(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text(chat_line(messages=[{"role": "system", "content": "ab"}, {"role": "user", "content": "cde"},
                                        {"role": "assistant", "content": "f"}]) + "\n")
    stats = validate_chat_file(path, char_counter, context_limit=100)
    # roles (6 + 4 + 9 chars) + contents (2 + 3 + 1) + 3 per message x 3 + 3 reply priming
    assert stats == {"n_examples": 1, "total_tokens": 19 + 6 + 9 + 3, "min_tokens": 37, "max_tokens": 37,
                     "mean_tokens": 37.0}


def test_real_generated_file_validates_with_tiktoken(tmp_path):
    from kvlib.tasks import synthetic as generate

    cfg = generate.GenerationConfig(task="simple", num_dicts=6, n_train=12, n_eval=0, max_tokens=600,
                                    tokenizer="tiktoken:gpt-3.5-turbo")
    generate.write_dataset(cfg, tmp_path / "data")
    path = tmp_path / "data" / "train.openai.jsonl"
    from kvlib.engine.models import load_token_counter

    stats = validate_chat_file(path, load_token_counter("tiktoken:gpt-3.5-turbo"), context_limit=16385)
    assert stats["n_examples"] == 12
    assert 0 < stats["min_tokens"] <= stats["mean_tokens"] <= stats["max_tokens"] <= 600 + 100
    assert stats["total_tokens"] == pytest.approx(stats["mean_tokens"] * 12, abs=1)


BAD_LINES = {
    "bad JSON": ('{"messages": [', "not valid JSON"),
    "wrong role": (chat_line(messages=[{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "x"}]),
                   "role must be one of"),
    "empty content": (chat_line(answer="  "), "content must be a non-empty string"),
    "no assistant": (chat_line(messages=[{"role": "user", "content": "hi"}]), "no assistant message"),
    "assistant not last": (chat_line(messages=[{"role": "assistant", "content": "a"},
                                               {"role": "user", "content": "b"}]), "last message must be"),
    "late system": (chat_line(messages=[{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                                        {"role": "assistant", "content": "c"}]), "system message is only allowed"),
    "extra key": (json.dumps({"messages": [{"role": "assistant", "content": "a"}], "id": 3}),
                  "exactly one key 'messages'"),
    "too long": (chat_line(user="x" * 500), "more than context_limit=200"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_validation_names_file_and_line(tmp_path, kind):
    line, expected = BAD_LINES[kind]
    path = write_chat(tmp_path / "data.jsonl", n=3)
    path.write_text(path.read_text() + line + "\n" + chat_line() + "\n")
    with pytest.raises(ValueError) as info:
        validate_chat_file(path, char_counter, context_limit=200)
    message = str(info.value)
    assert f"{path}:4: " in message and expected in message
    assert "1 problem(s)" in message  # the good lines around it are not reported


def test_validation_collects_all_errors_with_a_cap(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text("not json\n" * 30 + "\n")
    with pytest.raises(ChatFileError) as info:
        validate_chat_file(path, char_counter, context_limit=200)
    message = str(info.value)
    assert "31 problem(s)" in message and f"{path}:31: empty line" not in message
    assert message.count(f"{path}:") == openai_ft.MAX_REPORTED_ERRORS + 1  # the header line names the file too
    assert f"and {31 - openai_ft.MAX_REPORTED_ERRORS} more" in message


def test_too_few_training_examples(tmp_path):
    with pytest.raises(ChatFileError, match="at least 10"):
        validate_chat_file(write_chat(tmp_path / "t.jsonl", n=3), char_counter, 1000, min_examples=10)


# ------------------------------------------------------------------------------------ config and cost


def test_cost_arithmetic():
    assert estimate_cost({"total_tokens": 1_000_000}, 3, 0.008) == pytest.approx(24.0)
    assert estimate_cost({"total_tokens": 612_345}, 2, 0.008) == pytest.approx(612_345 * 2 * 0.008 / 1000)
    with pytest.raises(ValueError, match="n_epochs"):
        estimate_cost({"total_tokens": 1}, 0, 0.008)


def test_config_defaults_and_validation(tmp_path):
    cfg = load_config({"openai_finetune": {"train_file": "d/train.openai.jsonl", "job_dir": "runs/ft"}})
    assert (cfg.model, cfg.n_epochs, cfg.context_limit, cfg.price_per_1k_training_tokens) == (
        "gpt-3.5-turbo-1106", 3, 16385, 0.008)
    assert cfg.hyperparameters() == {"n_epochs": 3, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    base = {"train_file": "t.jsonl", "job_dir": "j"}
    for bad, field in [({"n_epochs": 0}, "n_epochs"), ({"suffix": "x" * 65}, "suffix"),
                       ({"train_file": "t.csv"}, "train_file"), ({"learning_rate_multiplier": 0}, "learning_rate"),
                       ({"base_url": "127.0.0.1"}, "base_url"), ({"n_epoch": 2}, "n_epoch")]:
        with pytest.raises(ParamError, match=f"^(openai_finetune\\.)?{field}"):
            load_config({**base, **bad})


# ---------------------------------------------------------------------------------------- the job flow


def test_full_flow_succeeds_and_records_the_model(make_cfg, fake_server, api_env, tmp_path):
    cfg = make_cfg(validation_file=write_chat(tmp_path / "eval.openai.jsonl", n=2), suffix="kv", n_epochs=2,
                   batch_size=4)
    state = run_finetune(cfg, progress=False)

    assert state["status"] == "succeeded" and state["fine_tuned_model"].startswith("ft:gpt-3.5-turbo-1106:")
    assert load_state(cfg.job_dir) == state  # what is returned is what is on disk
    assert state["trained_tokens"] == 12345 and state["train_sha256"] == kvio.file_sha256(cfg.train_file)
    assert [u["purpose"] for u in fake_server.uploads] == ["fine-tune", "fine-tune"]
    assert fake_server.uploads[0]["content"] == cfg.train_file.read_bytes()
    assert {state["training_file_id"], state["validation_file_id"]} == {u["id"] for u in fake_server.uploads}
    (created,) = fake_server.creations
    assert created["model"] == "gpt-3.5-turbo-1106" and created["suffix"] == "kv" and created["seed"] == 0
    assert created["method"]["supervised"]["hyperparameters"] == {
        "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}
    events = [json.loads(line) for line in (cfg.job_dir / openai_ft.EVENTS_FILE).read_text().splitlines()]
    assert [e["id"] for e in events] == [e["id"] for e in fake_server.events[state["job_id"]]]  # all, in order


def test_rate_limit_and_server_error_are_retried_by_the_sdk(make_cfg, fake_server, api_env):
    fake_server.fail("POST", "/v1/files", 429)
    fake_server.fail("POST", "/v1/fine_tuning/jobs", 500)
    state = run_finetune(make_cfg(), progress=False)
    assert state["status"] == "succeeded"
    assert fake_server.count("POST", "/v1/files") == 2 and len(fake_server.uploads) == 1
    assert fake_server.count("POST", "/v1/fine_tuning/jobs") == 2 and len(fake_server.creations) == 1


def test_polling_outlasts_errors_beyond_the_sdk_retries(make_cfg, fake_server, api_env):
    fake_server.fail("GET", r"/v1/fine_tuning/jobs/[\w-]+", 500, times=3)
    state = run_finetune(make_cfg(max_retries=0), progress=False)  # every 500 reaches our polling loop
    # 3 failed polls + the 4 that walk the job from validating_files to succeeded
    assert state["status"] == "succeeded" and fake_server.count("GET", r"/v1/fine_tuning/jobs/[\w-]+") == 7


class Interrupted(Exception):
    pass


def test_restart_resumes_the_same_job(make_cfg, fake_server, api_env, monkeypatch):
    cfg = make_cfg()

    def crash(_seconds):  # the process dies during its first wait between polls
        raise Interrupted

    monkeypatch.setattr(openai_ft, "_sleep", crash)
    with pytest.raises(Interrupted):
        run_finetune(cfg, progress=False)
    first = load_state(cfg.job_dir)
    assert first["job_id"] and first["status"] != "succeeded"

    monkeypatch.setattr(openai_ft, "_sleep", time.sleep)
    state = run_finetune(cfg, progress=False)
    assert state["job_id"] == first["job_id"] and state["status"] == "succeeded"
    assert len(fake_server.creations) == 1 and len(fake_server.uploads) == 1
    assert fake_server.count("POST", "/v1/fine_tuning/jobs") == 1 and fake_server.count("POST", "/v1/files") == 1


def test_lost_create_response_finds_the_job_instead_of_creating_another(make_cfg, fake_server, api_env):
    import openai

    cfg = make_cfg(max_retries=0)
    fake_server.lose_create_response = True
    with pytest.raises(openai.InternalServerError):
        run_finetune(cfg, progress=False)
    crashed = load_state(cfg.job_dir)
    assert not crashed.get("job_id") and crashed["create_attempted_at"] and crashed["training_file_id"]

    fake_server.lose_create_response = False
    state = run_finetune(cfg, progress=False)
    assert state["status"] == "succeeded" and len(fake_server.creations) == 1 and len(fake_server.uploads) == 1
    assert state["job_id"] == next(iter(fake_server.jobs))


def test_failed_job_raises_with_its_message(make_cfg, fake_server, api_env):
    fake_server.script = ["validating_files", "failed"]
    cfg = make_cfg()
    with pytest.raises(OpenAIFinetuneError, match=re.escape(fake_server.failure_message)):
        run_finetune(cfg, progress=False)
    state = load_state(cfg.job_dir)
    assert state["status"] == "failed" and state["error"]["message"] == fake_server.failure_message


def test_changed_training_file_is_refused(make_cfg, fake_server, api_env):
    cfg = make_cfg()
    run_finetune(cfg, progress=False)
    cfg.train_file.write_text(cfg.train_file.read_text() + chat_line("new key?", "new value.") + "\n")
    n_requests = len(fake_server.log)
    with pytest.raises(OpenAIFinetuneError, match="training file changed"):
        run_finetune(cfg, progress=False)
    assert len(fake_server.log) == n_requests  # refused before talking to the API


def test_changed_hyperparameters_are_refused(make_cfg, fake_server, api_env):
    run_finetune(make_cfg(), progress=False)
    with pytest.raises(OpenAIFinetuneError, match="hyperparameters"):
        run_finetune(make_cfg(n_epochs=2), progress=False)
    assert len(fake_server.creations) == 1


def test_missing_api_key_fails_clearly_before_any_request(make_cfg, fake_server, api_env, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = make_cfg()
    with pytest.raises(OpenAIFinetuneError, match="OPENAI_API_KEY is not set"):
        run_finetune(cfg, progress=False)
    assert fake_server.log == [] and not cfg.job_dir.exists()


def _write_params(tmp_path: Path, cfg: OpenAIFinetuneConfig) -> Path:
    params = tmp_path / "params.yaml"
    from kvlib.engine.config import to_mapping

    params.write_text(yaml.safe_dump({"openai_finetune": to_mapping(cfg)}))
    return params


def test_cli_run_never_leaks_the_key(make_cfg, fake_server, api_env, tmp_path, capfd):
    cfg = make_cfg()
    assert main_cli(_write_params(tmp_path, cfg), dry_run=False) == 0
    out, err = capfd.readouterr()
    state = load_state(cfg.job_dir)
    assert f"fine-tuned model: {state['fine_tuned_model']}" in out and "estimated cost" in out
    assert fake_server.auth_headers == {f"Bearer {DUMMY_KEY}"}  # the key was used ...
    written = "".join(p.read_text() for p in cfg.job_dir.rglob("*") if p.is_file())
    for text in (out, err, written):  # ... and appears nowhere kvlib writes
        assert DUMMY_KEY not in text and DUMMY_KEY[3:15] not in text


def test_cli_reports_a_failed_job_without_a_traceback(make_cfg, fake_server, api_env, tmp_path, capfd):
    fake_server.script = ["validating_files", "failed"]
    assert main_cli(_write_params(tmp_path, make_cfg()), dry_run=False) == 1
    assert fake_server.failure_message in capfd.readouterr().err


def test_dry_run_needs_no_key_and_prints_the_estimate(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = OpenAIFinetuneConfig(train_file=write_chat(tmp_path / "train.openai.jsonl"), job_dir=tmp_path / "job",
                               base_url="http://127.0.0.1:9/v1")  # a closed port: any request would fail
    from kvlib.pipeline.cli import main as cli_main

    assert cli_main(["openai-finetune", "--params", str(_write_params(tmp_path, cfg)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    stats = openai_ft.validate_files(cfg)["train"]
    billed = stats["total_tokens"] * 3
    assert "examples: 12" in out and f"billed tokens: {billed:,}" in out
    assert f"${billed / 1000 * 0.008:,.2f}" in out and "dry run" in out
    assert not cfg.job_dir.exists()


def test_dry_run_reports_a_bad_file(tmp_path, capsys):
    path = write_chat(tmp_path / "train.openai.jsonl")
    path.write_text(path.read_text() + "{oops\n")
    cfg = OpenAIFinetuneConfig(train_file=path, job_dir=tmp_path / "job")
    assert main_cli(_write_params(tmp_path, cfg), dry_run=True) == 1
    assert f"{path}:13: not valid JSON" in capsys.readouterr().err
