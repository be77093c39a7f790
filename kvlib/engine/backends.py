"""Model backends: the one home for turning prompts into completions (and continuations into log-likelihoods)
for every evaluation in kvlib.

Every backend follows the `Backend` protocol: a `name`, an `identity()` recorded with results (what exactly
produced them), and `generate(requests, max_new_tokens, stop=None) -> list[str]`. A *request* is a list of chat
messages (``[{"role": ..., "content": ...}, ...]``) or a plain string, which means one user message; both go
through the chat template. A `RawPrompt(text)` is the exception: plain text that a local model continues as it
is, without the chat template (lm-evaluation-harness's default for generative tasks), tokenized as the tokenizer
encodes text by default (a BOS token where the tokenizer adds one). Only backends whose `accepts_raw_text` is
True take one (the local ones); a chat API (`OpenAIChatBackend`) has no way to send text without its server's
chat template and rejects it with a TypeError before asking anything. Decoding is greedy (temperature 0) and
stops at the end of the assistant's turn (raw text: the end of sequence), or where a task's `StopRule` says its
answer ends (the scorer reads nothing after it). Evaluations pick a backend by params through
`BackendConfig` / `build_backend`.

Three backends: `HFBackend` (a local Hugging Face model in transformers), `VLLMBackend` (the same model in
vLLM's offline engine, on a GPU) and `OpenAIChatBackend` (any OpenAI-compatible chat API: OpenAI itself, vLLM's
or llama.cpp's server). Both take an optional `on_result(index, result)` callback, called as
each answer arrives, which is how kvlib.engine.cache.CachedBackend stores every response the moment it exists.
The local backends record what each call computed and how long it took (kvlib.engine.meter, tagged `meter_tags`):
the cost records a planner predicts the next run's wall time from.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import inspect
import json
import os
import re
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Protocol, Sequence, Union, runtime_checkable
from urllib.parse import urlparse

import torch
from tqdm.auto import tqdm

from kvlib.engine import meter
from kvlib.engine.config import check_positive, fail, from_mapping
from kvlib.engine.io import sha256_text
from kvlib.engine.models import (  # noqa: F401 - end_of_turn_ids is part of this module's interface
    DEFAULT_MODEL,
    check_model_spec,
    default_device_dtype,
    end_of_turn_ids,
    fit_to_template,
    load_model,
    load_tokenizer,
    model_identity,
    parameter_count,
    resolve_model,
)

Message = Mapping[str, str]


@dataclasses.dataclass(frozen=True)
class RawPrompt:
    """A generation request given to a local model as plain text, without the chat template: the model
    continues `text` itself (lm-evaluation-harness's default for generative tasks). Tokenized as the tokenizer
    encodes text by default, so with a BOS token where the tokenizer adds one (as the harness's HF model does),
    except when `text` already starts with the BOS token's text. Chat APIs cannot take one (`accepts_raw_text`)."""

    text: str

    def __post_init__(self) -> None:
        if not isinstance(self.text, str) or not self.text:
            raise TypeError(f"RawPrompt: expected non-empty text, got {self.text!r}")


# a plain user prompt, a chat conversation (both through the chat template), or raw text (no template)
Request = Union[str, Sequence[Message], RawPrompt]
LoglikelihoodRequest = tuple[Request, str]  # (context, continuation)

_ROLES = ("system", "user", "assistant")
# CPU flags of native bfloat16 arithmetic (Intel Cooper Lake+/Sapphire Rapids+, AMD Zen 4+). Without them
# PyTorch emulates bf16 on CPU, which is slower than float32.
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ContextLengthError(ValueError):
    """Some requests do not fit the model's context window. Nothing is truncated or skipped silently: the
    caller decides (drop and report them, or use a longer-context model). `indices` are positions in the
    request list."""

    def __init__(self, indices: list[int], lengths: list[int | None], limit: int | None, what: str,
                 results: list | None = None):
        # results: the answers of the other requests when the backend got them before finding out (an API
        # server rejects an over-length prompt itself), with None at `indices`; None if nothing was generated
        self.indices, self.lengths, self.limit, self.what, self.results = indices, lengths, limit, what, results
        shown = ", ".join(f"{i} ({n} tokens)" if n is not None else str(i)
                          for i, n in zip(indices[:20], lengths[:20]))
        more = f", ... ({len(indices) - 20} more)" if len(indices) > 20 else ""
        limit_text = f"of {limit} tokens" if limit is not None else "(the server's limit)"
        super().__init__(
            f"{len(indices)} request(s) exceed the model's context length {limit_text} ({what}): "
            f"indices {shown}{more}. Check with fits() first and drop or report them; nothing is truncated."
        )


@runtime_checkable
class Backend(Protocol):
    """What every model backend offers an evaluation."""

    name: str
    accepts_raw_text: bool  # whether generate() takes RawPrompt requests (text without the chat template)

    def identity(self) -> dict:
        """Plain-data description of exactly what generates (model, weights hash, dtype, ...), for results."""
        ...

    def generate(self, requests: Sequence[Request], max_new_tokens: int,
                 on_result: Callable[[int, str], None] | None = None, stop: StopRule | None = None) -> list[str]:
        """Greedy completions of `requests`, in their order, stripped of surrounding whitespace and cut where
        `stop` says the answer ends; `on_result(i, answer)` is called as each one arrives. (A backend without
        `stop` still works through `generate_until`, which cuts its whole replies.)"""
        ...

    def fits(self, requests: Sequence[Request], max_new_tokens: int) -> list[bool]:
        """Whether each request fits the context window with room for max_new_tokens (True when unknown)."""
        ...


# ---------------------------------------------------------------------------------------- requests


def to_messages(request: Request, where: str = "request") -> list[dict]:
    """The chat messages of a request: a string becomes one user message; a conversation is checked and
    copied into plain dicts (so callers may pass any Mapping, and caches can hash the result). A RawPrompt has
    no chat form: TypeError."""
    if isinstance(request, str):
        return [{"role": "user", "content": request}]
    if isinstance(request, RawPrompt):
        raise TypeError(f"{where}: a RawPrompt is text for a local model without the chat template, not a chat "
                        f"conversation; chat-only backends (kind openai) take a string or chat messages")
    if not isinstance(request, Sequence) or not request:
        raise TypeError(f"{where}: expected a prompt string or a non-empty list of chat messages, got {request!r}")
    messages = []
    for i, message in enumerate(request):
        if not isinstance(message, Mapping) or set(message) != {"role", "content"}:
            raise TypeError(f"{where}[{i}]: expected a mapping with exactly 'role' and 'content', got {message!r}")
        if message["role"] not in _ROLES or not isinstance(message["content"], str):
            raise TypeError(f"{where}[{i}]: role must be one of {list(_ROLES)} and content a string, got {message!r}")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def request_payload(request: Request, where: str = "request") -> list[dict] | dict:
    """A request as plain JSON data, what the response cache keys and stores: the chat messages of a chat
    request (`to_messages`), ``{"raw_text": text}`` for a RawPrompt, so the same text sent raw and as a user
    message can never share a cached answer."""
    if isinstance(request, RawPrompt):
        return {"raw_text": request.text}
    return to_messages(request, where)


def accepts_raw_text(backend: Any) -> bool:
    """Whether `backend` (or the backend a kvlib.engine.cache.CachedBackend wraps) takes RawPrompt requests."""
    return bool(getattr(getattr(backend, "backend", backend), "accepts_raw_text", False))


def check_max_new_tokens(max_new_tokens: Any) -> int:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    return max_new_tokens


@dataclasses.dataclass(frozen=True)
class StopRule:
    """Where an answer ends for the scorer that reads it, so that decoding can stop there.

    A task declares it next to its scorer (kvlib.tasks.mdqa, kvlib.tasks.general, ...) and passes it with its requests as
    `generate(..., stop=rule)`. The answer is the reply cut at the earliest of:
      * `first_line`: the first line break after the reply's first non-blank character (LitM's MDQA metric
        and short-answer metrics read `reply.strip().split("\\n")[0]` and nothing after it);
      * `strings`: the first occurrence of any of these strings, which is dropped (lm-evaluation-harness's
        `until`);
      * `pattern`: the end of the first match of this regular expression, which is kept (the end of a
        template sentence). It should match the same span in every text that starts with that span.
    and whitespace-stripped. A cut made while decoding equals the cut of the whole reply decoded to the end:
    everything before a cut point is already in the text when the cut is found. So a backend may stop at
    the cut (kvlib's HF decoder does) or decode on and cut afterwards (`apply`); the answers are the same.
    The rule is part of the response-cache key (kvlib.engine.cache): a stopped answer never stands for a whole one.
    """

    first_line: bool = False
    strings: tuple[str, ...] = ()
    pattern: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.first_line, bool):
            raise TypeError(f"StopRule.first_line must be a bool, got {self.first_line!r}")
        strings = (self.strings,) if isinstance(self.strings, str) else tuple(self.strings)
        if not all(isinstance(s, str) and s for s in strings):
            raise TypeError(f"StopRule.strings must be non-empty strings, got {self.strings!r}")
        object.__setattr__(self, "strings", strings)
        if self.pattern is not None:
            if not isinstance(self.pattern, str) or not self.pattern:
                raise TypeError(f"StopRule.pattern must be a non-empty regular expression, got {self.pattern!r}")
            re.compile(self.pattern)  # fail now, not mid-generation
        if not (self.first_line or self.strings or self.pattern):
            raise ValueError("a StopRule needs first_line, strings or pattern (no rule: pass stop=None)")

    def cut(self, text: str) -> str | None:
        """The answer `text` holds if the rule has fired in it (stripped), else None."""
        ends = []
        if self.first_line:
            start = len(text) - len(text.lstrip())
            newline = text.find("\n", start)
            if newline >= 0:
                ends.append(newline)
        for s in self.strings:
            at = text.find(s)
            if at >= 0:
                ends.append(at)
        if self.pattern is not None:
            match = _compiled(self.pattern).search(text)
            if match is not None:
                ends.append(match.end())
        if not ends:
            return None
        end = min(ends)
        for s in self.strings:  # a stop string begun before the cut but not complete yet would cut earlier
            if any(s.startswith(text[j:]) for j in range(max(0, len(text) - len(s) + 1), min(end, len(text)))):
                return None
        return text[:end].strip()

    def apply(self, text: str) -> str:
        """The answer in a whole reply: cut where the rule fires, else the reply stripped."""
        answer = self.cut(text)
        return text.strip() if answer is None else answer

    def key(self) -> dict:
        """Plain data for cache keys and result rows."""
        return {"first_line": self.first_line, "strings": list(self.strings), "pattern": self.pattern}

    def describe(self) -> str:
        parts = (["first line"] if self.first_line else []) + [f"before {s!r}" for s in self.strings] + (
            [f"after /{self.pattern}/"] if self.pattern else [])
        return "answer ends at the " + " or ".join(parts) if parts else ""


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> re.Pattern:
    return re.compile(pattern)


def accepts_stop(backend: Any) -> bool:
    """Whether `backend.generate` takes a `stop` rule (every kvlib backend does; a backend written against
    the older protocol does not, and its whole replies are cut afterwards by `generate_until`)."""
    try:
        parameters = inspect.signature(backend.generate).parameters
    except (TypeError, ValueError):
        return False
    return "stop" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def generate_until(backend: Any, requests: Sequence[Request], max_new_tokens: int, stop: StopRule | None,
                   on_result: Callable[[int, str], None] | None = None) -> list[str]:
    """`backend.generate(requests, max_new_tokens)` with answers ending where `stop` says: the backend stops
    there itself when it takes a stop rule, else its whole replies are cut (the same answers)."""
    if stop is None:
        return backend.generate(requests, max_new_tokens, on_result=on_result)
    if accepts_stop(backend):
        return backend.generate(requests, max_new_tokens, on_result=on_result, stop=stop)
    cut = None if on_result is None else (lambda i, answer: on_result(i, stop.apply(answer)))
    return [stop.apply(a) for a in backend.generate(requests, max_new_tokens, on_result=cut)]


# On a CPU, left-padded batches of long prompts are slower than one prompt at a time: the padding mask takes
# SDPA off its causal fast path and materialises rows x heads x length^2 attention scores. Measured with the
# embedded model (2 cores, float32, 32 new tokens, 8 prompts): 3.1K-token MDQA prompts 72 s batched by 8 vs
# 48 s one at a time; ~750-token prompts 12.2 s vs 13.9 s; ~50-token prompts 4.7 s vs 13.3 s. So a CPU batch
# holds at most this many padded tokens: prompts over half of it go alone, short ones still batch.
CPU_MAX_BATCH_TOKENS = 2048


def plan_batches(lengths: Sequence[int], batch_size: int, max_batch_tokens: int | None = None) -> list[list[int]]:
    """Indices of `lengths` grouped into batches, longest first, so each batch pads little.

    A batch holds at most `batch_size` rows and, when `max_batch_tokens` is set, at most that many padded
    tokens (rows x its longest length); a single longer item still gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: ties keep request order
    batches: list[list[int]] = []
    for i in order:
        current = batches[-1] if batches else None
        # longest first, so a batch's padded length is the length of its first item
        if current and len(current) < batch_size and (
            max_batch_tokens is None or (len(current) + 1) * lengths[current[0]] <= max_batch_tokens
        ):
            current.append(i)
        else:
            batches.append([i])
    return batches


def meter_tags(backend: str, dtype: str, device: str, model: Any) -> dict:
    """What a backend's cost records (kvlib.engine.meter) are tagged with: its numerics, device, kind of machine
    and model size, so that measured rates are only ever applied to work of the same kind."""
    return {"backend": backend, "numerics": dtype, "device": str(device).split(":")[0],
            "machine": meter.machine(str(device)), "parameters": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------------- devices and dtypes


@functools.lru_cache(maxsize=1)
def _read_cpuinfo() -> str:
    path = Path("/proc/cpuinfo")
    return path.read_text(errors="replace") if path.is_file() else ""


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU does bfloat16 arithmetic natively: an `avx512_bf16` or `amx_bf16` flag in the text of
    /proc/cpuinfo (`cpuinfo`, read from the machine when None). Linux/x86 only: elsewhere (no /proc/cpuinfo,
    or ARM, whose bf16 speed in PyTorch varies by build) this says False. Informative (benchmarks print it):
    the flag does not say bf16 is faster here, and the evaluation dtype is the params' choice anyway."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo() if sys.platform.startswith("linux") else ""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and _CPU_BF16_FLAGS & set(value.split()):
            return True
    return False


def resolve_eval_dtype(device: str | None = None, dtype: str = "auto") -> str:
    """The dtype name evaluation runs in, fixed by params alone: "auto" is bfloat16 on CUDA (float16 on GPUs
    without bf16) and float32 on a CPU, whatever the CPU (kvlib.engine.models.default_device_dtype, which also
    validates device and dtype); "float32"/"bfloat16"/"float16" are honoured (float16 not on CPU). A profile
    that wants bf16 on a CPU states `dtype: bfloat16`. The resolved name (never "auto") is what the backend's
    identity, every result row and the response cache record."""
    _, torch_dtype = default_device_dtype(device, dtype)
    return _DTYPE_NAMES[torch_dtype]


# ------------------------------------------------------------------------------------------- params


@dataclasses.dataclass
class BackendConfig:
    """Which backend an evaluation uses (the `backend:` mapping of a params file or notebook).

    kind "hf": a local model (`model`: embedded name, checkpoint or LoRA-adapter dir, hub id) in transformers.
    kind "vllm": the same local model (not a LoRA adapter) in vLLM's offline engine (CUDA); kind "auto": vLLM
    when it is installed and a CUDA GPU is visible, else transformers.
    kind "openai": an OpenAI-compatible chat API at `base_url` (None: api.openai.com) serving `model`; the API
    key is read from the environment variable named by `api_key_env`, never from params. A loopback server
    (llama.cpp, vLLM on 127.0.0.1) needs no key.
    `run` instead of `model` names a finetuning run of the profile's 02_finetune params; kvlib.engine.evaluate
    resolves it to the trained model (or the fine-tuned OpenAI model's name).
    """

    kind: Literal["hf", "vllm", "auto", "openai"] = "hf"
    model: str | None = None  # None: the embedded default (kind hf), or the model of `run`
    run: str | None = None
    # hf
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # see resolve_eval_dtype
    device: str | None = None  # None/"auto": CUDA if available, else CPU
    batch_size: int = 8
    # cap on rows x padded tokens per batch; None: CPU_MAX_BATCH_TOKENS on a CPU, no cap on a GPU
    max_batch_tokens: int | None = None
    attn_implementation: str = "sdpa"
    # vllm: share of GPU memory vLLM's engine may take (weights, activations and its paged KV cache)
    gpu_memory_utilization: float = 0.85
    # prompts in token order, each prefilling only what follows the prefix it shares with the previous one (the
    # documents before the gold in MDQA, few-shot examples), attention of those tokens only; see HFBackend
    prefix_cache: bool = False
    # hf: how greedy tokens are computed. "kvlib": kvlib's decoder (each prompt prefilled alone on the causal
    # fast path, rows decoded together in a preallocated KV cache, each row stopping at its end of turn or its
    # stop rule); on a CPU, with models whose attention it knows (Llama, Mistral, Qwen2/3), else "generate".
    # "generate": transformers' generate() on left-padded batches. Either gives the same greedy tokens up to
    # floating-point rounding (tests compare them token for token), so it is not part of the identity.
    decoder: Literal["kvlib", "generate"] = "kvlib"
    # hf: torch CPU threads while the backend computes (None: torch's setting, one per core). On a host whose
    # cores other work also uses, every parallel op waits for a thread on a busy core: 1 thread then decodes
    # up to 10x faster (measured on this project's 2-core host). The results are the same (tested bitwise).
    threads: int | None = None
    # openai
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4  # requests in flight at once
    max_retries: int = 6  # SDK retries of 408/409/429/5xx, timeouts and connection errors, exponential backoff
    timeout_s: float = 600.0

    def validate(self) -> None:
        if self.model is not None and not self.model.strip():
            fail("model", "must name a model")
        if self.model is not None and self.run is not None:
            fail("run", f"give either model or run, not both (model={self.model!r}, run={self.run!r})")
        if self.kind == "openai" and self.model is None and self.run is None:
            fail("model", "kind openai needs the API's model name (or a run of openai_runs)")
        if self.kind != "openai" and self.model is not None:
            check_model_spec(self.model, "model")  # a local path that does not exist fails at planning
        check_positive("batch_size", self.batch_size)
        if self.max_batch_tokens is not None:
            check_positive("max_batch_tokens", self.max_batch_tokens)
        if self.threads is not None:
            check_positive("threads", self.threads)
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            fail("base_url", f"must be an http(s) URL, got {self.base_url!r}")
        if not self.api_key_env.strip() or self.api_key_env.startswith(("sk-", "sk_")):
            fail("api_key_env", "must name an environment variable (never the key itself)")
        if not 0 < self.gpu_memory_utilization <= 1:
            fail("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        check_positive("concurrency", self.concurrency)
        check_positive("max_retries", self.max_retries, 0)
        if not self.timeout_s > 0:
            fail("timeout_s", f"must be > 0, got {self.timeout_s!r}")


def build_backend(config: BackendConfig | Mapping[str, Any], progress: bool = True) -> Backend:
    """The backend described by `config` (a BackendConfig or a params mapping, validated first). A `run` must
    have been resolved to a model first (kvlib.pipeline.runs.open_model does that)."""
    if not isinstance(config, BackendConfig):
        config = from_mapping(BackendConfig, config, "backend")
    if config.run is not None:
        raise ValueError(f"backend: run {config.run!r} is not resolved to a model; use kvlib.pipeline.runs.open_model")
    if config.kind == "openai":
        return OpenAIChatBackend(config.model, base_url=config.base_url, api_key_env=config.api_key_env,
                                 concurrency=config.concurrency, max_retries=config.max_retries,
                                 timeout_s=config.timeout_s, progress=progress)
    if config.kind == "vllm" or (config.kind == "auto" and vllm_usable()):
        return VLLMBackend(config.model or DEFAULT_MODEL, dtype=config.dtype,
                           gpu_memory_utilization=config.gpu_memory_utilization, progress=progress)
    return HFBackend(config.model or DEFAULT_MODEL, device=config.device, dtype=config.dtype,
                     batch_size=config.batch_size, max_batch_tokens=config.max_batch_tokens,
                     attn_implementation=config.attn_implementation, prefix_cache=config.prefix_cache,
                     decoder=config.decoder, threads=config.threads, progress=progress)


def planned_engine(config: BackendConfig) -> tuple[str, str, str] | None:
    """(backend name, evaluation dtype, device type) that `build_backend` runs `config` with, known without loading
    anything (what a cost plan matches measured rates on: kvlib.engine.meter); None for a chat API."""
    if config.kind == "openai":
        return None
    if config.kind == "vllm" or (config.kind == "auto" and vllm_usable()):
        return "vllm", "bfloat16" if config.dtype == "auto" else config.dtype, "cuda"
    device, dtype = default_device_dtype(config.device, config.dtype)
    return "hf", _DTYPE_NAMES[dtype], device.type


def vllm_usable() -> bool:
    """Whether backend kind auto picks vLLM: it is installed and a CUDA GPU is visible. On a CPU, auto stays
    with transformers and kvlib's decoder (see HFBackend)."""

    return torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None


# ----------------------------------------------------------------------------------------- local models


class LocalChatModel:
    """What the local backends (HF, vLLM) share: a kvlib model spec, its tokenizer and chat template, and one
    tokenization of requests, so that both engines see exactly the same tokens. Subclasses set `spec`,
    `tokenizer` and `stop_ids`, and give `_text_config()` (the model's text config)."""

    spec: str
    tokenizer: Any
    stop_ids: list[int]
    accepts_raw_text = True  # RawPrompt requests are tokenized as plain text (`_encode_prompts`)

    def _text_config(self) -> Any:
        raise NotImplementedError

    def _template_sha256(self) -> str | None:
        template = self.tokenizer.chat_template
        if template is not None and not isinstance(template, str):  # several named templates
            template = json.dumps(template, sort_keys=True)
        return None if template is None else sha256_text(template)

    def context_length(self) -> int:
        """Most tokens (prompt + generated) the model can attend to, from its config."""
        config = self._text_config()
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"{self.spec}: the model config names no context length (max_position_embeddings)")

    # ------------------------------------------------------------------------------------- lengths

    def prompt_lengths(self, requests: Sequence[Request]) -> list[int]:
        """Token count of each request as the model sees it (chat template and generation prompt included;
        a RawPrompt: its text's tokens)."""
        return [len(ids) for ids in self._encode_prompts(requests)]

    def fits(self, requests: Sequence[Request], max_new_tokens: int) -> list[bool]:
        """Whether each request leaves room for `max_new_tokens` in the context window (generate() raises on
        any that does not)."""
        check_max_new_tokens(max_new_tokens)
        limit = self.context_length()
        return [n + max_new_tokens <= limit for n in self.prompt_lengths(requests)]

    def _check_fit(self, lengths: list[int], what: str) -> None:
        limit = self.context_length()
        over = [i for i, n in enumerate(lengths) if n > limit]
        if over:
            raise ContextLengthError(over, [lengths[i] for i in over], limit, what)

    # ------------------------------------------------------------------------------------- tokenize

    def _render(self, messages: list[dict]) -> str:
        """The chat template applied to `messages`, ending with the assistant's generation prompt."""
        if not self.tokenizer.chat_template:
            raise ValueError(f"{self.spec}: the tokenizer has no chat template, so chat requests cannot be "
                             f"formatted; use a chat/instruct model or a tokenizer with a chat_template")
        messages = fit_to_template(self.tokenizer, messages)  # a system turn where the template has none
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        # No special tokens added: a chat template writes its own (BOS included where it wants one), and raw
        # scoring follows lm-evaluation-harness, which adds none for causal LMs either. This is exactly what
        # apply_chat_template(tokenize=True) does after rendering.
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []

    def _encode_raw(self, texts: list[str]) -> list[list[int]]:
        # lm-evaluation-harness's HF model (tok_batch_encode, add_bos_token unset): the tokenizer's default special
        # tokens (a BOS where it adds one), none when the text already starts with the BOS token's text
        bos = self.tokenizer.bos_token
        return [self.tokenizer(text, add_special_tokens=not (bos and text.startswith(bos)))["input_ids"]
                for text in texts]

    def _encode_prompts(self, requests: Sequence[Request]) -> list[list[int]]:
        """Token ids of each generation request: chat requests through the chat template with the generation
        prompt, RawPrompt text as it is (`_encode_raw`)."""
        _check_list(requests, "requests")
        raw = [i for i, r in enumerate(requests) if isinstance(r, RawPrompt)]
        chat = [i for i, r in enumerate(requests) if not isinstance(r, RawPrompt)]
        ids: list = [None] * len(requests)
        for i, tokens in zip(raw, self._encode_raw([requests[i].text for i in raw])):
            ids[i] = tokens
        rendered = [self._render(to_messages(requests[i], f"requests[{i}]")) for i in chat]
        for i, tokens in zip(chat, self._encode(rendered)):
            ids[i] = tokens
        return ids

    def _decode_answer(self, tokens: list[int]) -> str:
        """Generated tokens as the answer text: up to the first end-of-turn token, special tokens removed,
        whitespace stripped (the same for every local engine)."""
        return self.tokenizer.decode(_until_stop(tokens, self.stop_ids), skip_special_tokens=True).strip()

    def _encode_pair(self, request: Any, where: str) -> tuple[list[int], list[int]]:
        """(context tokens, continuation tokens), split like lm-evaluation-harness: encode the whole text and
        the context separately, and the continuation is the whole's tokens after len(context tokens); so a
        token merging across the boundary is scored as part of the continuation."""
        if not isinstance(request, (tuple, list)) or len(request) != 2:
            raise TypeError(f"{where}: expected a (context, continuation) pair, got {request!r}")
        context, continuation = request
        if not isinstance(continuation, str) or not continuation:
            raise TypeError(f"{where}: the continuation must be a non-empty string, got {continuation!r}")
        if isinstance(context, str):
            # raw text: trailing whitespace of the context moves to the continuation (lm-eval), since BPE
            # tokenizers attach a space to the word after it
            stripped = context.rstrip()
            context, continuation = stripped, context[len(stripped):] + continuation
        else:
            # the template's own tail (e.g. "<|im_start|>assistant\n") stays in the context, as generate() sees it
            context = self._render(to_messages(context, f"{where}[0]"))
        whole, context_ids = self._encode([context + continuation, context])
        continuation_ids = whole[len(context_ids):]
        if not context_ids:  # empty context: condition on BOS (or eos) like lm-eval's prefix token
            context_ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None
                           else self.stop_ids[0]]
        if not continuation_ids:
            raise ValueError(f"{where}: the continuation {continuation!r} encodes to no tokens after the context")
        return context_ids, continuation_ids


