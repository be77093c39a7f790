"""Generative benchmarks on lm-evaluation-harness's default path: raw-text prompts (kvlib.engine.backends.RawPrompt)
tokenized without the chat template, kept apart in the response cache, refused by chat APIs; the prompt format
each task runs in by default and when a profile asks for the chat template (kvlib.tasks.general)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvlib.engine.backends import HFBackend, OpenAIChatBackend, RawPrompt, accepts_raw_text, request_payload
from kvlib.engine.cache import CachedBackend, ResponseCache, cache_key
from kvlib.engine.config import ParamError, from_mapping
from kvlib.pipeline import notebooks
from kvlib.report import general_tables
from kvlib.tasks import general as g

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    return HFBackend(tiny_llama_dir, device="cpu", dtype="float32", batch_size=2, progress=False)


def test_raw_prompt_is_the_tokenizers_own_encoding_without_the_chat_template(tiny_llama):
    text = "Answer these questions:\n\nQ: who wrote hamlet?\nA:"
    tok = tiny_llama.tokenizer
    raw, chat = tiny_llama._encode_prompts([RawPrompt(text), text])
    assert raw == tok(text)["input_ids"]  # SmolLM2's tokenizer adds no BOS
    assert chat == tok(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=False), add_special_tokens=False)["input_ids"]
    assert len(chat) > len(raw) and tiny_llama.prompt_lengths([RawPrompt(text)]) == [len(raw)]
    # mixed lists keep their order; generation takes raw text like any request
    answers = tiny_llama.generate([text, RawPrompt(text), RawPrompt("Q: 2+2?\nA:")], 3)
    assert len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert accepts_raw_text(tiny_llama)


def test_raw_prompt_gets_the_bos_token_where_the_tokenizer_adds_one(tiny_mistral_dir):
    backend = HFBackend(tiny_mistral_dir, device="cpu", dtype="float32", progress=False)
    tok = backend.tokenizer
    text = "Question: Who wrote Hamlet??\nAnswer:"
    [raw] = backend._encode_prompts([RawPrompt(text)])
    assert raw == tok(text)["input_ids"] and raw[0] == tok.bos_token_id  # as the harness's HF model encodes it
    # text that already starts with the BOS token's text gets no second one (the harness's has_bos_prefix rule)
    [again] = backend._encode_prompts([RawPrompt(tok.bos_token + text)])
    assert again == tok(tok.bos_token + text, add_special_tokens=False)["input_ids"] and again.count(tok.bos_token_id) == 1


def test_raw_prompt_needs_text():
    with pytest.raises(TypeError, match="non-empty text"):
        RawPrompt("")


# ------------------------------------------------------------------------------------------ cache


class EchoBackend:
    """Answers what it was asked, recording each request as it came (raw or chat)."""

    name = "echo"
    accepts_raw_text = True

    def __init__(self):
        self.asked = []

    def identity(self) -> dict:
        return {"backend": self.name, "model": {"spec": "echo", "weights_sha256": "0" * 64}}

    def fits(self, requests, max_new_tokens):
        return [True] * len(requests)

    def generate(self, requests, max_new_tokens, on_result=None):
        out = []
        for i, r in enumerate(requests):
            self.asked.append(r)
            out.append(f"raw:{r.text}" if isinstance(r, RawPrompt) else f"chat:{r[-1]['content'] if not isinstance(r, str) else r}")
            if on_result:
                on_result(i, out[-1])
        return out


def test_cache_keys_raw_text_apart_from_the_same_text_as_a_chat_message(tmp_path):
    identity = EchoBackend().identity()
    assert request_payload(RawPrompt("q")) == {"raw_text": "q"}
    assert (cache_key(identity, "generate", request_payload(RawPrompt("q")), {})
            != cache_key(identity, "generate", request_payload("q"), {}))
    inner = EchoBackend()
    cached = CachedBackend(inner, ResponseCache(tmp_path))
    assert cached.generate([RawPrompt("q"), "q", RawPrompt("q")], 4) == ["raw:q", "chat:q", "raw:q"]
    assert inner.asked == [RawPrompt("q"), "q"], "the backend gets the RawPrompt itself; duplicates asked once"
    assert len(cached.cache) == 2 and accepts_raw_text(cached)
    again = EchoBackend()
    assert CachedBackend(again, ResponseCache(tmp_path)).generate(["q", RawPrompt("q")], 4) == ["chat:q", "raw:q"]
    assert again.asked == []
    stored = {r[0] for r in ResponseCache(tmp_path)._db.execute("SELECT request FROM responses")}
    assert stored == {json.dumps({"raw_text": "q"}), json.dumps([{"role": "user", "content": "q"}])}


# -------------------------------------------------------------------------------------- chat APIs


def test_chat_api_refuses_raw_text_before_sending_anything():
    # port 9 (discard) on loopback: nothing listens, so any request would fail with a connection error instead
    backend = OpenAIChatBackend("m", base_url="http://127.0.0.1:9/v1", max_retries=0, progress=False)
    assert not accepts_raw_text(backend)
    with pytest.raises(TypeError, match=r"requests\[1\]: a RawPrompt .* chat-only backends"):
        backend.fits(["fine", RawPrompt("raw")], 8)
    with pytest.raises(TypeError, match=r"requests\[0\]: a RawPrompt"):
        backend.generate([RawPrompt("raw")], 8)


# ---------------------------------------------------------------------------------- task formats


class FakeLocal(EchoBackend):
    """A local model: takes raw text and scores log-likelihoods; replies from the prompt's text."""

    name = "fake-local"

    def __init__(self, reply):
        super().__init__()
        self.reply = reply

    def generate(self, requests, max_new_tokens, on_result=None):
        self.asked += list(requests)
        return [self.reply(r.text if isinstance(r, RawPrompt) else r[-1]["content"]) for r in requests]

    def loglikelihood(self, pairs, on_result=None):
        return [(-float(len(k)), False) for _, k in pairs]


