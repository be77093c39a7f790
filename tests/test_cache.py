"""kvlib.engine.cache: responses keyed by what produced them, stored as they arrive, reused after a kill; and
kvlib.engine.evaluate's answer_requests / open_backend on top of it."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvlib.engine.backends import ContextLengthError
from kvlib.engine.cache import CachedBackend, ResponseCache, cache_key
from kvlib.engine.evaluate import answer_requests, open_backend, result_fields
from kvlib.engine.backends import BackendConfig


class CountingBackend:
    """A fake backend: answers `echo:<last message>` and records every request it is asked."""

    name = "fake"

    def __init__(self, tag: str = "v1", too_long: tuple[str, ...] = ()):
        self.tag, self.too_long, self.asked = tag, too_long, []

    def identity(self) -> dict:
        return {"backend": self.name, "model": {"spec": f"fake-{self.tag}", "weights_sha256": "0" * 64}}

    def fits(self, requests, max_new_tokens):
        return [True] * len(requests)

    def generate(self, requests, max_new_tokens, on_result=None):
        results, rejected = [None] * len(requests), []
        for i, r in enumerate(requests):
            text = r if isinstance(r, str) else r[-1]["content"]
            self.asked.append(text)
            if text in self.too_long:
                rejected.append(i)
                continue
            results[i] = f"echo:{text}:{max_new_tokens}"
            if on_result:
                on_result(i, results[i])
        if rejected:
            raise ContextLengthError(rejected, [None] * len(rejected), None, "fake", results=results)
        return results

    def loglikelihood(self, requests, on_result=None):
        results = []
        for i, (context, continuation) in enumerate(requests):
            self.asked.append((context, continuation))
            results.append((-float(len(continuation)), True))
            if on_result:
                on_result(i, results[-1])
        return results


def test_second_run_is_answered_from_the_cache(tmp_path):
    prompts = [f"q{i}" for i in range(6)]
    first = CachedBackend(CountingBackend(), ResponseCache(tmp_path))
    answers = first.generate(prompts, 8)
    assert answers == [f"echo:q{i}:8" for i in range(6)] and first.misses == 6

    inner = CountingBackend()
    again = CachedBackend(inner, ResponseCache(tmp_path))
    assert again.generate(prompts + ["new"], 8) == answers + ["echo:new:8"]
    assert inner.asked == ["new"] and again.hits == 6 and len(again.cache) == 7


def test_key_covers_model_prompt_and_params(tmp_path):
    cache = ResponseCache(tmp_path)
    CachedBackend(CountingBackend("v1"), cache).generate(["q"], 8)
    for backend, prompt, n in ((CountingBackend("v2"), "q", 8),  # other weights
                               (CountingBackend("v1"), "q", 9),  # other max_new_tokens
                               (CountingBackend("v1"), [{"role": "system", "content": "s"},
                                                        {"role": "user", "content": "q"}], 8)):  # other prompt
        CachedBackend(backend, cache).generate([prompt], n)
        assert backend.asked == ["q"]
    assert len(cache) == 4
    identity = CountingBackend().identity()
    assert cache_key(identity, "generate", "a", {}) != cache_key(identity, "loglikelihood", "a", {})


def test_duplicates_are_asked_once_and_loglikelihoods_cached(tmp_path):
    inner = CountingBackend()
    cached = CachedBackend(inner, ResponseCache(tmp_path))
    assert cached.generate(["a", "b", "a"], 4) == ["echo:a:4", "echo:b:4", "echo:a:4"]
    assert inner.asked == ["a", "b"]
    pairs = [("ctx", " yes"), ("ctx", " no")]
    first = cached.loglikelihood(pairs)
    assert first == [(-4.0, True), (-3.0, True)] and isinstance(first[0], tuple)
    inner2 = CountingBackend()
    assert CachedBackend(inner2, ResponseCache(tmp_path)).loglikelihood(pairs) == first
    assert inner2.asked == []


def test_rejected_prompts_come_back_as_none_and_are_not_cached(tmp_path):
    inner = CountingBackend(too_long=("long",))
    cached = CachedBackend(inner, ResponseCache(tmp_path))
    assert answer_requests(cached, ["a", "long", "b"], 4) == ["echo:a:4", None, "echo:b:4"]
    assert len(cached.cache) == 2
    with pytest.raises(ContextLengthError) as info:
        cached.generate(["long", "c"], 4)
    assert info.value.indices == [0] and info.value.results == [None, "echo:c:4"]


_KILLED_RUN = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_cache import CountingBackend
    from kvlib.engine.cache import CachedBackend, ResponseCache

    class Slow(CountingBackend):
        def generate(self, requests, max_new_tokens, on_result=None):
            def slow(i, answer):
                on_result(i, answer)
                time.sleep(0.15)
            return super().generate(requests, max_new_tokens, slow)

    CachedBackend(Slow(), ResponseCache({cache!r})).generate([f"q{{i}}" for i in range(40)], 8)
""")


