"""kvlib.engine.backends.OpenAIChatBackend against a REAL OpenAI-compatible server: llama.cpp's server
(llama-cpp-python[server], installed by `make test`) serving the embedded GGUF on 127.0.0.1; plus the SDK's
retries wired through (a tiny loopback stub answering 429 first)."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from kvlib.engine.backends import ContextLengthError, OpenAIChatBackend, build_backend, is_loopback_url
from kvlib.engine.cache import CachedBackend, ResponseCache
from kvlib.engine.evaluate import answer_requests, result_fields
from kvlib.engine.models import DEFAULT_MODEL, embedded_gguf_path

pytest.importorskip("llama_cpp.server", reason="llama-cpp-python[server] is not installed (`make test` installs "
                                               "it: pip install -e '.[dev,llamacpp]')")

N_CTX = 1024


@pytest.fixture(scope="module")
def llama_server():
    from kvlib.engine.servers import LlamaServer

    with LlamaServer(embedded_gguf_path(DEFAULT_MODEL), n_ctx=N_CTX) as server:
        yield server
        # a crashed server shows up in the tests as "Connection refused"; say here that it died, and how
        assert server.process.poll() is None, f"llama.cpp server died with exit code {server.process.returncode}"


def test_real_server_answers_greedily_and_in_order(llama_server, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # a loopback server needs none
    backend = build_backend({"kind": "openai", "model": llama_server.model, "base_url": llama_server.base_url,
                             "concurrency": 3}, progress=False)
    prompts = ["What is the capital of France? Answer in one word.", "Say the word 'blue'.", "What is 2+2?"]
    first = backend.generate(prompts, 24)
    assert "paris" in first[0].lower() and "blue" in first[1].lower() and "4" in first[2]
    assert backend.generate(prompts, 24) == first  # temperature 0: repeatable
    assert backend.identity() == {"backend": "openai", "model": llama_server.model,
                                  "base_url": llama_server.base_url + "/", "chat_template": "server-side",
                                  "temperature": 0}
    assert llama_server.model.startswith("SmolLM2-135M-Instruct.Q4_1@")


def test_over_length_prompt_is_reported_not_dropped(llama_server, tmp_path):
    backend = OpenAIChatBackend(llama_server.model, base_url=llama_server.base_url, progress=False)
    prompts = ["Say hi.", "word " * (N_CTX + 100), "Say bye."]
    with pytest.raises(ContextLengthError) as info:
        backend.generate(prompts, 16)
    assert info.value.indices == [1] and info.value.results[1] is None
    assert all(isinstance(info.value.results[i], str) for i in (0, 2))
    cached = CachedBackend(backend, ResponseCache(tmp_path))
    answers = answer_requests(cached, prompts, 16)
    assert answers[1] is None and answers[0] == info.value.results[0] and len(cached.cache) == 2
    assert result_fields(cached, 16)["backend"] == "openai"


class _Flaky(BaseHTTPRequestHandler):
    """Answers the first `failures` chat requests with 429 (Retry-After 0), then a fixed completion."""

    failures = 2
    seen: list[str] = []

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).seen.append(self.headers.get("Authorization", ""))
        if len(self.seen) <= self.failures:
            payload, status, headers = {"error": {"message": "slow down", "type": "rate_limit"}}, 429, {"Retry-After": "0"}
        else:
            assert body["temperature"] == 0 and body["max_tokens"] == 7
            payload, status, headers = {
                "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop",
                             "message": {"role": "assistant", "content": "  ok  "}}]}, 200, {}
        data = json.dumps(payload).encode()
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_rate_limits_are_retried_and_the_key_comes_from_the_environment(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KVLIB_TEST_KEY", "sk-test-from-env-1234")
        backend = OpenAIChatBackend("m", base_url=f"http://127.0.0.1:{server.server_port}/v1",
                                    api_key_env="KVLIB_TEST_KEY", max_retries=3, progress=False)
        assert backend.generate(["hi"], 7) == ["ok"]
        assert _Flaky.seen == ["Bearer sk-test-from-env-1234"] * 3
        assert "sk-test" not in json.dumps(backend.identity())
    finally:
        server.shutdown()


def test_remote_api_without_key_fails_clearly(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert is_loopback_url("http://127.0.0.1:8000/v1") and not is_loopback_url("https://api.openai.com/v1")
    with pytest.raises(ValueError, match="OPENAI_API_KEY is not set"):
        OpenAIChatBackend("gpt-3.5-turbo")
