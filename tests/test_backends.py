"""kvlib.engine.backends: the HF backend's batched greedy generation, context-length checks, log-likelihoods, dtype
resolution and params. Uses the embedded model (session fixtures in conftest.py) with short prompts and few new
tokens, so the file runs in well under a minute on 2 CPU cores. kvlib's own decoder and stop rules:
tests/test_decoder.py."""
from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch

from kvlib.engine import backends
from kvlib.engine.backends import (
    Backend,
    BackendConfig,
    ContextLengthError,
    HFBackend,
    build_backend,
    cpu_supports_bf16,
    plan_batches,
    resolve_eval_dtype,
    to_messages,
)
from kvlib.engine.config import ParamError, from_mapping

# different lengths, deliberately not sorted, and with different answers, so a wrong reordering shows
PROMPTS = [
    "What is 2+2?",
    "Dictionary [3] {122: 765, 4548: 1475}\nWhat is the value of key 4548?",
    "Say only the word yes.",
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}],
    "Name the capital of France.",
]
MAX_NEW = 12


# ------------------------------------------------------------------------------------------ generation


def test_batched_generation_equals_one_at_a_time_in_original_order(hf_backend):
    assert hf_backend.batch_size < len(PROMPTS)  # several batches, each sorted by length
    batched = hf_backend.generate(PROMPTS, MAX_NEW)
    single = [hf_backend.generate([prompt], MAX_NEW)[0] for prompt in PROMPTS]
    assert batched == single
    assert len(set(batched)) == len(PROMPTS)  # distinct answers: equality above also proves the order
    assert all(isinstance(text, str) and text == text.strip() for text in batched)
    assert hf_backend.generate([], MAX_NEW) == []


def test_generation_batches_respect_max_batch_tokens(hf_backend, monkeypatch):
    monkeypatch.setattr(hf_backend, "decoder", "generate")  # the left-padded batches of transformers' generate()
    sizes = []
    run_batch = hf_backend._generate_batch

    def recording_run_batch(prompts, *args):
        sizes.append(len(prompts))
        return run_batch(prompts, *args)

    monkeypatch.setattr(hf_backend, "_generate_batch", recording_run_batch)
    lengths = hf_backend.prompt_lengths(PROMPTS[:3])
    # room for two rows of the longest prompt + max_new_tokens, not three
    monkeypatch.setattr(hf_backend, "max_batch_tokens", 2 * (max(lengths) + 4))
    assert hf_backend.generate(PROMPTS[:3], 4) == [hf_backend.generate([p], 4)[0] for p in PROMPTS[:3]]
    assert sizes[0] == 2 and sum(sizes[:2]) == 3


def test_prefix_cache_reuses_shared_prefixes_and_answers_like_batches(hf_backend, monkeypatch):
    # decoder "generate": prompts sharing long prefixes go one at a time through generate() with the cached prefix
    monkeypatch.setattr(hf_backend, "decoder", "generate")
    context = "Dictionary [1] {122: 765, 4548: 1475, 93: 3021}\nDictionary [2] {77: 12, 5012: 8810}\n"
    prompts = PROMPTS + [context + f"What is the value of key {key}?" for key in (4548, 5012, 93)]
    batched = hf_backend.generate(prompts, MAX_NEW)
    reused, batch_sizes = [], []  # tokens already in the cache when each shared prompt starts; batched rows
    generate, generate_batch = hf_backend.model.generate, hf_backend._generate_batch

    def recording_generate(**kwargs):
        if hf_backend._cache_kwarg in kwargs:
            reused.append(kwargs[hf_backend._cache_kwarg].get_seq_length())
        return generate(**kwargs)

    def recording_batch(batch, *args):
        batch_sizes.append(len(batch))
        return generate_batch(batch, *args)

    monkeypatch.setattr(hf_backend.model, "generate", recording_generate)
    monkeypatch.setattr(hf_backend, "_generate_batch", recording_batch)
    monkeypatch.setattr(hf_backend, "prefix_cache", True)
    ids = hf_backend._encode_prompts(prompts)
    header = backends.shared_prefix_length(ids[0], ids[2])  # what every prompt shares: the template's header
    shared_context = len(hf_backend._encode_prompts([context + "What"])[0]) - 3  # minus the template's end
    assert header < shared_context
    monkeypatch.setattr(hf_backend, "prefix_min_shared", header + 8)
    seen = []
    assert hf_backend.generate(prompts, MAX_NEW, on_result=lambda i, a: seen.append(i)) == batched
    assert sorted(seen) == list(range(len(prompts)))
    sharing = backends.prompts_sharing_prefixes(ids, header + 8)
    assert sorted(sharing) == [5, 6, 7]  # the three dictionary questions; the others went in batches
    assert sum(batch_sizes) == len(PROMPTS) and max(batch_sizes) > 1
    in_order = [ids[i] for i in sharing]
    assert reused == [0] + [backends.shared_prefix_length(a, b) for a, b in zip(in_order, in_order[1:])]
    assert all(n >= shared_context for n in reused[1:])
    assert "prefix_cache" not in hf_backend.identity()  # how answers are computed, like batch_size