class Tokenization(LocalChatModel):
    """A local model's tokenizer and chat template without its weights: the very token ids a local backend computes
    for requests (`LocalChatModel`'s tokenization), counted before anything runs (kvlib.pipeline.planner)."""

    def __init__(self, spec: str = DEFAULT_MODEL):
        self.spec = spec
        self.tokenizer = load_tokenizer(spec)
        self.stop_ids = end_of_turn_ids(self.tokenizer)

    def prompt_ids(self, requests: Sequence[Request]) -> list[list[int]]:
        """Token ids of generation requests, as generate() prefills them."""
        return self._encode_prompts(requests)

    def loglikelihood_inputs(self, requests: Sequence[LoglikelihoodRequest]) -> list[list[int]]:
        """The model input of each (context, continuation) request: context + continuation minus its last token
        (requests with the same input share one forward pass, as loglikelihood() computes them)."""
        return [(c + k)[:-1] for c, k in (self._encode_pair(r, f"requests[{i}]") for i, r in enumerate(requests))]


# ----------------------------------------------------------------------------------------- HF backend


class HFBackend(LocalChatModel):
    """A local Hugging Face causal LM (any kvlib model spec), batched greedy generation and scoring.

    Requests are tokenized once through the tokenizer's chat template. A request that does not fit the
    context window raises ContextLengthError; see fits() to count them beforehand.

    generate() with `decoder="kvlib"` (the default, on a CPU with a Llama/Mistral/Qwen-type model) runs
    kvlib's greedy decoder: each prompt is prefilled alone (no padding, so attention takes SDPA's causal fast
    path), its keys and values are copied into one slot of a preallocated KV cache, and the rows of up to
    `batch_size` prompts are decoded together, one token per row per step, so that the weights are read once
    per step for all of them; a row leaves the batch at its end of turn, at `max_new_tokens`, or where the
    request's StopRule says the answer ends. Greedy tokens equal transformers' generate() up to floating-point
    rounding (tests compare them token for token). With `decoder="generate"`, transformers' generate() runs on
    left-padded batches, sorted longest first, of at most `batch_size` rows and `max_batch_tokens` padded
    tokens (the path before kvlib's decoder; a stop rule then cuts whole replies).

    With `prefix_cache`, prompts go in lexicographic token order (prompts with a common prefix are
    neighbours, which makes the prefix shared with the previous prompt as long as it can be: the sum over
    neighbours of shared prefixes is what a prefix tree of all prompts saves) and each prefills only what
    follows the prefix it shares with the previous one; the new tokens' attention covers only their own rows
    (the cached prefix without a mask, themselves causally; see `_attend_after_prefix`). Prompts that share
    long prefixes (MDQA: one question at several gold positions shares the documents before the gold;
    few-shot prompts share their shots) then cost a fraction of their length. With `decoder="generate"`,
    prompts sharing at least `prefix_min_shared` tokens go one at a time through generate() with the cached
    prefix and the rest in batches. Answers equal those computed without it up to floating-point rounding
    (tests and benchmarks/bench_eval.py compare them).
    """

    name = "hf"
    # decoder "generate" + prefix_cache reuses prefixes of at least this many tokens; other prompts go in batches,
    # which beat one at a time when little is shared (every prompt shares the chat template's header, ~30 tokens)
    prefix_min_shared = 128
    # kvlib's decoder: most bytes of keys and values one batch of decoded rows may hold (rows x (longest prompt +
    # max_new_tokens) x bytes per token); a params `max_batch_tokens` caps rows x those tokens as well
    decode_max_cache_bytes = 2 << 30

    def __init__(self, spec: str = DEFAULT_MODEL, device: str | None = None, dtype: str = "auto",
                 batch_size: int = 8, max_batch_tokens: int | None = None, attn_implementation: str = "sdpa",
                 prefix_cache: bool = False, decoder: str = "kvlib", threads: int | None = None,
                 progress: bool = True):
        # one validation home for constructor arguments and params files
        config = from_mapping(BackendConfig, {
            "kind": "hf", "model": spec, "device": device, "dtype": dtype, "batch_size": batch_size,
            "max_batch_tokens": max_batch_tokens, "attn_implementation": attn_implementation,
            "prefix_cache": prefix_cache, "decoder": decoder, "threads": threads,
        })
        self.spec = config.model
        self.dtype = resolve_eval_dtype(config.device, config.dtype)
        self.batch_size, self.max_batch_tokens = config.batch_size, config.max_batch_tokens
        self._decode_max_tokens = config.max_batch_tokens  # only a cap the params state bounds kvlib's decoder
        self.attn_implementation = config.attn_implementation
        self.prefix_cache = config.prefix_cache
        self.threads = config.threads
        self.progress = progress
        self.model, self.tokenizer = load_model(self.spec, config.device, self.dtype, self.attn_implementation)
        self.device = next(self.model.parameters()).device
        if self.max_batch_tokens is None and self.device.type == "cpu":
            self.max_batch_tokens = CPU_MAX_BATCH_TOKENS
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self.pad_id = self.tokenizer.pad_token_id  # load_tokenizer sets one (eos) when the model has none
        forward = _forward_parameters(self.model)
        self._logits_to_keep = "logits_to_keep" in forward  # current transformers models take it
        # the name under which generate() takes a KV cache: `cache` (transformers 5.x) or `past_key_values`
        self._cache_kwarg = "cache" if "cache" in forward else "past_key_values"
        # plain greedy decoding whatever the checkpoint's generation_config.json suggests; passing do_sample=False
        # explicitly also silences its warnings about inherited sampling settings
        self._greedy = dict(do_sample=False, num_beams=1, repetition_penalty=1.0, eos_token_id=self.stop_ids,
                            pad_token_id=self.pad_id)
        why_not = kvlib_decoder_unsupported(self.model, self.device, self._logits_to_keep)
        self.decoder = config.decoder if why_not is None else "generate"
        self.meter_tags = meter_tags(self.name, self.dtype, str(self.device), self.model)
        if config.decoder == "kvlib" and why_not is not None and self.device.type == "cpu":
            print(f"kvlib: {self.spec}: transformers' generate() decodes ({why_not})", file=sys.stderr)

    # ------------------------------------------------------------------------------------- describe

    def identity(self) -> dict:
        return {
            "backend": self.name,
            "model": model_identity(self.spec),
            "dtype": self.dtype,
            "device": str(self.device),
            "attn_implementation": self.attn_implementation,
            "chat_template_sha256": self._template_sha256(),
            "stop_token_ids": self.stop_ids,
            # batch_size, max_batch_tokens, prefix_cache, decoder and threads are left out on purpose: they
            # choose how prompts are computed, not what answers them (equal up to floating-point rounding), so
            # cached answers stay valid
        }

    def _text_config(self) -> Any:
        return self.model.config.get_text_config()

    def _left_pad(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        ids = [[self.pad_id] * (width - len(s)) + s for s in sequences]
        mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
        return (torch.tensor(ids, dtype=torch.long, device=self.device),
                torch.tensor(mask, dtype=torch.long, device=self.device))

    @contextlib.contextmanager
    def _computing(self):
        """No autograd, and the params' torch threads (restored afterwards)."""
        previous = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                yield
        finally:
            if self.threads is not None:
                torch.set_num_threads(previous)

    def _progress(self, total: int, desc: str):

        return tqdm(total=total, desc=f"{desc} {self.spec}", unit="req", disable=not self.progress)

    def _run_batched(self, items: list, lengths: list[int], run_batch, desc: str,
                     on_result: Callable[[int, Any], None] | None) -> list:
        """run_batch over `items` in planned batches; results in the items' original order, each passed to
        on_result(index, result) as its batch finishes."""
        results: list = [None] * len(items)
        with self._progress(len(items), desc) as bar, self._computing():
            for batch in plan_batches(lengths, self.batch_size, self.max_batch_tokens):
                for i, result in zip(batch, run_batch([items[i] for i in batch])):
                    results[i] = result
                    if on_result is not None:
                        on_result(i, result)
                bar.update(len(batch))
        return results

    # ------------------------------------------------------------------------------------- generate

    def generate(self, requests: Sequence[Request], max_new_tokens: int,
                 on_result: Callable[[int, str], None] | None = None, stop: StopRule | None = None) -> list[str]:
        """Greedy completion of each request (chat template applied; a RawPrompt's text continued as it is), stopped at the end of the assistant's
        turn, after `max_new_tokens`, or where `stop` says the answer ends; special tokens removed and
        whitespace stripped; in request order. Raises ContextLengthError, before generating anything, if any
        prompt + max_new_tokens is too long."""
        check_max_new_tokens(max_new_tokens)
        if stop is not None and not isinstance(stop, StopRule):
            raise TypeError(f"stop must be a StopRule or None, got {stop!r}")
        work = meter.Work("generate", self.meter_tags)
        prompts = self._encode_prompts(requests)
        # a batch grows to prompt + max_new_tokens: that is what the context window and max_batch_tokens bound
        totals = [len(p) + max_new_tokens for p in prompts]
        self._check_fit(totals, f"prompt + max_new_tokens={max_new_tokens}")
        work.prompts, work.prompt_tokens = len(prompts), sum(map(len, prompts))
        work.budget_tokens = len(prompts) * max_new_tokens
        if self.decoder == "kvlib":
            results: list = [None] * len(prompts)

            def keep(i: int, answer: str) -> None:
                results[i] = answer
                if on_result is not None:
                    on_result(i, answer)

            if prompts:
                self._decode(prompts, max_new_tokens, stop, keep, work)
                work.done()
            return results
        if stop is not None:  # generate() decodes whole replies; cut each where the rule says
            store = on_result
            on_result = None if store is None else (lambda i, answer: store(i, stop.apply(answer)))
            results = [stop.apply(a) for a in self._generate_padded(prompts, totals, max_new_tokens, on_result, work)]
        else:
            results = self._generate_padded(prompts, totals, max_new_tokens, on_result, work)
        if prompts:
            work.done()
        return results

    def _generate_padded(self, prompts: list[list[int]], totals: list[int], max_new_tokens: int,
                         on_result: Callable[[int, str], None] | None, work: meter.Work) -> list[str]:
        """decoder "generate": transformers' generate() on left-padded batches (and with prefix_cache, the
        prompts sharing long prefixes one at a time with the cached prefix). Prefill and decode run inside
        generate(), so `work` gets their counts and only the call's total seconds."""
        if not self.prefix_cache:
            return self._run_batched(prompts, totals, lambda batch: self._generate_batch(batch, max_new_tokens, work),
                                     "generate", on_result)
        sharing = prompts_sharing_prefixes(prompts, self.prefix_min_shared)
        alone = sorted(set(range(len(prompts))) - set(sharing))
        results: list = [None] * len(prompts)

        def into(indices: list[int]) -> Callable[[int, str], None]:
            def store(j: int, answer: str) -> None:
                results[indices[j]] = answer
                if on_result is not None:
                    on_result(indices[j], answer)
            return store

        if sharing:
            self._generate_sharing_prefixes([prompts[i] for i in sharing], max_new_tokens, into(sharing), work)
        if alone:
            self._run_batched([prompts[i] for i in alone], [totals[i] for i in alone],
                              lambda batch: self._generate_batch(batch, max_new_tokens, work), "generate",
                              into(alone))
        return results

    def _generate_batch(self, prompts: list[list[int]], max_new_tokens: int, work: meter.Work) -> list[str]:
        input_ids, attention_mask = self._left_pad(prompts)
        output = self.model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                     max_new_tokens=max_new_tokens, **self._greedy)
        rows, width = input_ids.shape  # every row of a padded batch is computed, padding included
        steps = output.shape[1] - width
        work.add("prefill", rows * width, rows * meter.attention_pairs(0, width))
        work.add("decode", rows * steps, rows * meter.attention_pairs(width, width + steps))
        return [self._decode_answer(row) for row in output[:, width:].tolist()]

    def _generate_sharing_prefixes(self, prompts: list[list[int]], max_new_tokens: int,
                                   on_result: Callable[[int, str], None], work: meter.Work) -> None:
        """generate() with prefix_cache: prompts in lexicographic token order (prompts with a common prefix are
        neighbours), one at a time, each answer passed to on_result(index, answer); the cache holds the
        previous prompt and is cut back to the shared prefix."""
        from transformers import DynamicCache

        cache, held = DynamicCache(), []
        with self._progress(len(prompts), "generate") as bar, self._computing():
            for i in sorted(range(len(prompts)), key=prompts.__getitem__):
                prompt = prompts[i]
                # keep at least one prompt token to feed: generate() needs the last one's logits
                keep = min(shared_prefix_length(held, prompt), len(prompt) - 1)
                _truncate_cache(cache, keep)
                input_ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
                output = self.model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                             max_new_tokens=max_new_tokens, **self._greedy,
                                             **{self._cache_kwarg: cache})
                _truncate_cache(cache, len(prompt))  # drop the generated tokens: the next prompt shares none
                steps = output.shape[1] - len(prompt)
                work.add("prefill", len(prompt) - keep, meter.attention_pairs(keep, len(prompt)))
                work.add("decode", steps, meter.attention_pairs(len(prompt), len(prompt) + steps))
                held = prompt
                on_result(i, self._decode_answer(output[0, len(prompt):].tolist()))
                bar.update(1)

    # ------------------------------------------------------------------------------- kvlib's decoder

    def _decoder_model(self) -> Any:
        # a peft model's LoRA layers sit inside its base model, whose forward takes the decoder's arguments
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def _decode(self, prompts: list[list[int]], max_new_tokens: int, stop: StopRule | None,
                on_result: Callable[[int, str], None], work: meter.Work) -> None:
        """decoder "kvlib" (see the class docstring): each answer passed to on_result(index, answer) as its row
        finishes; `work` counts and times prefill and decode apart."""
        if self.prefix_cache:
            order = sorted(range(len(prompts)), key=prompts.__getitem__)  # neighbours share the longest prefixes
        else:
            order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # the rows of a batch alike in length
        model = self._decoder_model()
        cap = self.decode_max_cache_bytes // kv_bytes_per_token(model.config, model.dtype)
        if self._decode_max_tokens is not None:
            cap = min(cap, self._decode_max_tokens)
        batches = plan_decode_batches([len(prompts[i]) for i in order], max_new_tokens, self.batch_size, cap)
        prompt_cache = _KVCache(1, max(len(p) for p in prompts))  # the prompt being prefilled (and its prefix)
        held: list[int] = []  # the tokens prompt_cache holds
        with self._progress(len(prompts), "generate") as bar, self._computing(), _kvlib_attention(model):
            for batch in batches:
                indices = [order[j] for j in batch]
                held = self._decode_batch(model, [prompts[i] for i in indices], indices, max_new_tokens, stop,
                                          prompt_cache, held, on_result, bar, work)

    def _decode_batch(self, model: Any, prompts: list[list[int]], indices: list[int], max_new_tokens: int,
                      stop: StopRule | None, prompt_cache: _KVCache, held: list[int],
                      on_result: Callable[[int, str], None], bar: Any, work: meter.Work) -> list[int]:
        """Prefill `prompts` one at a time, then decode them as the rows of one batch. Row r of the batch
        cache holds its prompt right-aligned at columns [width - len, width), its generated tokens after that
        (every row writes the same column at each step); a finished row's slot takes the last live row, so the
        live rows are always the first ones. Returns the tokens prompt_cache holds afterwards."""
        width = max(len(p) for p in prompts)
        cache = _KVCache(len(prompts), width + max_new_tokens)
        rows: list[_Row] = []
        with work.timed("prefill"):
            for index, prompt in zip(indices, prompts):
                # keep at least one prompt token to feed: its logits give the first new token
                past = min(shared_prefix_length(held, prompt), len(prompt) - 1) if self.prefix_cache else 0
                prompt_cache.write, prompt_cache.first = past, 0
                logits = self._step(model, [prompt[past:]], [list(range(past, len(prompt)))], prompt_cache,
                                    _Layout(past=past))
                work.add("prefill", len(prompt) - past, meter.attention_pairs(past, len(prompt)))
                held = prompt
                cache.copy_row(len(rows), prompt_cache, len(prompt), width - len(prompt))
                rows.append(_Row(index, len(prompt), width - len(prompt), [int(logits[0].argmax())]))
        with work.timed("decode"):
            live = rows
            generated = 1
            while True:
                done = [slot for slot, row in enumerate(live) if self._row_done(row, max_new_tokens, stop)]
                for slot in reversed(done):  # highest slot first, so each swap moves a live row
                    row = live[slot]
                    answer = self._decode_answer(row.tokens)
                    on_result(row.index, answer if stop is None else stop.apply(answer))
                    bar.update(1)
                    last = len(live) - 1
                    if slot != last:
                        cache.move_row(last, slot, live[last].start, width + generated - 1)
                        live[slot] = live[last]
                    live.pop()
                if not live:
                    return held
                # feed each row's last token: generated token g sits at column width + g - 1, position len + g - 1
                cache.write, cache.first = width + generated - 1, min(row.start for row in live)
                columns = cache.write + 1 - cache.first
                mask = None
                if any(row.start != cache.first for row in live):
                    starts = torch.tensor([row.start - cache.first for row in live], device=self.device)
                    mask = torch.arange(columns, device=self.device)[None, :] >= starts[:, None]
                    mask = mask[:, None, None, :]
                logits = self._step(model, [[row.tokens[-1]] for row in live],
                                    [[row.length + generated - 1] for row in live], cache,
                                    _Layout(decode=True, rows=len(live), mask=mask))
                work.add("decode", len(live), len(live) * columns)  # each row's token attends to the columns held
                for row, token in zip(live, logits.argmax(-1).tolist()):
                    row.tokens.append(token)
                generated += 1

    def _step(self, model: Any, ids: list[list[int]], positions: list[list[int]], cache: _KVCache,
              layout: _Layout) -> torch.Tensor:
        """One forward pass of kvlib's decoder: the logits of each row's last token."""
        output = model(input_ids=torch.tensor(ids, dtype=torch.long, device=self.device),
                       position_ids=torch.tensor(positions, dtype=torch.long, device=self.device),
                       use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache, _LAYOUT: layout})
        return output.logits[:, -1]

    def _row_done(self, row: _Row, max_new_tokens: int, stop: StopRule | None) -> bool:
        if row.tokens[-1] in self.stop_ids or len(row.tokens) >= max_new_tokens:
            return True
        if stop is None:
            return False
        return stop.cut(self.tokenizer.decode(row.tokens, skip_special_tokens=True)) is not None

    # ---------------------------------------------------------------------------------- loglikelihood

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest],
                      on_result: Callable[[int, tuple[float, bool]], None] | None = None) -> list[tuple[float, bool]]:
        """(sum of log-probs of the continuation's tokens given the context, whether greedy decoding would
        produce exactly those tokens) for each (context, continuation) pair, in request order.

        A string context is scored raw (no chat template), as lm-evaluation-harness does; a message-list
        context goes through the chat template with the generation prompt, so is_greedy says whether
        generate() would start its answer with the continuation. Raises ContextLengthError for pairs longer
        than the context window.
        """
        _check_list(requests, "requests")
        work = meter.Work("loglikelihood", self.meter_tags)
        pairs = [self._encode_pair(request, f"requests[{i}]") for i, request in enumerate(requests)]
        totals = [len(context) + len(continuation) for context, continuation in pairs]
        self._check_fit(totals, "context + continuation")
        work.prompts, work.prompt_tokens = len(pairs), sum(totals)
        # Requests whose model input (context + continuation minus its last token) is the same share one
        # forward pass, as in lm-evaluation-harness: every choice of a multiple-choice question whose answers
        # are single tokens (MMLU's " A".." D") is scored from the logits of one pass over the context.
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (context, continuation) in enumerate(pairs):
            groups.setdefault(tuple((context + continuation)[:-1]), []).append(i)
        shared = list(groups.values())
        results: list = [None] * len(pairs)

        def store(group: int, scores: list[tuple[float, bool]]) -> None:
            for i, score in zip(shared[group], scores):
                results[i] = score
                if on_result is not None:
                    on_result(i, score)

        self._run_batched([[pairs[i] for i in g] for g in shared], [max(totals[i] for i in g) for g in shared],
                          lambda batch: self._score_batch(batch, work), "loglikelihood", store)
        if pairs:
            work.done()
        return results

    def _score_batch(self, groups: list[list[tuple[list[int], list[int]]]], work: meter.Work
                     ) -> list[list[tuple[float, bool]]]:
        # One row per group of (context, continuation) pairs with the same input: context + continuation minus
        # its last token; the logits at the last len(continuation) positions predict the continuation. Left
        # padding aligns every row's end, so one `logits_to_keep` (the longest continuation) covers all rows and
        # the full (rows x length x vocab) logits are never built. Position ids are given explicitly so padding
        # does not shift them (as in generate()).
        input_ids, attention_mask = self._left_pad([(c + k)[:-1] for c, k in (group[0] for group in groups)])
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        rows, width = input_ids.shape
        work.add("prefill", rows * width, rows * meter.attention_pairs(0, width))
        keep = max(len(k) for group in groups for _, k in group)
        extra = {"logits_to_keep": keep} if self._logits_to_keep else {}
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            **extra).logits[:, -keep:]
        results = []
        for row, group in enumerate(groups):
            scores = []
            for _, continuation in group:
                logprobs = logits[row, keep - len(continuation):].float().log_softmax(-1)
                target = torch.tensor(continuation, device=logprobs.device)
                total = logprobs.gather(-1, target[:, None]).sum().item()
                scores.append((total, bool((logprobs.argmax(-1) == target).all())))
            results.append(scores)
        return results