class FakeChatAPI(FakeLocal):
    name = "fake-chat"
    accepts_raw_text = False
    loglikelihood = None


@pytest.fixture()
def qa_tasks(tmp_path):
    nq = tmp_path / "nq.jsonl"
    nq.write_text(json.dumps({"question": "capital of france", "answer": ["Paris"]}) + "\n", encoding="utf-8")
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(json.dumps({"question": "What is 6 times 7?", "answer": "#### 42"}) + "\n", encoding="utf-8")
    return nq, gsm


def test_generative_tasks_default_to_raw_text_on_a_local_model(qa_tasks):
    nq, gsm = qa_tasks
    # a raw continuation runs on past the answer; the harness's `until` cuts it
    local = FakeLocal(lambda text: " Paris\nQ: capital of italy?\nA: Rome" if "france" in text
                      else " 6 x 7 = 42. The answer is 42.\n\nQ: next")
    tasks = [g.prepare_task("nq_open", {"path": str(nq)}), g.prepare_task("gsm8k", {"path": str(gsm), "n_shot": 2})]
    assert {g.resolve_prompt_format(t, True) for t in tasks} == {"raw"}
    rows = [r for t in tasks for r in g.evaluate_task(local, t, "original")]
    assert all(isinstance(r, RawPrompt) for r in local.asked)
    assert local.asked[0].text == "Answer these questions:\n\nQ: capital of france?\nA:"
    assert local.asked[1].text == g.fewshot_text(tasks[1].spec, tasks[1].items[0], tasks[1].shots_for(tasks[1].items[0]))
    assert [r["prompt_format"] for r in rows] == ["raw", "raw"]
    assert rows[0]["answer"] == "Paris" and rows[0]["em"] == 1.0
    assert rows[1]["exact_strict"] == 1.0 and "next" not in rows[1]["answer"]
    summary = g.summarize_benchmarks(rows, n_boot=200)
    assert {s["prompt_format"] for s in summary} == {"raw"}
    assert all(spec.prompt_format == "raw" for spec in g.TASKS.values())


