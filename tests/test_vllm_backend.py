"""kvlib.engine.backends.VLLMBackend without vLLM or a GPU: a stand-in `vllm` module whose engine computes with
transformers (greedy generate, prompt log-probs from one forward pass) returns vLLM's output structures, so
kvlib's glue (tokenization handed over as ids, stopping, decoding, log-prob indexing, is_greedy) must
reproduce HFBackend's answers and scores exactly. vLLM itself is exercised on the GPU profiles."""
from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from kvlib.engine.backends import VLLMBackend, build_backend
from kvlib.engine.config import ParamError
from kvlib.engine.models import DEFAULT_MODEL

PROMPTS = [
    "What is 2+2?",
    "Dictionary [3] {122: 765, 4548: 1475}\nWhat is the value of key 4548?",
    [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Name a color."}],
]
PAIRS = [
    ("The capital of France is", " Paris"),
    ("Question: Which number is largest?\nA. 3\nB. 9\nAnswer:", " B"),
    ([{"role": "user", "content": "What is 2+2?"}], "4"),
    ("Once upon a time", " there was a cat."),
]


class FakeSamplingParams:
    def __init__(self, temperature=1.0, max_tokens=16, stop_token_ids=None, skip_special_tokens=True,
                 prompt_logprobs=None):
        assert temperature == 0.0  # kvlib only decodes greedily
        self.max_tokens, self.stop_token_ids, self.prompt_logprobs = max_tokens, stop_token_ids, prompt_logprobs


class FakeLLM:
    """vLLM's offline engine as far as kvlib uses it: generate(list of {"prompt_token_ids"}, params)."""

    created: list[dict] = []

    def __init__(self, model, **kwargs):
        from transformers import AutoModelForCausalLM

        FakeLLM.created.append({"model": model, **kwargs})
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    @torch.inference_mode()
    def generate(self, prompts, params, use_tqdm=True):
        outputs = []
        for prompt in prompts:
            ids = torch.tensor([prompt["prompt_token_ids"]])
            if params.prompt_logprobs is not None:
                logprobs = self.model(ids).logits[0].float().log_softmax(-1)
                table = [None]  # vLLM: no log-prob for the first prompt token
                for j in range(1, ids.shape[1]):
                    row, token = logprobs[j - 1], int(ids[0, j])
                    top = int(row.argmax())
                    table.append({t: SimpleNamespace(logprob=float(row[t])) for t in (token, top)})
                outputs.append(SimpleNamespace(prompt_logprobs=table, outputs=[SimpleNamespace(token_ids=[0])]))
            else:
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                          max_new_tokens=params.max_tokens, eos_token_id=params.stop_token_ids)
                # vLLM keeps the stop token at the end of token_ids
                outputs.append(SimpleNamespace(outputs=[SimpleNamespace(token_ids=out[0, ids.shape[1]:].tolist())]))
        return outputs


@pytest.fixture()
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.__version__ = "0.0-fake"
    module.LLM, module.SamplingParams = FakeLLM, FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    FakeLLM.created.clear()
    return module


def test_vllm_backend_answers_and_scores_like_hf(fake_vllm, hf_backend, monkeypatch):
    backend = build_backend({"kind": "vllm", "model": DEFAULT_MODEL}, progress=False)
    assert isinstance(backend, VLLMBackend)
    (engine,) = FakeLLM.created
    assert engine["dtype"] == "bfloat16" and engine["max_model_len"] == hf_backend.context_length()
    assert engine["enable_prefix_caching"] is True
    monkeypatch.setattr(backend, "chunk", 2)  # several engine calls, results stored as each one finishes
    seen = []
    assert backend.generate(PROMPTS, 12, on_result=lambda i, a: seen.append(i)) == hf_backend.generate(PROMPTS, 12)
    assert seen == [0, 1, 2]
    for (a, greedy_a), (b, greedy_b) in zip(backend.loglikelihood(PAIRS), hf_backend.loglikelihood(PAIRS)):
        assert a == pytest.approx(b, abs=1e-3) and greedy_a == greedy_b
    identity = backend.identity()
    assert identity["backend"] == "vllm" and identity["vllm_version"] == "0.0-fake"
    assert identity["model"] == hf_backend.identity()["model"]
    assert identity["chat_template_sha256"] == hf_backend.identity()["chat_template_sha256"]
    assert backend.fits(PROMPTS, 8) == [True] * 3 and backend.prompt_lengths(PROMPTS) == hf_backend.prompt_lengths(PROMPTS)


def test_vllm_backend_needs_vllm(monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError
    with pytest.raises(RuntimeError, match="needs vLLM"):
        build_backend({"kind": "vllm"}, progress=False)


def test_vllm_backend_params():
    with pytest.raises(ParamError, match=r"backend\.gpu_memory_utilization: must be in \(0, 1\]"):
        build_backend({"kind": "vllm", "gpu_memory_utilization": 1.5})


def test_kind_auto_is_transformers_without_cuda_or_vllm(monkeypatch):
    from kvlib.engine import backends

    monkeypatch.setattr(backends.torch.cuda, "is_available", lambda: False)
    assert not backends.vllm_usable()
    backend = build_backend({"kind": "auto", "dtype": "float32"}, progress=False)
    assert backend.name == "hf"


def test_local_runs_take_any_local_kind_and_openai_runs_only_openai():
    from kvlib.pipeline.notebooks import model_configs

    # the smoke profile's 02 params define HF runs (simple-template, ...) and no OpenAI run
    for kind in ("hf", "vllm", "auto"):
        (config,) = model_configs({"m": {"run": "simple-template", "kind": kind}}, None, "smoke").values()
        assert config.kind == kind
    with pytest.raises(ParamError, match=r"models\.m\.kind: run 'simple-template' is an hf run: set kind: hf, vllm"):
        model_configs({"m": {"run": "simple-template", "kind": "openai"}}, None, "smoke")