# ------------------------------------------------------------------------------- kvlib's decoder, parts

# the attention implementation kvlib's decoder registers with transformers and switches a model to while it
# decodes, and the forward keyword that tells it what the keys hold (transformers hands unknown forward
# keywords down to the attention function)
_ATTENTION = "kvlib_decoder"
_LAYOUT = "kvlib_layout"
_KVLIB_DECODER_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# generation-config fields whose logits processors generate() would apply and kvlib's decoder does not
_PROCESSOR_FIELDS = ("min_length", "min_new_tokens", "no_repeat_ngram_size", "bad_words_ids", "suppress_tokens",
                     "begin_suppress_tokens", "forced_bos_token_id", "forced_eos_token_id", "sequence_bias",
                     "exponential_decay_length_penalty")


def kvlib_decoder_unsupported(model: Any, device: torch.device, logits_to_keep: bool = True) -> str | None:
    """Why kvlib's decoder cannot run `model` (None: it can). It knows the attention of decoder-only models
    whose every layer attends to every earlier token (no sliding window), on a CPU."""
    if device.type != "cpu":
        return f"kvlib's decoder runs on a CPU, not {device.type}"
    try:
        from transformers import AttentionInterface  # noqa: F401  (transformers >= 4.48)
    except ImportError:
        return "this transformers has no AttentionInterface"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if config.model_type not in _KVLIB_DECODER_MODELS:
        return f"kvlib's decoder knows the attention of {sorted(_KVLIB_DECODER_MODELS)}, not {config.model_type!r}"
    layer_types = getattr(config, "layer_types", None) or ()
    if any(t != "full_attention" for t in layer_types) or (
            getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)):
        return "sliding-window attention"
    if not logits_to_keep:
        return "the model's forward takes no logits_to_keep"
    generation = getattr(base, "generation_config", None)
    for field in _PROCESSOR_FIELDS:
        if getattr(generation, field, None) not in (None, 0, False, [], (), {}):
            return f"its generation config sets {field}, which generate() applies"
    return None