def test_killed_run_resumes_without_loss_or_double_counting(tmp_path):
    """A real SIGKILL midway through an evaluation: the re-run asks only for what is missing and ends with
    exactly one stored response per request, identical to an uninterrupted run."""
    script = tmp_path / "run.py"
    script.write_text(_KILLED_RUN.format(tests=str(Path(__file__).parent), cache=str(tmp_path / "cache")))
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    db = tmp_path / "cache" / "responses.sqlite"
    deadline = time.time() + 60
    stored = 0
    while time.time() < deadline and stored < 5:
        time.sleep(0.1)
        if db.is_file():
            stored = len(ResponseCache(tmp_path / "cache"))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = len(ResponseCache(tmp_path / "cache"))
    assert 5 <= before < 40, f"the kill should land midway, {before} of 40 stored"

    prompts = [f"q{i}" for i in range(40)]
    inner = CountingBackend()
    resumed = CachedBackend(inner, ResponseCache(tmp_path / "cache"))
    answers = resumed.generate(prompts, 8)
    assert answers == CountingBackend().generate(prompts, 8)  # same as an uninterrupted run
    assert len(inner.asked) == 40 - before and set(inner.asked).isdisjoint(prompts[:before])
    assert len(resumed.cache) == 40


def test_hf_backend_stores_each_batch_as_it_finishes(tiny_llama_dir, tmp_path):
    from kvlib.engine.backends import HFBackend

    backend = HFBackend(tiny_llama_dir, device="cpu", dtype="float32", batch_size=2, progress=False)
    seen = []
    backend.generate(["a", "bb", "ccc", "dddd", "e"], 3, on_result=lambda i, r: seen.append(i))
    assert sorted(seen) == [0, 1, 2, 3, 4]
    cached = CachedBackend(backend, ResponseCache(tmp_path))
    counts = []
    original_put = cached.cache.put
    cached.cache.put = lambda *a: (counts.append(len(cached.cache)), original_put(*a))
    first = cached.generate(["a", "bb", "ccc"], 3)
    assert counts == [0, 1, 2]  # committed one by one, not at the end
    assert backend.generate(["a", "bb", "ccc"], 3) == first


def test_open_backend_and_result_fields_with_overlength(tiny_llama_dir, tmp_path):
    config = BackendConfig(model=tiny_llama_dir, dtype="float32", device="cpu", batch_size=2)
    with open_backend(config, cache_dir=tmp_path, progress=False) as backend:
        answers = answer_requests(backend, ["hi", "word " * 200, "yo"], 5)
        fields = result_fields(backend, 5)
    assert answers[1] is None and isinstance(answers[0], str) and isinstance(answers[2], str)
    assert fields["backend"] == "hf" and fields["dtype"] == "float32" and fields["max_new_tokens"] == 5
    assert len(fields["weights_sha256"]) == 64 and len(fields["chat_template"]) == 64
    assert json.loads(json.dumps(fields)) == fields