def test_shared_prefix_length():
    assert backends.shared_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert backends.shared_prefix_length([], [1]) == 0
    assert backends.shared_prefix_length([1, 2], [1, 2]) == 2
    assert backends.shared_prefix_length([7], [1, 7]) == 0
    prompts = [[1, 2, 3, 9], [5, 6], [1, 2, 3, 4], [1, 2, 8], [5, 7]]
    assert backends.prompts_sharing_prefixes(prompts, 3) == [2, 0]  # lexicographic order, pairs sharing >= 3
    assert backends.prompts_sharing_prefixes(prompts, 2) == [2, 0, 3]
    assert backends.prompts_sharing_prefixes(prompts, 1) == [2, 0, 3, 1, 4]
    assert backends.prompts_sharing_prefixes([], 1) == []


def test_generation_stops_at_end_of_turn(hf_backend):
    (text,) = hf_backend.generate(["Say only the word yes."], 32)
    assert "<|im_end|>" not in text and "<|im_start|>" not in text
    assert "yes" in text.lower()
    n_tokens = len(hf_backend.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert n_tokens < 8  # stopped at <|im_end|>, long before max_new_tokens
    assert backends.end_of_turn_ids(hf_backend.tokenizer) == [hf_backend.tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_bf16_backend_generates_and_scores(hf_backend_bf16):
    assert hf_backend_bf16.identity()["dtype"] == "bfloat16"
    assert next(hf_backend_bf16.model.parameters()).dtype == torch.bfloat16
    (text,) = hf_backend_bf16.generate(["Say only the word yes."], 16)
    assert "yes" in text.lower() and "<|im_end|>" not in text
    ((logprob, _),) = hf_backend_bf16.loglikelihood([("The capital of France is", " Paris")])
    assert math.isfinite(logprob) and logprob < 0


def test_request_validation(hf_backend):
    with pytest.raises(TypeError, match="expected a list of requests"):
        hf_backend.generate("a bare string", MAX_NEW)
    with pytest.raises(TypeError, match=r"requests\[1\]"):
        hf_backend.generate(["ok", {"role": "user", "content": "a message, not a conversation"}], MAX_NEW)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_new_tokens"):
            hf_backend.generate(["hi"], bad)
    with pytest.raises(TypeError, match=r"role must be one of"):
        to_messages([{"role": "robot", "content": "hi"}])
    assert to_messages("hi") == [{"role": "user", "content": "hi"}]


def test_plan_batches_longest_first_and_bounded():
    lengths = [5, 30, 10, 30, 20]
    assert plan_batches(lengths, batch_size=2) == [[1, 3], [4, 2], [0]]  # ties keep request order
    assert plan_batches(lengths, batch_size=8, max_batch_tokens=60) == [[1, 3], [4, 2, 0]]
    assert plan_batches([100, 1], batch_size=8, max_batch_tokens=10) == [[0], [1]]  # too long: alone
    assert plan_batches([], batch_size=4) == []


# -------------------------------------------------------------------------------------- context length


def test_prompt_lengths_match_the_chat_template(hf_backend):
    tokenizer = hf_backend.tokenizer
    expected = [
        len(tokenizer.apply_chat_template(to_messages(p), add_generation_prompt=True, tokenize=True, return_dict=False))
        for p in PROMPTS
    ]
    assert hf_backend.prompt_lengths(PROMPTS) == expected
    assert hf_backend.context_length() == hf_backend.model.config.max_position_embeddings == 8192


def test_over_length_requests_raise_with_indices(hf_backend):
    limit = hf_backend.context_length()
    long_prompt = "word " * (limit + 100)
    requests = ["hi", long_prompt, "hello", long_prompt]
    assert hf_backend.fits(requests, MAX_NEW) == [True, False, True, False]
    with pytest.raises(ContextLengthError, match=r"2 request\(s\) exceed .* 8192 tokens.*indices 1 \(\d+ tokens\), 3 ") as info:
        hf_backend.generate(requests, MAX_NEW)
    assert info.value.indices == [1, 3] and info.value.limit == limit

    # the bound is prompt + max_new_tokens <= context length, exactly
    (n,) = hf_backend.prompt_lengths(["hi"])
    assert hf_backend.fits(["hi"], limit - n) == [True]
    assert hf_backend.fits(["hi"], limit - n + 1) == [False]
    with pytest.raises(ContextLengthError, match="indices 0 "):
        hf_backend.generate(["hi"], limit - n + 1)
    with pytest.raises(ContextLengthError, match=r"indices 1 "):
        hf_backend.loglikelihood([("short", " context"), (long_prompt, " end")])


# -------------------------------------------------------------------------------------- loglikelihood


def test_loglikelihood_greedy_continuation(hf_backend):
    question = [{"role": "user", "content": "Say only the word yes."}]
    (answer,) = hf_backend.generate([question], 16)
    (greedy, is_greedy), (other, other_greedy) = hf_backend.loglikelihood(
        [(question, answer), (question, "Purple elephants dance.")]
    )
    assert is_greedy and not other_greedy
    assert greedy > other
    for value in (greedy, other):
        assert math.isfinite(value) and value < 0


def test_loglikelihood_batched_equals_unbatched(hf_backend, monkeypatch):
    requests = [
        ("The capital of France is", " Paris"),
        ("Dictionary [3] {122: 765, 4548: 1475}. The value of key 4548 is", " 1475"),
        ([{"role": "user", "content": "What is 2+2?"}], "4"),
        ("Once upon a time", " there was a cat who lived in a small house."),
        ("", "Hello"),  # empty context: scored after BOS
    ]
    batched = hf_backend.loglikelihood(requests)
    monkeypatch.setattr(hf_backend, "batch_size", 1)
    unbatched = hf_backend.loglikelihood(requests)
    for (a, greedy_a), (b, greedy_b) in zip(batched, unbatched):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
        assert math.isfinite(a) and a < 0


def test_loglikelihood_choices_of_one_context_share_a_forward_pass(hf_backend, monkeypatch):
    question = "Question: Which number is largest?\nA. 3\nB. 9\nC. 1\nD. 4\nAnswer:"
    other = "Question: Which color is the sky?\nA. blue\nB. red\nC. green\nD. black\nAnswer:"
    requests = [(q, f" {letter}") for q in (question, other) for letter in "ABCD"] + [(other, " blue sky")]
    rows = []
    score = hf_backend._score_batch

    def recording_score(groups, *args):
        rows.append(len(groups))
        return score(groups, *args)

    monkeypatch.setattr(hf_backend, "_score_batch", recording_score)
    seen = []
    shared = hf_backend.loglikelihood(requests, on_result=lambda i, r: seen.append(i))
    assert sum(rows) == 3  # one pass per question for its four one-token letters, one for " blue sky"
    assert sorted(seen) == list(range(len(requests)))
    alone = [hf_backend.loglikelihood([request])[0] for request in requests]
    for (a, greedy_a), (b, greedy_b) in zip(shared, alone):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert len({round(a, 4) for a, _ in shared[:4]}) == 4  # four different letters, four different scores
    assert sum(greedy for _, greedy in shared[:4]) <= 1  # at most one letter is the greedy next token


def test_loglikelihood_context_boundary_like_lm_eval(hf_backend):
    # trailing whitespace of a raw context belongs to the continuation, so both spellings score " Paris"
    pairs = [("The capital of France is ", "Paris"), ("The capital of France is", " Paris")]
    (context_a, continuation_a), (context_b, continuation_b) = (hf_backend._encode_pair(p, "p") for p in pairs)
    assert (context_a, continuation_a) == (context_b, continuation_b)
    assert hf_backend.tokenizer.decode(continuation_a) == " Paris"
    (a, _), (b, _) = hf_backend.loglikelihood(pairs)
    assert a == pytest.approx(b, abs=1e-4)  # same tokens; rows of one batch may round differently
    with pytest.raises(TypeError, match="non-empty string"):
        hf_backend.loglikelihood([("context", "")])
    with pytest.raises(TypeError, match=r"requests\[0\]: expected a \(context, continuation\) pair"):
        hf_backend.loglikelihood(["no pair"])


# ------------------------------------------------------------------------------------ dtype and device


FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx2 avx512f avx512bw {extra}
bogomips\t: 4800.00
"""


def test_cpu_supports_bf16_parses_cpuinfo():
    assert cpu_supports_bf16(FAKE_CPUINFO.format(extra="avx512_bf16 avx512_vnni"))
    assert cpu_supports_bf16(FAKE_CPUINFO.format(extra="amx_bf16 amx_tile"))
    assert not cpu_supports_bf16(FAKE_CPUINFO.format(extra="avx512_vnni"))
    assert not cpu_supports_bf16("")
    assert not cpu_supports_bf16("model name\t: avx512_bf16 lookalike\nflags\t: sse2\n")  # only the flags line
    assert isinstance(cpu_supports_bf16(), bool)  # this machine


def test_the_evaluation_dtype_is_never_timed(monkeypatch):
    def timing(*args, **kwargs):
        raise AssertionError("the evaluation dtype must never depend on a timing")

    monkeypatch.setattr(time, "perf_counter", timing)
    monkeypatch.setattr(time, "time", timing)
    monkeypatch.setattr(backends, "cpu_supports_bf16", lambda cpuinfo=None: True)  # a CPU with native bf16
    assert resolve_eval_dtype("cpu", "auto") == "float32"


def test_resolve_eval_dtype(monkeypatch):
    for native in (True, False):
        monkeypatch.setattr(backends, "cpu_supports_bf16", lambda cpuinfo=None: native)
        assert resolve_eval_dtype("cpu", "auto") == "float32"  # auto on a CPU: float32, whatever the CPU
        assert resolve_eval_dtype("cpu", "bfloat16") == "bfloat16"  # a profile states bf16
        assert resolve_eval_dtype("cpu", "float32") == "float32"
        assert resolve_eval_dtype(None, "auto") in ("float32", "bfloat16", "float16")  # CUDA: bf16 (fp16)
    with pytest.raises(ParamError, match="dtype: float16 is not supported on CPU"):
        resolve_eval_dtype("cpu", "float16")
    with pytest.raises(ParamError, match="dtype:"):
        resolve_eval_dtype("cpu", "fp8")


# ------------------------------------------------------------------------------------- identity, params


def test_identity_and_protocol(hf_backend):
    assert isinstance(hf_backend, Backend)
    identity = hf_backend.identity()
    assert identity["backend"] == "hf" and identity["dtype"] == "float32" and identity["device"] == "cpu"
    assert identity["attn_implementation"] == "sdpa"
    assert len(identity["model"]["weights_sha256"]) == 64 and len(identity["chat_template_sha256"]) == 64


def test_backend_config_validation():
    assert from_mapping(BackendConfig, {}) == BackendConfig()
    with pytest.raises(ParamError, match=r"backend\.batchsize: unknown parameter \(did you mean 'batch_size'\?\)"):
        build_backend({"batchsize": 4})
    with pytest.raises(ParamError, match=r"backend\.batch_size: must be >= 1"):
        build_backend({"batch_size": 0})
    with pytest.raises(ParamError, match=r"backend\.max_batch_tokens: must be >= 1"):
        build_backend({"max_batch_tokens": 0})
    with pytest.raises(ParamError, match=r"backend\.prefix_cache"):
        build_backend({"prefix_cache": "yes"})
    with pytest.raises(ParamError, match=r"backend\.decoder: must be one of \['kvlib', 'generate'\]"):
        build_backend({"decoder": "static"})
    with pytest.raises(ParamError, match=r"backend\.threads: must be >= 1"):
        build_backend({"threads": 0})
    with pytest.raises(ParamError, match=r"backend\.kind: must be one of \['hf', 'vllm', 'auto', 'openai'\]"):
        build_backend({"kind": "tgi"})
    with pytest.raises(ParamError, match=r"backend\.run: give either model or run"):
        build_backend({"model": "x", "run": "y"})
    with pytest.raises(ParamError, match=r"backend\.model: kind openai needs"):
        build_backend({"kind": "openai"})
    with pytest.raises(ParamError, match=r"backend\.api_key_env: must name an environment variable"):
        build_backend({"kind": "openai", "model": "m", "api_key_env": "sk-abc123"})
    with pytest.raises(ParamError, match=r"backend\.base_url: must be an http"):
        build_backend({"kind": "openai", "model": "m", "base_url": "localhost:8000"})
    with pytest.raises(ValueError, match="not resolved to a model"):
        build_backend({"run": "simple-template"})
    with pytest.raises(ParamError, match="batch_size: must be >= 1"):  # the constructor validates the same way
        HFBackend(batch_size=0)


def test_dtype_auto_is_recorded_as_resolved(tiny_llama_dir):
    from kvlib.engine.evaluate import result_fields

    backend = build_backend({"model": tiny_llama_dir, "dtype": "auto", "device": "cpu"}, progress=False)
    assert backend.identity()["dtype"] == "float32" and next(backend.model.parameters()).dtype == torch.float32
    assert result_fields(backend, 4)["dtype"] == "float32"  # never "auto"


def test_tiny_random_llama_loads_by_path(tiny_llama_dir):
    backend = build_backend({"model": tiny_llama_dir, "dtype": "float32", "device": "cpu", "batch_size": 2},
                            progress=False)
    assert isinstance(backend, HFBackend) and backend.context_length() == 128
    outputs = backend.generate(["hi", "hello there", "a"], 5)
    assert len(outputs) == 3 and all(isinstance(text, str) for text in outputs)
    assert backend.fits(["hi", "word " * 200], 5) == [True, False]
    ((logprob, _),) = backend.loglikelihood([("hello", " world")])
    assert math.isfinite(logprob) and logprob < 0
    assert backend.identity()["model"]["path"] == str(Path(tiny_llama_dir).resolve())