def kv_bytes_per_token(config: Any, dtype: torch.dtype) -> int:
    """Bytes of keys and values one token takes in a model's KV cache."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def plan_decode_batches(lengths: Sequence[int], max_new_tokens: int, batch_size: int,
                        max_tokens: int) -> list[list[int]]:
    """Consecutive positions of `lengths` (prompt lengths in decoding order) grouped into batches of at most
    `batch_size` rows whose cache, rows x (longest prompt + max_new_tokens) tokens, holds at most `max_tokens`
    (a single longer prompt still gets a batch of its own)."""
    batches: list[list[int]] = []
    longest = 0
    for j, n in enumerate(lengths):
        current = batches[-1] if batches else None
        if current and len(current) < batch_size and (
                (len(current) + 1) * (max(longest, n) + max_new_tokens) <= max_tokens):
            current.append(j)
            longest = max(longest, n)
        else:
            batches.append([j])
            longest = n
    return batches


@dataclasses.dataclass
class _Row:
    index: int  # the request's position
    length: int  # prompt tokens
    start: int  # first cache column of the prompt
    tokens: list[int]  # generated so far


@dataclasses.dataclass
class _Layout:
    """What the keys handed to attention hold in kvlib's decoder: a prefill of one prompt whose first `past`
    tokens were cached before (its queries are the tokens after them), or a decode step of `rows` rows, one
    query each, `mask` [rows, 1, 1, columns] saying which key columns each row sees (None: all)."""

    past: int = 0
    decode: bool = False
    rows: int = 1
    mask: torch.Tensor | None = None


class _KVCache:
    """Keys and values of `rows` sequences in preallocated tensors, one pair per layer ([rows, kv heads,
    capacity, head dim]), written in place (a transformers DynamicCache concatenates a new tensor per token
    and layer). The model calls update() as it calls a transformers Cache's; the decoder sets `write` (the
    column the step's tokens go to) and `first` (the first column attention reads) before each step, and
    attention reads the columns [first, write + new tokens) of the live rows, the first `live`."""

    is_compileable = False

    def __init__(self, rows: int, capacity: int):
        self.rows, self.capacity = rows, capacity
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.write = self.first = 0

    def _allocate(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        # zeros, not empty: a masked column still meets its value row (0 x NaN would be NaN)
        self.keys.append(keys.new_zeros((self.rows, keys.shape[1], self.capacity, keys.shape[3])))
        self.values.append(values.new_zeros((self.rows, values.shape[1], self.capacity, values.shape[3])))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self._allocate(layer_idx, key_states, value_states)
        rows, end = key_states.shape[0], self.write + key_states.shape[2]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys[:rows, :, self.write:end] = key_states
        values[:rows, :, self.write:end] = value_states
        return keys[:rows, :, self.first:end], values[:rows, :, self.first:end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.write

    def copy_row(self, row: int, source: _KVCache, length: int, column: int) -> None:
        """The first `length` columns of `source`'s row 0 into row `row` from column `column` on."""
        for layer, (keys, values) in enumerate(zip(source.keys, source.values)):
            if layer == len(self.keys):
                self._allocate(layer, keys, values)
            self.keys[layer][row, :, column:column + length] = keys[0, :, :length]
            self.values[layer][row, :, column:column + length] = values[0, :, :length]

    def move_row(self, source: int, target: int, start: int, end: int) -> None:
        """Columns [start, end) of row `source` into row `target`."""
        for keys, values in zip(self.keys, self.values):
            keys[target, :, start:end] = keys[source, :, start:end]
            values[target, :, start:end] = values[source, :, start:end]