def test_a_profile_asks_for_the_chat_template_and_chat_apis_always_get_it(qa_tasks):
    nq, _ = qa_tasks
    chat_task = g.prepare_task("nq_open", {"path": str(nq), "prompt_format": "chat"})
    local = FakeLocal(lambda text: "Paris.")
    rows = g.evaluate_task(local, chat_task, "original")
    assert local.asked == [[{"role": "user", "content": "Answer these questions:\n\nQ: capital of france?\nA:"}]]
    assert rows[0]["prompt_format"] == "chat" and rows[0]["em"] == 1.0

    api = FakeChatAPI(lambda text: "Paris.")
    auto_task = g.prepare_task("nq_open", {"path": str(nq)})
    rows = g.evaluate_task(api, auto_task, "api")
    assert isinstance(api.asked[0], list) and rows[0]["prompt_format"] == "chat"
    raw_task = g.prepare_task("nq_open", {"path": str(nq), "prompt_format": "raw"})
    rows = g.evaluate_task(api, raw_task, "api")
    assert rows[0]["skipped"].startswith("raw text (no chat template) asked for") and rows[0]["prompt_format"] is None


def test_mmlu_generative_on_raw_text_reads_the_first_line_like_the_harness():
    spec = g.TASKS["mmlu"]
    item = g.Item("mmlu", "x/0", "q?", ("a", "b", "c", "d"), 1, group="x")
    raw = g.score_item(spec, item, "generate", response=" B\n\nThe answer is (C)", prompt_format="raw")
    assert raw["answer"] == "B" and raw["acc"] == 1.0
    chat = g.score_item(spec, item, "generate", response="Let me think.\nThe answer is (B).", prompt_format="chat")
    assert chat["answer"] == "B", "a chat reply is searched whole"


def _params(**overrides):
    data = {"profile": "smoke", "params_root": str(ROOT / "params"),
            "models": {"original": {"model": "smollm2-135m-instruct"}}, "tasks": {"mmlu": {"max_examples": 5}}}
    return from_mapping(notebooks.GeneralBenchmarksNotebookParams, {**data, **overrides})


def test_params_take_a_prompt_format_per_task_and_refuse_what_cannot_run():
    p = _params(tasks={"gsm8k": {"prompt_format": "chat"}, "triviaqa": {}})
    assert p.tasks["gsm8k"].prompt_format == "chat" and p.tasks["triviaqa"].prompt_format == "auto"
    assert p.raw_text() is True
    api = {"original": {"model": "gpt-3.5-turbo-1106", "kind": "openai"}}
    assert _params(models=api, tasks={"gsm8k": {}}).raw_text() is False
    with pytest.raises(ParamError, match=r"tasks\.gsm8k\.prompt_format: model 'original' is a openai backend"):
        _params(models=api, tasks={"gsm8k": {"prompt_format": "raw"}})
    with pytest.raises(ParamError, match=r"tasks\.hellaswag\.prompt_format: hellaswag is scored by log-likelihood"):
        _params(tasks={"hellaswag": {"prompt_format": "chat"}})
    with pytest.raises(ParamError, match=r"tasks\.triviaqa\.prompt_format"):
        _params(tasks={"triviaqa": {"prompt_format": "template"}})


def test_conventions_table_says_which_format_each_task_runs_in(qa_tasks):
    nq, gsm = qa_tasks
    tasks = [g.prepare_task("gsm8k", {"path": str(gsm), "n_shot": 2, "prompt_format": "chat"}),
             g.prepare_task("nq_open", {"path": str(nq)})]
    local = general_tables.conventions_table(tasks, "multiturn", raw_text=True)["prompt format"].tolist()
    assert local == ["chat template, shots multiturn (asked by the profile: prompt_format chat)",
                     "raw text, no chat template (harness default)"]
    api = general_tables.conventions_table(tasks, "single_turn", raw_text=False)["prompt format"].tolist()
    assert api[1] == "chat template (chat API: no raw text)"