@contextlib.contextmanager
def _kvlib_attention(model: Any):
    """`model` attends through `_attention` while kvlib's decoder runs it (transformers then builds no mask:
    the decoder's _Layout says what each query sees)."""
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _attention)
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = _ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def _attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
               **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Attention of kvlib's decoder (query [rows, heads, queries, dim], key/value [rows, kv heads, columns,
    dim]) as its _Layout says. A prompt prefilled from scratch and a single row's decode step make exactly
    the SDPA calls transformers' own SDPA attention makes for them, so their results are bitwise those of
    generate()."""
    layout = kwargs.get(_LAYOUT)
    if not isinstance(layout, _Layout):
        raise RuntimeError("kvlib's decoder attention ran without its layout")
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    gqa = heads != kv_heads
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if layout.decode and layout.mask is not None:
        # one query per row: the query heads of each kv head side by side, so that no key is repeated
        packed = query.reshape(rows, kv_heads, heads // kv_heads, dim)
        output = sdpa(packed, key, value, attn_mask=layout.mask, scale=scaling).reshape(rows, heads, 1, dim)
    elif layout.decode or layout.past == 0:
        output = sdpa(query, key, value, is_causal=queries > 1, scale=scaling, enable_gqa=gqa)
    else:
        output = _attend_after_prefix(query, key, value, layout.past, scaling)
    return output.transpose(1, 2).contiguous(), None


def _attend_after_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past: int,
                         scale: float | None) -> torch.Tensor:
    """Causal attention of the queries of one row (the tokens after `past` cached ones) over every key:
    computed as two attentions merged by their log-sum-exps, over the cached prefix (no mask: every query
    sees all of it) and over the new tokens themselves (SDPA's causal path). So the new tokens cost attention
    for their own rows only; an explicit mask instead computes the whole queries x keys rectangle through
    SDPA's masked path. Equal to the one-pass result up to float rounding (CPU only, where SDPA's flash
    kernel returns its log-sum-exp; elsewhere the masked path)."""
    rows, heads, queries, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    if query.device.type != "cpu":
        visible = torch.ones(queries, key.shape[2], dtype=torch.bool, device=query.device).tril(past)
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=visible, scale=scale,
                                                                enable_gqa=groups > 1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    # the prefix: each kv head's query heads stacked as one longer query block (no key repeated)
    stacked = query.reshape(rows, kv_heads, groups * queries, dim)
    out_prefix, lse_prefix = flash(stacked, key[:, :, :past], value[:, :, :past], 0.0, False, scale=scale)
    out_prefix = out_prefix.reshape(rows, heads, queries, dim)
    lse_prefix = lse_prefix.reshape(rows, heads, queries)
    new_keys, new_values = key[:, :, past:], value[:, :, past:]
    if groups > 1:
        new_keys, new_values = new_keys.repeat_interleave(groups, 1), new_values.repeat_interleave(groups, 1)
    out_new, lse_new = flash(query, new_keys, new_values, 0.0, True, scale=scale)
    lse = torch.logaddexp(lse_prefix, lse_new)
    output = (out_prefix.float() * (lse_prefix - lse).exp().unsqueeze(-1)
              + out_new.float() * (lse_new - lse).exp().unsqueeze(-1))
    return output.to(query.dtype)


# -------------------------------------------------------------------------------------------- vLLM


class VLLMBackend(LocalChatModel):
    """A local model in vLLM's offline engine (`pip install vllm`, CUDA): continuous batching and paged
    attention with automatic prefix caching, for the GPU profiles. Prompts are tokenized by kvlib exactly as
    for HFBackend (same chat template, same tokens; RawPrompt text without it) and handed to vLLM as token ids; answers are decoded by the
    same code, so only the engine differs. Its identity says "vllm": its answers are cached apart from HF ones.

    loglikelihood() reads vLLM's prompt log-probs of context + continuation (lm-evaluation-harness's method);
    `is_greedy` compares each continuation token with the top token vLLM reports at that position.
    """

    name = "vllm"
    chunk = 256  # prompts per engine call: results reach on_result (the response cache) every chunk

    def __init__(self, spec: str = DEFAULT_MODEL, dtype: str = "auto", gpu_memory_utilization: float = 0.85,
                 progress: bool = True):
        config = from_mapping(BackendConfig, {"kind": "vllm", "model": spec, "dtype": dtype,
                                              "gpu_memory_utilization": gpu_memory_utilization})
        try:
            import vllm
        except ImportError as exc:
            raise RuntimeError("backend kind vllm needs vLLM (pip install vllm, on a machine with a CUDA GPU); "
                               "kind hf runs the same evaluation with transformers") from exc
        from transformers import AutoConfig


        self.spec, self.progress = config.model, progress
        path = resolve_model(self.spec)
        if (Path(path) / "adapter_config.json").is_file():
            raise ValueError(f"{self.spec}: a LoRA adapter; merge it into its base model first (vLLM loads plain "
                             f"checkpoints here), or use backend kind hf")
        self.dtype = "bfloat16" if config.dtype == "auto" else config.dtype
        self.tokenizer = load_tokenizer(self.spec)
        self.stop_ids = end_of_turn_ids(self.tokenizer)
        self._config = AutoConfig.from_pretrained(path)
        self.vllm_version = getattr(vllm, "__version__", None)
        self._sampling_params = vllm.SamplingParams
        self.engine = vllm.LLM(model=path, tokenizer=path, dtype=self.dtype, seed=0,
                               gpu_memory_utilization=config.gpu_memory_utilization,
                               max_model_len=self.context_length(), enable_prefix_caching=True)
        self.meter_tags = {"backend": self.name, "numerics": self.dtype, "device": "cuda",
                           "machine": meter.machine("cuda"), "parameters": parameter_count(self.spec)}

    def _text_config(self) -> Any:
        return self._config.get_text_config()

    def identity(self) -> dict:
        return {
            "backend": self.name,
            "vllm_version": self.vllm_version,
            "model": model_identity(self.spec),
            "dtype": self.dtype,
            "chat_template_sha256": self._template_sha256(),
            "stop_token_ids": self.stop_ids,
        }

    def _run(self, token_ids: list[list[int]], params: Any, on_output: Callable[[int, Any], None],
             desc: str) -> None:

        with tqdm(total=len(token_ids), desc=f"{desc} {self.spec} (vllm)", unit="req",
                  disable=not self.progress) as bar:
            for start in range(0, len(token_ids), self.chunk):
                piece = token_ids[start:start + self.chunk]
                outputs = self.engine.generate([{"prompt_token_ids": ids} for ids in piece], params, use_tqdm=False)
                for offset, output in enumerate(outputs):  # vLLM returns outputs in prompt order
                    on_output(start + offset, output)
                bar.update(len(piece))

    def generate(self, requests: Sequence[Request], max_new_tokens: int,
                 on_result: Callable[[int, str], None] | None = None, stop: StopRule | None = None) -> list[str]:
        """Greedy completions, as HFBackend.generate (same prompts, same stopping, same decoding; a stop rule
        cuts the whole replies vLLM returns, which on a GPU cost little more)."""
        check_max_new_tokens(max_new_tokens)
        work = meter.Work("generate", self.meter_tags)
        prompts = self._encode_prompts(requests)
        self._check_fit([len(p) + max_new_tokens for p in prompts], f"prompt + max_new_tokens={max_new_tokens}")
        params = self._sampling_params(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=self.stop_ids,
                                       skip_special_tokens=False)
        results: list = [None] * len(prompts)
        work.prompts, work.prompt_tokens = len(prompts), sum(map(len, prompts))
        work.budget_tokens = len(prompts) * max_new_tokens

        def store(i: int, output: Any) -> None:
            new = len(output.outputs[0].token_ids)  # vLLM reuses cached prefixes itself: counted in full here
            work.add("prefill", len(prompts[i]), meter.attention_pairs(0, len(prompts[i])))
            work.add("decode", new, meter.attention_pairs(len(prompts[i]), len(prompts[i]) + new))
            results[i] = self._decode_answer(list(output.outputs[0].token_ids))
            if stop is not None:
                results[i] = stop.apply(results[i])
            if on_result is not None:
                on_result(i, results[i])

        self._run(prompts, params, store, "generate")
        if prompts:
            work.done()
        return results

    def loglikelihood(self, requests: Sequence[LoglikelihoodRequest],
                      on_result: Callable[[int, tuple[float, bool]], None] | None = None) -> list[tuple[float, bool]]:
        """As HFBackend.loglikelihood (same context/continuation split), from vLLM's prompt log-probs."""
        _check_list(requests, "requests")
        work = meter.Work("loglikelihood", self.meter_tags)
        pairs = [self._encode_pair(request, f"requests[{i}]") for i, request in enumerate(requests)]
        self._check_fit([len(c) + len(k) for c, k in pairs], "context + continuation")
        params = self._sampling_params(temperature=0.0, max_tokens=1, prompt_logprobs=1)
        work.prompts = len(pairs)
        for context, continuation in pairs:
            length = len(context) + len(continuation)
            work.prompt_tokens += length
            work.add("prefill", length, meter.attention_pairs(0, length))
        results: list = [None] * len(pairs)

        def store(i: int, output: Any) -> None:
            context, continuation = pairs[i]
            total, greedy = 0.0, True
            for position, token in enumerate(continuation, start=len(context)):
                logprobs = output.prompt_logprobs[position]  # {token id: Logprob}: this token and the top one
                total += logprobs[token].logprob
                greedy = greedy and max(logprobs, key=lambda t: logprobs[t].logprob) == token
            results[i] = (total, greedy)
            if on_result is not None:
                on_result(i, results[i])

        self._run([c + k for c, k in pairs], params, store, "loglikelihood")
        if pairs:
            work.done()
        return results


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """`tokens` up to (without) the first stop token: what follows it in a batch is padding."""
    stops = set(stop_ids)
    for n, token in enumerate(tokens):
        if token in stops:
            return tokens[:n]
    return tokens


def shared_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Number of leading tokens `a` and `b` have in common."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompts_sharing_prefixes(prompts: Sequence[Sequence[int]], min_shared: int) -> list[int]:
    """Indices of the prompts that share at least `min_shared` leading tokens with another prompt, in
    lexicographic token order (so prompts with a common prefix are neighbours)."""
    order = sorted(range(len(prompts)), key=prompts.__getitem__)
    keep = set()
    for a, b in zip(order, order[1:]):
        if shared_prefix_length(prompts[a], prompts[b]) >= min_shared:
            keep.update((a, b))
    return [i for i in order if i in keep]


def _truncate_cache(cache: Any, length: int) -> None:
    """Cut a KV cache back to its first `length` tokens (a negative crop removes tokens, in transformers 4.x
    and 5.x alike)."""
    excess = cache.get_seq_length() - length
    if excess > 0:
        cache.crop(-excess)


def _check_list(requests: Any, where: str) -> None:
    # a bare string would otherwise be iterated character by character
    if isinstance(requests, str) or not isinstance(requests, Sequence):
        raise TypeError(f"{where}: expected a list of requests, got {type(requests).__name__}")


def _forward_parameters(model: Any) -> frozenset[str]:
    """The parameter names of the causal LM's forward (a peft wrapper forwards them to its base model)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return frozenset(inspect.signature(base.forward).parameters)


# ------------------------------------------------------------------------------- OpenAI-compatible API


def is_loopback_url(url: str | None) -> bool:
    """Whether `url` points at this machine (a local server that needs no API key)."""
    if url is None:
        return False

    host = urlparse(url).hostname or ""
    return host in ("localhost", "::1") or host.startswith("127.")


def _is_context_length_error(exc: Exception) -> bool:
    """A 400 that says the prompt is too long: OpenAI's code `context_length_exceeded`; vLLM's "maximum context
    length"; llama.cpp's "exceed context window"."""
    code = getattr(exc, "code", None)
    text = str(exc).lower()
    return code == "context_length_exceeded" or any(
        marker in text for marker in ("context_length_exceeded", "maximum context length", "context window",
                                      "context length"))


class OpenAIChatBackend:
    """A model behind an OpenAI-compatible chat-completions API (OpenAI, vLLM, llama.cpp's server, ...).

    Greedy (temperature 0), `concurrency` requests in flight, the SDK's retries with exponential backoff on
    429/5xx/timeouts/connection errors. The server applies the chat template: a RawPrompt (text without it) is
    rejected by fits() and generate() with a TypeError before anything is sent (`accepts_raw_text` is False;
    callers such as kvlib.tasks.general send these backends chat messages instead). A prompt the server rejects
    as too long is reported (ContextLengthError carrying every other answer), never dropped. No log-likelihood:
    chat APIs do not return prompt log-probabilities.
    """

    name = "openai"
    accepts_raw_text = False

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 4, max_retries: int = 6, timeout_s: float = 600.0, progress: bool = True):
        import openai

        config = from_mapping(BackendConfig, {
            "kind": "openai", "model": model, "base_url": base_url, "api_key_env": api_key_env,
            "concurrency": concurrency, "max_retries": max_retries, "timeout_s": timeout_s})
        self.model, self.base_url, self.concurrency = config.model, config.base_url, config.concurrency
        self.progress = progress

        key = os.environ.get(config.api_key_env, "").strip()
        if not key:
            if not is_loopback_url(self.base_url):
                raise ValueError(f"{config.api_key_env} is not set: export the API key in the environment (kvlib "
                                 f"reads it only from there and never writes it anywhere)")
            key = "no-key-needed-for-a-local-server"  # the SDK insists on some key
        self.client = openai.OpenAI(api_key=key, base_url=self.base_url, max_retries=config.max_retries,
                                    timeout=config.timeout_s)

    def identity(self) -> dict:
        return {"backend": self.name, "model": self.model, "base_url": str(self.client.base_url),
                "chat_template": "server-side", "temperature": 0}

    def context_length(self) -> int | None:
        return None  # the server knows; it rejects what does not fit

    def fits(self, requests: Sequence[Request], max_new_tokens: int) -> list[bool]:
        """Unknown before asking: True for each request (the server's rejection is reported by generate)."""
        check_max_new_tokens(max_new_tokens)
        _check_list(requests, "requests")
        for i, request in enumerate(requests):
            to_messages(request, f"requests[{i}]")  # a RawPrompt (or a malformed request) fails here, up front
        return [True] * len(requests)

    def _complete(self, messages: list[dict], max_new_tokens: int, stop: StopRule | None = None) -> str:
        response = self.client.chat.completions.create(
            model=self.model, messages=messages, temperature=0, max_tokens=max_new_tokens)
        text = response.choices[0].message.content or ""
        return text.strip() if stop is None else stop.apply(text)

    def generate(self, requests: Sequence[Request], max_new_tokens: int,
                 on_result: Callable[[int, str], None] | None = None, stop: StopRule | None = None) -> list[str]:
        """Greedy replies; a stop rule cuts each whole reply (the server decodes to its end)."""
        import openai

        check_max_new_tokens(max_new_tokens)
        _check_list(requests, "requests")
        conversations = [to_messages(r, f"requests[{i}]") for i, r in enumerate(requests)]
        results: list = [None] * len(conversations)
        too_long: list[int] = []
        with ThreadPoolExecutor(self.concurrency) as pool, tqdm(
                total=len(conversations), desc=f"generate {self.model}", unit="req", disable=not self.progress) as bar:
            futures = {pool.submit(self._complete, c, max_new_tokens, stop): i for i, c in enumerate(conversations)}
            try:
                for future in as_completed(futures):
                    i = futures[future]
                    try:
                        results[i] = future.result()
                    except openai.BadRequestError as exc:
                        if not _is_context_length_error(exc):
                            raise
                        too_long.append(i)
                    else:
                        if on_result is not None:  # in the main thread: callbacks need no locking
                            on_result(i, results[i])
                    bar.update(1)
            except BaseException:
                for future in futures:  # stop queued requests; answers already stored are kept
                    future.cancel()
                raise
        if too_long:
            too_long.sort()
            raise ContextLengthError(too_long, [None] * len(too_long), None, "rejected by the server",
                                     results=results)
        return results
